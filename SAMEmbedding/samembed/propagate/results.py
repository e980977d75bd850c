"""The output folder of a run: per-scan files written as each scan arrives, the combined tables, ``run.json``,
and what ``--resume`` may skip.

Layout of ``OUT``::

    run.json                 settings, versions, model hash, fingerprint, counts, status
    matches.csv              one row per scan and landmark (LPS mm), in manifest order; a missing number (the
                             correlation of a match that was not polished) is an empty cell
    failures.csv             scan, path, reason
    scans/<id>.mrk.json      the landmarks on that scan (Slicer markups)
    scans/<id>.json          the scan's record: fingerprint, matches, timings (written last: it marks the scan done)
    thumbs/<id>/<label>.png  axial | coronal crops around each landmark
    report.html              the review report
    cache/                   the atlas embedding (the workers load it from here)
    superseded/              on --resume with other settings (or a scan file written again): the earlier results of
                             the scans to redo (scans/<id>.*, thumbs/<id>/), set aside until each is redone, so that
                             scans/ holds this run's results only, also when the run is interrupted; a resume with
                             their settings takes them back

Every file is written atomically (a temporary file renamed into place), so an interrupted run leaves either
the old or the new version of a file, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from ..errors import InputError
from ..io import (
    DISTANCE_DECIMALS,
    POSITION_DECIMALS,
    SCORE_DECIMALS,
    PointList,
    csv_number,
    write_points,
    write_text_atomic,
)
from ..names import joined_names, label_ids
from ..result import markups_description
from .manifest import Scan, file_stamp, same_scan_path

log = logging.getLogger(__name__)

MATCH_COLUMNS = ("scan", "path", "label", "x", "y", "z", "score", "confident", "roundtrip_mm", "rematched",
                 "polished", "ncc", "atlases", "agreeing", "spread_mm", "rejected", "frame")


#: a match's numbers that may be NaN (or infinite): null in a scan's JSON record, NaN once read
MATCH_NUMBERS = ("score", "roundtrip_mm", "ncc", "spread_mm", "x", "y", "z")


def _strict_json(value):
    """``value`` with every NaN or infinite float as None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


