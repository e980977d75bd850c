"""Several targets at once through :func:`samembed.jobs.match_each` (what the Slicer module's engine process runs for
a click's targets): each target gets the matches it gets alone, on real head-and-neck CTs with the shipped model."""

from __future__ import annotations

import csv
import functools
import threading

import numpy as np
import pytest
import torch

from samembed import Atlas, Cancelled, Image, Matcher, MatchOptions, TargetError
from samembed.io import read_image
from samembed.jobs import FuseCall, MatchCall, match_each

from ..conftest import data_file, with_torch_threads

SOURCE = "pt_239"
TARGETS = ("pt_231", "pt_206", "pt_215")


def _ct(patient: str) -> Image:
    return read_image(data_file("ct", "openkbp", "ct", f"{patient}_ct.nii.gz"))


def _centroids(patient: str, n: int = 3) -> tuple[np.ndarray, tuple[str, ...]]:
    rows = [r for r in csv.DictReader(data_file("ct", "openkbp", "oar_centroids.csv").open())
            if r["patient"] == patient][:n]
    return (np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in rows]),
            tuple(r["structure"] for r in rows))


@pytest.fixture(scope="module")
def cts() -> tuple[Image, list[Image]]:
    return _ct(SOURCE), [_ct(p) for p in TARGETS]


def _same_matches(a, b) -> None:
    assert [m.label for m in a.matches] == [m.label for m in b.matches]
    np.testing.assert_array_equal([m.point_lps_mm for m in a.matches], [m.point_lps_mm for m in b.matches])
    np.testing.assert_array_equal([m.score for m in a.matches], [m.score for m in b.matches])


