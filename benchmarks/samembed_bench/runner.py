"""Run point-transfer methods on benchmark cases and write the report (markdown, CSV, error-CDF PNGs).

Methods (names used on the command line and in the tables):

``sam``
    SAMEmbedding ``Matcher.match`` with ``MatchOptions(refine=False, polish=False)`` (the other settings: the base
    options given to :func:`run_cases`, by default ``MatchOptions()``). Time per pair = the match call with both
    images' embeddings already cached (all queries of the pair, the affine prior's fit included);
    ``with_embedding_s`` adds the first-time embedding time of the source and the target (what a first pair costs).
``sam-refine``
    the same with ``refine=True``.
``sam-polish``
    the same with ``polish=True`` (sub-voxel intensity polish, :mod:`samembed.intensity`).
``sam-refine-polish``
    both. Each method's options: :func:`method_options`.
``centre``
    translate by the difference of the image-grid centres (:func:`~.registration.transfer_points_centre`).
``elastix-affine`` / ``elastix-bspline``
    itk-elastix registration (fixed = source, moving = target) and point transfer through the result
    transform; B-spline runs an affine stage first (:mod:`.registration`). Time = registration + transfer.

Image reading is excluded from every method's time. The pairs CSV also holds ``process_cpu_s``: the CPU
time of the whole method call (reading, and for SAMEmbedding any first-time embedding, included), a
check on wall times measured on a shared machine.

>>> from samembed_bench.cases import read_cases
>>> results = run_cases(read_cases("cache/suites/openkbp_inter/cases.json")[:1], ["centre"])  # doctest: +SKIP
>>> write_report(results, "out")                                                            # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from samembed.errors import InputError, SamEmbedError
from samembed.options import MatchOptions

from .cases import Case
from .methods import METHODS, SAM_METHOD_SETTINGS, SAM_METHODS
from .metrics import (
    PairResult,
    format_value,
    methods_in_order,
    per_label_table,
    plot_error_cdf,
    suite_table,
    summarise,
    write_pair_csv,
    write_point_csv,
)
from .suites import COMPACT_STRUCTURES, OPENKBP_STRUCTURES

log = logging.getLogger(__name__)

SUITE_NOTES = {
    "popi_synthetic": "POPI phase 00 warped by a thin-plate spline through the real 00→50 and 00→20 landmark motion "
                      "(+ intensity perturbation); 40 expert landmarks with exact ground truth.",
    "openkbp_inter": "Pairs of different OpenKBP validation patients (head and neck, ~4 × 4 × 2.5 mm); queries are organ "
                     "centroids contoured in both; origins arbitrary (not pre-aligned). SpinalCord, Esophagus and Larynx "
                     "centroids depend on how far each was contoured: judge on the compact organs.",
    "lidc_synthetic": "LIDC-IDRI-0001 under random affine (≤ 10°, ±8 %, ≤ 20 mm) + smooth elastic warps "
                      "(+ intensity perturbation); 50 points on structure, exact ground truth.",
}


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Split and validate a comma-separated method list.

    Raises:
        InputError: an unknown method name.
    """
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise InputError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(items))


def method_options(method: str, base: MatchOptions | None = None) -> MatchOptions:
    """The one :class:`~samembed.options.MatchOptions` value a SAMEmbedding method matches with.

    Args:
        method: a name from :data:`SAM_METHODS`.
        base: the settings the method does not fix (search window, consistency, ...); default ``MatchOptions()``.

    >>> method_options("sam-polish").polish, method_options("sam").polish
    (True, False)
    >>> method_options("sam", MatchOptions(prior_window_mm=0)).prior_window_mm
    0
    """
    if method not in SAM_METHOD_SETTINGS:
        raise InputError(f"{method!r} is not a SAMEmbedding method; choose from {', '.join(SAM_METHODS)}")
    return (base or MatchOptions()).replace(**SAM_METHOD_SETTINGS[method])