class ResultStore:
    """Reads and writes one run's output folder (see the module docstring for the layout)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        self.scans_dir = self.out / "scans"
        self.thumbs_dir = self.out / "thumbs"
        self.superseded_dir = self.out / "superseded"
        self.records: dict[str, dict] = {}
        self._tables_written = 0.0
        #: the scans of the last :meth:`plan` whose records were finished with other settings or of another file
        self.stale_ids: list[str] = []

    # ------------------------------------------------------------------------------------------ reading
    def has_results(self) -> bool:
        """Whether the folder already holds scan records (of this or another run)."""
        return self.scans_dir.is_dir() and any(not p.name.startswith(".") for p in self.scans_dir.glob("*.json"))

    #: the files of a run at the folder's top, which a run writes over
    RUN_FILES = ("run.json", "matches.csv", "failures.csv", "report.html")

    def files_in_the_way(self) -> list[str]:
        """The files a new run would write over: scan records (``scans/``) and :data:`RUN_FILES` found in the
        folder (of another run, or the user's own)."""
        held = ["scans/"] if self.has_results() else []
        return held + [name for name in self.RUN_FILES if (self.out / name).exists()]

    def inputs_in_the_way(self, inputs: list[str]) -> list[str]:
        """The ``inputs`` (scans, atlas images and point files) that lie where a run writes: in its ``scans/``,
        ``thumbs/`` or ``superseded/`` folder, or as one of :data:`RUN_FILES`. A scan's own annotation
        (``OUT/scans/pt_2.mrk.json`` beside ``OUT/scans/pt_2.nii.gz``) was replaced by its matches (a review)."""
        folders = [Path(os.path.realpath(f)) for f in (self.scans_dir, self.thumbs_dir, self.superseded_dir)]
        files = {os.path.realpath(self.out / name) for name in self.RUN_FILES}
        return [p for p in inputs if p and (os.path.realpath(p) in files
                                            or any(Path(os.path.realpath(p)).is_relative_to(f) for f in folders))]

    def load(self, scans_dir: Path | None = None) -> dict[str, dict]:
        """Every readable scan record in the folder (or in ``scans_dir``: the set-aside ones,
        ``superseded/scans``), by scan id (damaged ones are ignored: redone on resume)."""
        scans_dir = self.scans_dir if scans_dir is None else scans_dir
        out = {}
        for path in sorted(scans_dir.glob("*.json")) if scans_dir.is_dir() else []:
            if path.name.endswith(".mrk.json") or path.name.startswith("."):  # (a temporary file left by a kill)
                continue
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                for m in rec.get("matches", ()):
                    for key in MATCH_NUMBERS:
                        if key in m and m[key] is None:
                            m[key] = math.nan
                out[rec["scan"]] = rec
            except (OSError, ValueError, KeyError) as e:
                log.warning("%s: unreadable scan record (%s); the scan is done again", path, e)
        return out

    def plan(self, scans: list[Scan], fingerprint: str) -> tuple[list[Scan], int, int]:
        """Which scans still need matching: ``(todo, skipped, stale)``.

        A scan is skipped when its record says it finished (status ok) with the same fingerprint and path, and its
        file is the one matched (the same size and modification time, where both are known here: a scan written
        again in place is matched again); a failed scan is tried again; ``stale`` counts records made with other
        settings or of another file (redone).

        A scan whose result was set aside (``superseded/``, :meth:`set_aside_stale`) by a run with other settings
        that did not redo it, and whose set-aside result is of these settings and this file, gets it back (the
        other settings' result, if any, is set aside in its place) and is skipped: going back to the settings of a
        run after a stopped run with others costs nothing.
        """
        old, aside = self.load(), self.load(self.superseded_dir / "scans")
        todo, skipped, stale = [], 0, 0
        self.stale_ids = []
        for s in scans:
            rec = old.get(s.id)
            if self._finished_here(rec, s, fingerprint):
                self.records[s.id] = rec
                skipped += 1
                continue
            if self._finished_here(aside.get(s.id), s, fingerprint):
                self._swap_with_set_aside(s.id)
                self.records[s.id] = aside[s.id]
                skipped += 1
                continue
            if rec and rec.get("status") == "ok":
                stale += 1
                self.stale_ids.append(s.id)
            todo.append(s)
        return todo, skipped, stale

    @staticmethod
    def _finished_here(rec: dict | None, scan: Scan, fingerprint: str) -> bool:
        """Record ``rec`` is of ``scan`` finished with these settings (``fingerprint``), from its path and its file
        as it is now (the same size and modification time, where both are known here)."""
        if not rec or rec.get("status") != "ok" or rec.get("fingerprint") != fingerprint:
            return False
        stamp = rec.get("file")
        return same_scan_path(rec.get("path"), scan.path) and (stamp is None or file_stamp(scan.path) in (None, stamp))

    def _swap_with_set_aside(self, sid: str) -> None:
        """Give scan ``sid`` its set-aside result back; the result in ``scans/`` (other settings), if any, is set
        aside in its place, through a folder of its own so that neither is written over."""
        swap = self.superseded_dir / ".swap"
        here, there, between = (self._files_of(root, sid) for root in (self.out, self.superseded_dir, swap))
        for a, b, c in zip(here, there, between):
            if a.exists():
                c.parent.mkdir(parents=True, exist_ok=True)
                os.replace(a, c)
            if b.exists():
                a.parent.mkdir(parents=True, exist_ok=True)
                os.replace(b, a)
            if c.exists():
                os.replace(c, b)

    def _files_of(self, root: Path, sid: str) -> list[Path]:
        """Scan ``sid``'s files under ``root`` (the folder, or :attr:`superseded_dir`): its record first (it marks
        the scan done), its markups file, its thumbnails' folder."""
        return [root / "scans" / f"{sid}.json", root / "scans" / f"{sid}.mrk.json", root / "thumbs" / sid]

    def set_aside_stale(self) -> int:
        """Move the files of the last :meth:`plan`'s stale scans (finished with other settings, or of a file written
        again since) into ``superseded/`` until each is redone: ``scans/`` then holds this run's results only, also
        if the run stops before it has redone them all. Nothing is deleted: a stale scan the run cannot redo keeps
        its earlier result there. Returns how many scans were set aside."""
        moved = 0
        for sid in self.stale_ids:
            for src, dst in zip(self._files_of(self.out, sid), self._files_of(self.superseded_dir, sid)):
                if not src.exists():
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.is_dir():  # an older set-aside copy of the same scan: this one is newer
                    shutil.rmtree(dst)
                os.replace(src, dst)
            moved += 1
        return moved

    def _drop_superseded(self, sid: str) -> None:
        """Scan ``sid`` is redone: its earlier result, set aside, goes (as a run writes over a result it redoes). A
        file that cannot be removed (held open elsewhere) stays, with a warning: the run goes on."""
        for path in self._files_of(self.superseded_dir, sid):
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("%s: the earlier result of %s could not be removed (%s); it stays", path, sid, e)

    # ------------------------------------------------------------------------------------------ writing
    def add(self, record: dict, fingerprint: str, ras: bool = False) -> dict:
        """Write one scan's files now: thumbnails, ``.mrk.json``, then its record (which marks it done)."""
        record = dict(record)
        record["fingerprint"] = fingerprint
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        sid = record["scan"]
        self.scans_dir.mkdir(parents=True, exist_ok=True)
        thumbs = record.pop("thumbnails", None) or {}
        if record["status"] == "ok":
            names = {}
            if thumbs:
                folder = self.thumbs_dir / sid
                folder.mkdir(parents=True, exist_ok=True)
                files = label_ids(list(thumbs))  # labels that differ only in characters a file name cannot hold
                for label, png in thumbs.items():
                    path = folder / f"{files[label]}.png"
                    from ..io import atomic_path

                    with atomic_path(path) as tmp:
                        tmp.write_bytes(png)
                    names[label] = str(path.relative_to(self.out))
            for m in record["matches"]:
                m["thumbnail"] = names.get(m["label"])
            ms = record["matches"]
            pl = PointList([m["label"] for m in ms], [[m["x"], m["y"], m["z"]] for m in ms],
                           [markups_description(m, m.get("rejected", ())) for m in ms])
            write_points(pl, self.scans_dir / f"{sid}.mrk.json", ras=ras)
        # strict JSON (NaN, as where no polish ran, is not JSON: other readers refuse the file): null, read back as NaN
        write_text_atomic(self.scans_dir / f"{sid}.json", json.dumps(_strict_json(record), indent=1, allow_nan=False))
        self.records[sid] = record
        if record["status"] == "ok":  # (a scan that fails now keeps its earlier result set aside)
            self._drop_superseded(sid)
        return record

    def write_tables(self, scans: list[Scan], force: bool = True, every_s: float = 0.0) -> None:
        """Rewrite ``matches.csv`` and ``failures.csv`` (manifest order) atomically; unless ``force``, at most
        every ``every_s`` seconds."""
        if not force and time.time() - self._tables_written < every_s:
            return
        self._tables_written = time.time()
        mbuf, fbuf = io.StringIO(), io.StringIO()
        mw, fw = csv.writer(mbuf, lineterminator="\n"), csv.writer(fbuf, lineterminator="\n")
        mw.writerow(MATCH_COLUMNS)
        fw.writerow(("scan", "path", "reason"))
        for s in scans:
            rec = self.records.get(s.id)
            if rec is None:
                continue
            if rec["status"] != "ok":
                fw.writerow((s.id, s.path, rec.get("reason", "")))
                continue
            for m in rec["matches"]:
                # the numbers as samembed match writes them; a missing one (NaN: the correlation where no polish
                # ran) as an empty cell, where the scan's JSON record holds null
                mw.writerow((s.id, s.path, m["label"], *(csv_number(m[k], POSITION_DECIMALS) for k in "xyz"),
                             csv_number(m["score"], SCORE_DECIMALS), str(m["confident"]).lower(),
                             csv_number(m["roundtrip_mm"], DISTANCE_DECIMALS), str(m["rematched"]).lower(),
                             str(m["polished"]).lower(), csv_number(m["ncc"], SCORE_DECIMALS), m.get("atlases", 1),
                             m.get("agreeing", 1), csv_number(m.get("spread_mm", 0.0), DISTANCE_DECIMALS),
                             joined_names(m.get("rejected", ())), "LPS"))  # (LPS always; the .mrk.json per --ras)
        write_text_atomic(self.out / "matches.csv", mbuf.getvalue())
        write_text_atomic(self.out / "failures.csv", fbuf.getvalue())

    def write_run(self, info: dict) -> Path:
        """Write ``run.json`` atomically."""
        return write_text_atomic(self.out / "run.json", json.dumps(info, indent=2, default=str))

    def read_run(self) -> dict:
        """The folder's ``run.json``."""
        path = self.out / "run.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read the run description ({e}); is {self.out} a propagate output folder?") from e