def test_targets_matched_two_at_a_time_get_the_matches_they_get_alone_and_are_told_in_turn(cts):
    """The first target alone, then two at a time: the second and third overlap (each is told as started before the
    other ends). Every target's matches, and one point's heatmap, are those of a fresh engine matching one target at
    a time (the shipped int8 network's tiles do not depend on the box or the threads). A target too small for the
    model is told as skipped (its own problem), and the others are matched."""
    source, targets = cts
    points, labels = _centroids(SOURCE)
    z, y, x = (n // 2 for n in targets[0].array.shape)
    tiny = Image.from_array(targets[0].array[z:z + 2, y:y + 3, x:x + 3].copy(), name="tiny")
    with_heatmap = MatchOptions(heatmap=True, refine=False, consistency=False, polish=False)
    calls = [[MatchCall(points, labels, MatchOptions())] for _ in targets]
    calls[1].append(MatchCall(points[1:2], labels[1:2], with_heatmap))  # a point's heatmap, as the module asks
    calls.insert(2, [MatchCall(points, labels, MatchOptions())])  # the tiny target, third

    alone = Matcher("default", device="cpu")
    threads = torch.get_num_threads()
    expected = []
    for k, (t, cs) in enumerate(zip(targets, [calls[0], calls[1], calls[3]])):
        # the first target on every thread, the others on half of them, as match_each runs them (a heatmap sums in
        # the order of its threads)
        torch.set_num_threads(threads if k == 0 else max(1, threads // 2))
        try:
            expected.append([alone.match(source, c.points_lps_mm, [t], c.labels, c.options) for c in cs])
        finally:
            torch.set_num_threads(threads)

    engine = Matcher("default", device="cpu")
    events: list[tuple[int, object]] = []
    images = [targets[0], targets[1], tiny, targets[2]]
    match_each(engine, source, [lambda im=im: im for im in images], calls, lambda i, e: events.append((i, e)),
               jobs=2, target_names=[im.name for im in images])

    told = {i: [e for k, e in events if k == i] for i in range(4)}
    assert all(len(told[i]) == 2 and told[i][0] is None for i in range(4)), events
    assert isinstance(told[2][1], TargetError) and "too small" in str(told[2][1])
    order = [(i, e is None) for i, e in events]
    assert order.index((0, False)) < order.index((1, True)), "the first target is matched alone"
    started_later = [order.index((i, True)) for i in (1, 2, 3)]
    ended = [order.index((i, False)) for i in (1, 2, 3)]
    assert any(started_later[k + 1] < ended[k] for k in range(2)), f"no two targets overlapped: {events}"
    for i, want in zip((0, 1, 3), expected):
        got = told[i][1]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same_matches(g, w)
    (key, heat), = told[1][1][1].heatmaps.items()
    np.testing.assert_array_equal(heat.array, expected[1][1].heatmaps[key].array)
    assert engine.cache.min_kept == alone.cache.min_kept, "the cache's floor is given back"


def test_atlases_fused_into_targets_two_at_a_time_give_what_each_target_gets_alone(cts):
    """Two atlases given as files, fused into three targets (``FuseCall``): the first target alone, then two at a
    time. Each target's fused landmarks are those of a fresh engine's ``match_atlases`` of that target alone, the
    atlases keep their file names in the results, and the memory cache keeps both atlases and a target per thread
    while the targets run."""
    _, targets = cts
    atlases = []
    for patient in ("pt_239", "pt_210"):
        points, labels = _centroids(patient)
        atlases.append(Atlas(str(data_file("ct", "openkbp", "ct", f"{patient}_ct.nii.gz")), points, labels))
    alone = Matcher("default", device="cpu")
    threads = torch.get_num_threads()
    expected = []
    for k, t in enumerate(targets):
        torch.set_num_threads(threads if k == 0 else max(1, threads // 2))
        try:
            expected.append(alone.match_atlases(atlases, [t]))
        finally:
            torch.set_num_threads(threads)

    engine = Matcher("default", device="cpu")
    events, floors = [], []

    def on_target(i, event):
        events.append((i, event))
        floors.append(engine.cache.min_kept)

    engine.match_each(None, targets, [[FuseCall(tuple(atlases), MatchOptions())] for _ in targets], on_target,
                      jobs=2)
    order = [(i, e is None) for i, e in events]
    assert order.index((0, False)) < order.index((1, True)), "the first target is matched alone"
    assert max(floors) >= 2 + 2 and engine.cache.min_kept == alone.cache.min_kept
    for i, want in enumerate(expected):
        (got,) = [e for k, e in events if k == i and e is not None][0]
        _same_matches(got, want)
        assert [m.agreeing for m in got.matches] == [m.agreeing for m in want.matches]
        named = {name for m in got.matches for name, *_ in m.per_atlas}
        assert named == {a.image for a in atlases}, named


def test_three_atlases_into_one_target_match_the_first_alone_then_two_at_a_time(cts, caplog):
    """One target, three atlases, torch on two threads: the first atlas alone (it embeds the target), then the other
    two at once, and the fused landmarks are exactly those of one atlas at a time (torch on one thread). The
    progress names the atlases, in the caller's thread."""
    import logging

    _, targets = cts
    atlases = []
    for patient in ("pt_239", "pt_210", "pt_202"):
        points, labels = _centroids(patient)
        atlases.append(Atlas(_ct(patient), points, labels, patient))
    options = MatchOptions.preset("between-patients")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = Matcher("default", device="cpu").match_atlases(atlases, [targets[0]], options)
    finally:
        torch.set_num_threads(threads)
    told, matched_in = [], []
    caplog.set_level(logging.INFO, logger="samembed.jobs")
    engine = Matcher("default", device="cpu")
    match = engine.match

    def recorded(*args, **kwargs):
        matched_in.append(threading.current_thread().name)
        return match(*args, **kwargs)

    engine.match = recorded
    torch.set_num_threads(2)
    try:
        both = engine.match_atlases(atlases, [targets[0]], options,
                                    progress=lambda *a: told.append((threading.get_ident(), a[2])))
    finally:
        torch.set_num_threads(threads)
    assert "3 atlases: the first alone, then 2 at a time" in caplog.text
    assert matched_in[0] == threading.current_thread().name and len(set(matched_in[1:])) == 2, matched_in
    assert [phase for _, phase in told][:2] == ["atlas 1/3 into target 1/1",
                                                "atlases 2-3/3, 2 at a time into target 1/1"], told
    assert len(told) == 3 and told[2][1].startswith("fused 1/1 "), told
    assert {thread for thread, _ in told} == {threading.get_ident()}
    _same_matches(both, alone)
    assert [m.per_atlas for m in both.matches] == [m.per_atlas for m in alone.matches]


def test_match_each_without_a_source_takes_only_fusions(cts):
    """A MatchCall needs the source: without one, match_each says so before any target starts."""
    from samembed import InputError

    _, targets = cts
    points, labels = _centroids(SOURCE)
    told = []
    with pytest.raises(InputError, match="needs the source image"):
        Matcher("default", device="cpu").match_each(None, targets[:1], [[MatchCall(points, labels, MatchOptions())]],
                                                    lambda i, e: told.append((i, e)))
    assert told == []


def test_a_cancel_while_targets_run_at_once_stops_them_and_keeps_what_was_told(cts):
    """A cancel set as the second target ends: the targets in flight stop at their next tile, no target starts after
    it, and :class:`Cancelled` is raised; the targets told as matched are the caller's."""
    source, targets = cts
    points, labels = _centroids(SOURCE, 1)
    images = [*targets, *targets[::-1]]  # six targets (three of them again: found in the cache, then recomputed)
    cancel = threading.Event()
    events: list[tuple[int, object]] = []

    def told(i: int, event) -> None:
        events.append((i, event))
        if event is not None and sum(e is not None for _, e in events) == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        match_each(Matcher("default", device="cpu"), source, [lambda im=im: im for im in images],
                   [[MatchCall(points, labels, MatchOptions())]] * len(images), told, jobs=2, cancel=cancel)
    stopped_at = [k for k in range(len(events)) if sum(e is not None for _, e in events[:k + 1]) == 2][0]
    assert all(e is not None for _, e in events[stopped_at:]), f"a target started after the cancel: {events}"
    assert sum(e is None for _, e in events) < len(images), events


def test_the_matchers_match_each_tells_every_target_in_the_callers_thread_and_stops_when_told_to(cts):
    """``Matcher.match_each`` runs :func:`match_each` in a thread of its own and tells each target in the caller's
    thread (the Slicer module writes MRML there); targets given as images or as functions that read one. What the
    caller's ``on_target`` raises stops the job and is raised (the caller's own cancel event is left as it was); a
    cancel set in ``on_target`` after a target is seen before the next target starts."""
    source, targets = cts
    points, labels = _centroids(SOURCE, 1)
    engine = Matcher("default", device="cpu")
    threads, events = set(), []

    def told(i: int, event) -> None:
        threads.add(threading.get_ident())
        events.append((i, event))

    engine.match_each(source, [targets[0], lambda: targets[1]], [[MatchCall(points, labels, MatchOptions())]] * 2,
                      told, jobs=2)
    assert threads == {threading.get_ident()}
    assert [(i, e is None) for i, e in events] == [(0, True), (0, False), (1, True), (1, False)]
    _same_matches(events[1][1][0], engine.match(source, points, [targets[0]], labels))

    cancel, seen = threading.Event(), []

    def refuse(i: int, event) -> None:
        seen.append((i, event))
        if event is not None:
            raise RuntimeError("the caller's own failure")

    with pytest.raises(RuntimeError, match="the caller's own failure"):
        engine.match_each(source, list(targets), [[MatchCall(points, labels, MatchOptions())]] * len(targets), refuse,
                          jobs=2, cancel=cancel)
    assert not cancel.is_set() and seen[-1][1] is not None and len(seen) == 2, seen

    seen.clear()

    def cancel_after_the_first(i: int, event) -> None:
        seen.append((i, event))
        if event is not None:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.match_each(source, list(targets), [[MatchCall(points, labels, MatchOptions())]] * len(targets),
                          cancel_after_the_first, jobs=1, cancel=cancel)
    assert [(i, e is None) for i, e in seen] == [(0, True), (0, False)], seen


def test_match_each_stops_where_the_caller_says_and_never_hangs(cts):
    """The caller's cancel: set before the start, nothing starts; set as the last target is told, nothing is left undone
    and nothing is raised; set as the second target starts, no other target starts after it (the one in flight stops
    or is told). An ``on_target`` that raises while the other thread waits to tell its target ends the job promptly (run in a
    thread here, so that a hang fails the test instead of holding it)."""
    source, targets = cts
    points, labels = _centroids(SOURCE, 1)
    engine = Matcher("default", device="cpu")
    one = [MatchCall(points, labels, MatchOptions())]
    cancel, seen = threading.Event(), []

    cancel.set()
    with pytest.raises(Cancelled):
        engine.match_each(source, targets[:1], [one], lambda *e: seen.append(e), cancel=cancel)
    assert seen == []

    cancel.clear()

    def cancel_at_the_last(i: int, event) -> None:
        seen.append((i, event))
        if i == 1 and event is not None:
            cancel.set()

    engine.match_each(source, targets[:2], [one] * 2, cancel_at_the_last, jobs=2, cancel=cancel)
    assert [(i, e is None) for i, e in seen] == [(0, True), (0, False), (1, True), (1, False)]

    cancel.clear()
    seen.clear()
    images = [*targets, *targets]

    def cancel_as_the_second_starts(i: int, event) -> None:
        seen.append((i, event))
        if i > 0 and event is None:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.match_each(source, images, [one] * len(images), cancel_as_the_second_starts, jobs=2, cancel=cancel)
    started = [i for i, e in seen if e is None]
    assert started[0] == 0 and len(started) == 2 and started[1] in (1, 2), seen  # whichever of the two came first

    outcome: list = []

    def refuse_the_second_result(i: int, event) -> None:
        if event is not None and i > 0:
            raise RuntimeError("the caller's own failure")

    def run() -> None:
        try:
            engine.match_each(source, images, [one] * len(images), refuse_the_second_result, jobs=2)
        except RuntimeError as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(300)
    assert not thread.is_alive(), "match_each did not return after on_target raised"
    assert [str(e) for e in outcome] == ["the caller's own failure"]


@pytest.mark.needs_data
def test_a_new_source_and_its_first_target_are_embedded_at_once_with_the_same_matches(cts, monkeypatch, tmp_path):
    """On two threads, a source in neither cache has its maps made beside the first target's, in a thread of that
    target's own (one of torch's threads each; both back to two after): the matches are those of embedding one after
    the other, bit for bit. A source already held (memory or disk cache) is embedded alone, and so is a source
    matched into itself or into a target already held. The first target's reading error is its own (a TargetError
    naming it, at index 0), raised once the source is embedded, and torch's threads are back to two after it."""
    from samembed.embedding import Embedder

    source, targets = cts
    points, labels = _centroids(SOURCE)
    embedded_in: list[tuple[str, int]] = []
    embed = Embedder.embed

    def recorded(self, image, *args, **kwargs):
        embedded_in.append((threading.current_thread().name, torch.get_num_threads()))
        return embed(self, image, *args, **kwargs)

    one_after_other = Matcher("default", device="cpu")
    monkeypatch.setattr(one_after_other.embedder, "holds", lambda image: True)  # the source "held": embedded alone
    before = with_torch_threads(2, lambda: one_after_other.match(source, points, targets[:2], list(labels)))
    monkeypatch.setattr(Embedder, "embed", recorded)
    at_once = Matcher("default", device="cpu", cache_dir=tmp_path)
    got = with_torch_threads(2, lambda: at_once.match(source, points, targets[:2], list(labels)))
    _same_matches(got, before)
    here = threading.current_thread().name
    assert sorted(embedded_in[:2]) == sorted([(here, 1), ("samembed-first-target", 1)]), embedded_in
    assert embedded_in[2:] == [(here, 2)], "the second target is embedded after, on both threads"

    embedded_in.clear()  # the source in the memory cache now: alone, on both threads
    with_torch_threads(2, lambda: at_once.match(source, points, [targets[2]], list(labels)))
    assert embedded_in == [(here, 2), (here, 2)], embedded_in
    at_once.embedder.settle(at_once.embedder.embed(source, on_demand=True))  # its entry on disk
    embedded_in.clear()  # in the disk cache only (a new engine): alone too
    fresh = Matcher("default", device="cpu", cache_dir=tmp_path)
    with_torch_threads(2, lambda: fresh.match(source, points, [targets[2]], list(labels)))
    assert embedded_in[0] == (here, 2), embedded_in

    missing = tmp_path / "missing_ct.nii.gz"
    new_source = Image(source.array[::-1].copy(), source.grid, "flipped source")  # in neither cache
    embedded_in.clear()

    def unreadable_first_target() -> int:
        with pytest.raises(TargetError, match="missing_ct") as raised:
            Matcher("default", device="cpu").match(new_source, points, [str(missing)], list(labels))
        assert raised.value.target_index == 0
        return torch.get_num_threads()

    assert with_torch_threads(2, unreadable_first_target) == 2, "torch's threads not restored after the error"
    assert embedded_in == [(here, 1)], "the source is embedded (beside the failed reading) before the error"

    def embedded_alone(engine: Matcher, new: Image, into: Image) -> None:
        embedded_in.clear()
        with_torch_threads(2, functools.partial(engine.match, new, points, [into], list(labels)))
        assert [t for t in embedded_in if t[0] != here] == [], embedded_in
        assert embedded_in[0] == (here, 2), "the source embedded alone, on both threads"

    embedded_alone(Matcher("default", device="cpu"), new_source, new_source)  # the source matched into itself
    held = Matcher("default", device="cpu")
    held.embedder.embed(targets[0], on_demand=True)  # a new source into a target already held
    embedded_alone(held, Image(source.array[:, ::-1].copy(), source.grid, "other"), targets[0])


_TWO_INTERRUPTS = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job has it ignored)
sys.path.insert(0, {engine!r})
{body}
for delay in (0.3, 0.6):  # Ctrl-C, then Ctrl-C again while the first is being handled
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
start = time.monotonic()
try:
    run()
    print("returned")
except KeyboardInterrupt:
    print("raised after", round(time.monotonic() - start, 2), "still running", sorted(running), "finished",
          sorted(finished))
"""


def _after_two_interrupts(body: str) -> str:
    """The line a script prints after ``run()`` (defined in ``body``, with its sets ``running`` and ``finished``) was
    interrupted twice, 0.3 s apart, by SIGINT."""
    import subprocess
    import sys
    from pathlib import Path

    engine = str(Path(__file__).resolve().parents[2] / "SAMEmbedding")
    code = _TWO_INTERRUPTS.format(engine=engine, body=body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr


def test_targets_in_flight_are_waited_for_through_a_second_interrupt():
    """A second Ctrl-C while each_target waited for the targets in flight made it return while one still ran: in this
    Python a thread join that a signal interrupts takes the thread for ended (bpo-45274). The late target then put
    its result among those the command was writing, and one target's heatmaps were saved under another's name (a
    review). It now waits for their futures."""
    line = _after_two_interrupts("""
import torch
from samembed.jobs import each_target
running, finished = set(), set()
def work(i):  # target 0 alone, then 1 (2 s) and 2 (0.5 s) at once
    running.add(i); time.sleep({0: 0.05, 1: 2.0, 2: 0.5}[i]); finished.add(i); running.discard(i)
    return True
def run():
    each_target(3, work, 2, threading.Event())
""")
    assert line.startswith("raised after"), line
    assert "still running []" in line and "finished [0, 1, 2]" in line, line
    assert float(line.split()[2]) >= 2.0, line


def test_match_each_returns_only_once_its_targets_are_done_through_a_second_interrupt():
    """The same for Matcher.match_each, which waited for its thread by joining it."""
    line = _after_two_interrupts("""
import samembed.api as api
running, finished = set(), set()
def targets(*args, **kwargs):  # the targets in flight, 2 s
    running.add(1); time.sleep(2.0); finished.add(1); running.discard(1)
api._match_each_in_threads = targets
def run():
    api.Matcher.__new__(api.Matcher).match_each(None, [], [], lambda i, event: None)
""")
    assert line.startswith("raised after"), line
    assert "still running []" in line and "finished [1]" in line, line
    assert float(line.split()[2]) >= 2.0, line


def test_overlapping_concurrent_matching_blocks_give_back_the_thread_count_of_before_the_first():
    """Two callers' blocks that overlap (one opened, the other opened, the first closed, the other closed) left
    torch at one thread for the rest of the process: each restored the count it found, the second's being the
    first's one thread."""
    import torch

    from samembed.embedding import concurrent_matching

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = concurrent_matching(1), concurrent_matching(1)
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 1  # (the second still runs with what it asked for)
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