class SamMethod:
    """SAMEmbedding as a benchmark method, with embedding-time bookkeeping.

    Args:
        model: model name, checkpoint path or ``random:<arch>`` (see :class:`samembed.Matcher`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        cache_dir: on-disk embedding cache (embeddings are computed once across runs), or None.
        options: the base match settings of every method (see :func:`method_options`), e.g.
            ``MatchOptions(prior_window_mm=0)``; default ``MatchOptions()``.
    """

    def __init__(self, model: str = "default", device: str = "cpu", cache_dir: str | None = None,
                 options: MatchOptions | None = None) -> None:
        from samembed.api import Matcher

        self.matcher = Matcher(model=model, device=device, cache_dir=cache_dir)
        self.options = options or MatchOptions()
        self.model_id = self.matcher.model.model_id
        self.embed_seconds: dict[str, float] = {}

    def _embed(self, image, key: str) -> None:
        t0 = time.perf_counter()
        self.matcher.embed(image)
        self.embed_seconds.setdefault(key, time.perf_counter() - t0)  # the first call computes

    def run(self, case: Case, method: str) -> PairResult:
        """Match the case's queries with ``method`` (from :data:`SAM_METHODS`); predictions and times (see the
        module docstring)."""
        options = method_options(method, self.options)
        from samembed.io import read_image

        src, tgt = read_image(case.source), read_image(case.target)
        self._embed(src, str(case.source))
        self._embed(tgt, str(case.target))
        self.matcher.clear_priors()  # every method pays for its own affine prior, whatever ran before
        t0 = time.perf_counter()
        res = self.matcher.match(src, case.query_points_lps_mm, [tgt], labels=case.labels, options=options)
        cached = time.perf_counter() - t0
        pred = np.array([m.point_lps_mm for m in res.matches], dtype=np.float64)
        scores = np.array([m.score for m in res.matches], dtype=np.float64)
        first = self.embed_seconds[str(case.source)] + self.embed_seconds[str(case.target)] + cached
        return PairResult(case.suite, case.case_id, method, case.labels, case.query_points_lps_mm,
                          case.truth_points_lps_mm, pred, cached,
                          {"cached_s": cached, "with_embedding_s": first,
                           "source_embed_s": self.embed_seconds[str(case.source)],
                           "target_embed_s": self.embed_seconds[str(case.target)]}, scores)


def _failed(case: Case, method: str, message: str, seconds: float = float("nan")) -> PairResult:
    nan = np.full_like(case.truth_points_lps_mm, np.nan)
    return PairResult(case.suite, case.case_id, method, case.labels, case.query_points_lps_mm,
                      case.truth_points_lps_mm, nan, seconds, {}, None, message)


def run_cases(cases: Sequence[Case], methods: Sequence[str], *, model: str = "default", device: str = "cpu",
              elastix_threads: int | None = None, elastix_options: dict | None = None,
              progress: Callable[[int, int, str], None] | None = None, cache_dir: str | None = None,
              options: MatchOptions | None = None, results: list[PairResult] | None = None) -> list[PairResult]:
    """Run every method on every case.

    A method failing on one pair (e.g. a query outside the image, a registration error) is recorded as a
    failure with NaN predictions and does not stop the run. Each result is appended to ``results`` (a list the
    caller holds, when given) as it finishes, so a run stopped by Ctrl-C or SIGTERM keeps what it finished.

    Args:
        cases: the benchmark cases.
        methods: names from :data:`METHODS`.
        model: SAMEmbedding model for ``sam`` / ``sam-refine``.
        device: torch device for SAMEmbedding.
        elastix_threads: threads for elastix (None: ``$SAMEMBED_ELASTIX_THREADS`` or ITK's default).
        elastix_options: extra keyword arguments for :func:`~.registration.elastix_parameter_maps`.
        progress: called as ``progress(done, total, message)`` after each (case, method).
        cache_dir, options: see :class:`SamMethod` (``options``: the base settings of the SAMEmbedding methods).
        results: the list to append to (default: a new one).

    Returns:
        ``results``: one :class:`PairResult` per (case, method), case-major.

    Raises:
        InputError: unknown methods, or a SAMEmbedding model that cannot be loaded.
    """
    from .registration import transfer_points_centre, transfer_points_elastix

    methods = parse_methods(methods)
    sam = SamMethod(model, device, cache_dir, options) if any(m.startswith("sam") for m in methods) else None
    results = [] if results is None else results
    total, done = len(cases) * len(methods), 0
    for case in cases:
        for method in methods:
            cpu0 = time.process_time()
            try:
                if method in SAM_METHODS:
                    r = sam.run(case, method)
                elif method == "centre":
                    pred, sec = transfer_points_centre(case.source, case.target, case.query_points_lps_mm)
                    r = PairResult(case.suite, case.case_id, method, case.labels, case.query_points_lps_mm,
                                   case.truth_points_lps_mm, pred, sec)
                else:
                    mode = method.split("-", 1)[1]
                    pred, sec = transfer_points_elastix(case.source, case.target, case.query_points_lps_mm, mode,
                                                        threads=elastix_threads, **(elastix_options or {}))
                    r = PairResult(case.suite, case.case_id, method, case.labels, case.query_points_lps_mm,
                                   case.truth_points_lps_mm, pred, sec)
            except (SamEmbedError, RuntimeError, ValueError) as e:
                log.warning("%s %s: failed: %s", case.key, method, e)
                r = _failed(case, method, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            r.timings.setdefault("process_cpu_s", time.process_time() - cpu0)
            results.append(r)
            done += 1
            e = r.errors_mm
            log.info("[%d/%d] %s %-15s mean %.1f mm, %.2f s", done, total, case.key, method,
                     float(np.nanmean(e)) if np.isfinite(e).any() else float("nan"), r.seconds)
            if progress:
                progress(done, total, f"{case.key} {method}")
    return results


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _point_errors(results: Sequence[PairResult], suite: str, method: str,
                  labels: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
    """``method``'s error (mm; NaN where it failed) at each (case, label) of ``suite`` (of ``labels``)."""
    return {(r.case_id, lab): float(err) for r in results if r.suite == suite and r.method == method
            for lab, err in zip(r.labels, r.errors_mm) if labels is None or lab in labels}


def _paired_comparison(results: Sequence[PairResult], suite: str, a: str, b: str,
                       labels: Sequence[str] | None = None) -> tuple[float, float, int, int, int]:
    """The mean errors (mm) of methods ``a`` and ``b`` over the points both found, that count, and how many points
    each did not find (a failure): a method is never compared over fewer, easier points than the other."""
    ea, eb = _point_errors(results, suite, a, labels), _point_errors(results, suite, b, labels)
    both = [k for k in ea if k in eb and np.isfinite(ea[k]) and np.isfinite(eb[k])]
    failed_a = sum(1 for v in ea.values() if not np.isfinite(v))
    failed_b = sum(1 for v in eb.values() if not np.isfinite(v))
    def mean(errors: dict[tuple[str, str], float]) -> float:
        return float(np.mean([errors[k] for k in both])) if both else float("nan")

    return mean(ea), mean(eb), len(both), failed_a, failed_b


def _verdict(met: bool, sam: str, failed_sam: int, failed_other: int, other: str) -> str:
    """"met" / "NOT met", or "undetermined" when a compared method failed points (their errors are unknown)."""
    if failed_sam or failed_other:
        return (f"undetermined ({sam} failed {failed_sam} point(s), {other} {failed_other}; compared on the points "
                f"both found, where it is {'met' if met else 'NOT met'})")
    return "met" if met else "NOT met"


def _mean_time(results: Sequence[PairResult], method: str) -> float:
    t = [r.seconds for r in results if r.method == method and np.isfinite(r.seconds) and r.error is None]
    return float(np.mean(t)) if t else float("nan")


def target_checks(results: Sequence[PairResult]) -> list[str]:
    """The issue's targets as markdown bullet lines (only those whose methods and suites were run).

    * openkbp_inter: SAMEmbedding mean error below elastix affine + B-spline (all structures, and compact organs);
    * popi_synthetic: SAMEmbedding mean error within 1.5 x elastix B-spline's;
    * speed: SAMEmbedding per pair (embeddings cached) at least 20 x faster than elastix B-spline.
    """
    lines = []
    suites = {r.suite for r in results}
    methods = set(methods_in_order(results))
    if "elastix-bspline" not in methods:
        return lines
    for sam in [m for m in SAM_METHODS if m in methods]:
        if "openkbp_inter" in suites:
            for name, labels in (("all structures", None), ("compact organs", COMPACT_STRUCTURES)):
                a, b, n, fa, fb = _paired_comparison(results, "openkbp_inter", sam, "elastix-bspline", labels)
                ok = _verdict(a < b, sam, fa, fb, "elastix-bspline")
                lines.append(f"- openkbp_inter, {name}: {sam} {a:.1f} mm vs elastix-bspline {b:.1f} mm over {n} "
                             f"points → {ok}")
        if "popi_synthetic" in suites:
            a, b, n, fa, fb = _paired_comparison(results, "popi_synthetic", sam, "elastix-bspline")
            ok = _verdict(a <= 1.5 * b, sam, fa, fb, "elastix-bspline")
            lines.append(f"- popi_synthetic: {sam} {a:.1f} mm vs 1.5 × elastix-bspline = {1.5 * b:.1f} mm over {n} "
                         f"points → {ok}")
        ts, te = _mean_time(results, sam), _mean_time(results, "elastix-bspline")
        if np.isfinite(ts) and np.isfinite(te) and ts > 0:
            ok = "met" if te / ts >= 20 else "NOT met"
            per_suite = []
            for suite in sorted(suites):
                sub = [r for r in results if r.suite == suite]
                s_sam, s_el = _mean_time(sub, sam), _mean_time(sub, "elastix-bspline")
                if np.isfinite(s_sam) and np.isfinite(s_el) and s_sam > 0:
                    per_suite.append(f"{suite} {s_el / s_sam:.0f} ×{'' if s_el / s_sam >= 20 else ' (below 20 ×)'}")
            detail = f"; per suite: {', '.join(per_suite)}" if len(per_suite) > 1 else ""
            lines.append(f"- speed: {sam} {ts:.2f} s/pair (embeddings cached) vs elastix-bspline {te:.1f} s/pair: "
                         f"{te / ts:.0f} × faster over all pairs (target ≥ 20 ×) → {ok}{detail}")
    return lines


def environment_info(model_id: str | None = None, elastix_threads: int | None = None) -> dict:
    """Machine facts for the report header: date, CPU, thread counts, library versions."""
    info = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["itk-elastix"] = version("itk-elastix")
    except Exception:  # noqa: BLE001 - not installed or no metadata
        pass
    info["elastix threads"] = str(elastix_threads or os.environ.get("SAMEMBED_ELASTIX_THREADS") or "ITK default")
    if model_id:
        info["model"] = model_id
    return info


def model_training_facts(model: str, images: Sequence[str | os.PathLike]) -> tuple[str | None, list[str]]:
    """What a report says of the model ``model`` (a registered name or a checkpoint path) and which of ``images``
    it was trained on: ``(its file, iteration and SHA-256 prefix, or None for a model without a file;
    the images among its training data)``. The training data are the checkpoint's ``training_sources`` when it
    lists them (a final model), else its config's ``data`` folders less its ``exclude`` patterns (a snapshot),
    matched by the folders' trailing names, so that data moved to another machine still match. An error measured on
    a training image says less about scans the model never saw (a review: nothing said so)."""
    import hashlib

    from samembed.registry import checkpoint_header, find_entry

    entry = find_entry(model)
    if entry is not None and entry.get("file"):
        from samembed.models import models_dir

        path = models_dir() / entry["file"]
    else:
        path = Path(model)
    if not path.is_file():
        return None, []
    header = checkpoint_header(path) or {}
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()[:12]
    facts = f"{path.name}, iteration {header.get('iteration', '?')}, SHA-256 {digest}"
    sources = [str(f) for f in header.get("training_sources") or []]
    if sources:
        known = {os.path.realpath(f) for f in sources} | {Path(f).name for f in sources}
        return facts, sorted({str(im) for im in images
                              if os.path.realpath(im) in known or Path(im).name in known})
    config = header.get("train_config") or {}
    from samembed.training.data import exclusion

    excluded = exclusion(list(config.get("exclude") or []), Path.cwd())
    tails = [tuple(part for part in Path(d).parts if part not in ("..", ".", "/")) for d in config.get("data") or []]
    trained = []
    for im in dict.fromkeys(map(str, images)):
        folders = [Path(os.path.realpath(im)).parents[i].parts for i in range(len(Path(os.path.realpath(im)).parents))]
        inside = any(tail and folder[-len(tail):] == tail for tail in tails for folder in folders)
        if inside and excluded(Path(im)) is None:
            trained.append(im)
    return facts, sorted(trained)


def write_report(results: Sequence[PairResult], out_dir: str | os.PathLike, stem: str = "landmarks",
                 title: str = "Landmark matching benchmark", info: dict | None = None) -> Path:
    """Write ``<stem>.md`` (tables per suite), ``<stem>_points.csv``, ``<stem>_pairs.csv`` and ``<stem>_<suite>_cdf.png``.

    Returns:
        The markdown file's path.
    """
    from samembed.io import write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not results:
        raise InputError("no results to report")
    write_point_csv(results, out_dir / f"{stem}_points.csv")
    write_pair_csv(results, out_dir / f"{stem}_pairs.csv")
    md = [f"# {title}", ""]
    for k, v in (info or {}).items():
        md.append(f"- {k}: {v}")
    md += ["", "Errors are Euclidean distances (mm) between the predicted and the true target point. "
           "Time per pair excludes image reading; for SAMEmbedding it is the match call with both embeddings cached "
           "(all queries of the pair), and the first-pair time including both embeddings is given in brackets. "
           "elastix time is registration + point transfer.", ""]
    suites = list(dict.fromkeys(r.suite for r in results))
    for suite in suites:
        rs = [r for r in results if r.suite == suite]
        n_pairs = len({r.case_id for r in rs})
        md += [f"## {suite} ({n_pairs} pairs)", ""]
        if suite in SUITE_NOTES:
            md += [SUITE_NOTES[suite], ""]
        md += [suite_table(rs), ""]
        if suite == "openkbp_inter":
            md += ["Mean error (mm) per structure:", "", per_label_table(rs, label_order=OPENKBP_STRUCTURES), ""]
            compact = rs
            rows = ["| method | compact organs mean (mm) | compact organs median (mm) |", "|---|---:|---:|"]
            for m in methods_in_order(compact):
                e = [err for r in compact if r.method == m for lab, err in zip(r.labels, r.errors_mm) if lab in COMPACT_STRUCTURES]
                s = summarise(e)
                failed = f" ({s.n_failed} failed)" if s.n_failed else ""
                rows.append(f"| {m} | {format_value(s.mean_mm)}{failed} | {format_value(s.median_mm)} |")
            md += ["Compact organs (" + ", ".join(COMPACT_STRUCTURES) + "):", "", *rows, ""]
        png = plot_error_cdf(rs, out_dir / f"{stem}_{suite}_cdf.png", title=f"{suite}: error CDF")
        md += [f"![{suite} error CDF]({png.name})", ""]
        failures = [r for r in rs if r.error]
        if failures:
            md += ["Failures:", ""] + [f"- {r.case_id} {r.method}: {r.error}" for r in failures] + [""]
    checks = target_checks(results)
    if checks:
        md += ["## Targets", ""] + checks + [""]
    return write_text_atomic(out_dir / f"{stem}.md", "\n".join(md))
