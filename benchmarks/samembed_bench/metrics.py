"""Error statistics, markdown tables and error-CDF plots for the landmark benchmark.

Every error is a Euclidean distance in mm between a predicted and a true target point (LPS mm, the
target image's frame). Times are wall-clock seconds per image pair.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POINT_COLUMNS = ["suite", "case_id", "method", "label",
                 "query_x_lps_mm", "query_y_lps_mm", "query_z_lps_mm",
                 "truth_x_lps_mm", "truth_y_lps_mm", "truth_z_lps_mm",
                 "pred_x_lps_mm", "pred_y_lps_mm", "pred_z_lps_mm", "error_mm", "score"]


@dataclass
class PairResult:
    """One method's result on one case.

    Attributes:
        suite, case_id, method: identify the run.
        labels: query labels (N).
        query_points_lps_mm, truth_points_lps_mm, predicted_points_lps_mm: (N, 3) LPS mm.
        seconds: wall time for the pair (method-specific; see ``timings``).
        timings: named times in seconds, e.g. ``{"cached_s": .., "with_embedding_s": ..}``.
        scores: optional per-point scores (SAM cosine, [-1, 1]); NaN when the method has none.
        error: a message when the method failed on this pair (then predictions are NaN).
    """

    suite: str
    case_id: str
    method: str
    labels: list[str]
    query_points_lps_mm: np.ndarray
    truth_points_lps_mm: np.ndarray
    predicted_points_lps_mm: np.ndarray
    seconds: float
    timings: dict = field(default_factory=dict)
    scores: np.ndarray | None = None
    error: str | None = None

    @property
    def errors_mm(self) -> np.ndarray:
        """(N,) Euclidean distance between predicted and true target points, mm (NaN for failures)."""
        return point_errors_mm(self.predicted_points_lps_mm, self.truth_points_lps_mm)


def point_errors_mm(predicted_points_lps_mm, truth_points_lps_mm) -> np.ndarray:
    """(N,) Euclidean distances in mm between two (N, 3) LPS mm point arrays.

    >>> point_errors_mm([[0, 0, 0], [1, 1, 1]], [[3, 4, 0], [1, 1, 1]]).tolist()
    [5.0, 0.0]
    """
    a = np.asarray(predicted_points_lps_mm, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(truth_points_lps_mm, dtype=np.float64).reshape(-1, 3)
    return np.linalg.norm(a - b, axis=1)


@dataclass
class ErrorSummary:
    """Statistics of a set of point errors (mm) and pair times (s).

    Attributes:
        n_points, n_pairs: counts (failed points count in ``n_failed`` and are excluded from the statistics).
        mean_mm, median_mm, p90_mm: error statistics, mm (NaN when empty).
        within_5mm_pct, within_10mm_pct: percent of points with error <= 5 / 10 mm.
        seconds_per_pair: mean time per pair, s.
    """

    n_points: int
    n_pairs: int
    n_failed: int
    mean_mm: float
    median_mm: float
    p90_mm: float
    within_5mm_pct: float
    within_10mm_pct: float
    seconds_per_pair: float


def summarise(errors_mm: Iterable[float], seconds_per_pair: Sequence[float] = ()) -> ErrorSummary:
    """Summarise point errors (mm) and per-pair times (s). NaN errors count as failures: as misses in the shares
    within 5 and 10 mm and as errors beyond every other (infinite) in the median and P90, so a method that fails on
    the hard points is not flattered by them; the mean is over the points found (``n_failed`` says how many were
    not). The time is the mean over the pairs that have one (a failed pair's is NaN).

    P90 uses numpy's linear interpolation between order statistics.

    >>> s = summarise([1.0, 2.0, 6.0, 12.0], [2.0, 4.0])
    >>> (s.mean_mm, s.median_mm, s.within_5mm_pct, s.within_10mm_pct, s.seconds_per_pair)
    (5.25, 4.0, 50.0, 75.0, 3.0)
    >>> s = summarise([1.0, 2.0, float("nan"), float("nan")], [2.0, float("nan")])
    >>> (s.mean_mm, s.median_mm, s.p90_mm, s.within_5mm_pct, s.n_failed, s.seconds_per_pair)
    (1.5, inf, inf, 50.0, 2, 2.0)
    """
    e = np.asarray(list(errors_mm), dtype=np.float64)
    finite = np.isfinite(e)
    ok = e[finite]
    missed = np.where(finite, e, np.inf)  # a failure: beyond every error
    t = np.asarray(list(seconds_per_pair), dtype=np.float64)
    t = t[np.isfinite(t)]
    nan = float("nan")
    with np.errstate(invalid="ignore"):  # (interpolating between two infinite order statistics)
        p90 = float(np.percentile(missed, 90)) if e.size else nan
    return ErrorSummary(
        n_points=int(ok.size), n_pairs=int(t.size), n_failed=int(e.size - ok.size),
        mean_mm=float(ok.mean()) if ok.size else nan,
        median_mm=float(np.median(missed)) if e.size else nan,
        p90_mm=p90 if not math.isnan(p90) else float("inf"),
        within_5mm_pct=float(100.0 * np.mean(missed <= 5.0)) if e.size else nan,
        within_10mm_pct=float(100.0 * np.mean(missed <= 10.0)) if e.size else nan,
        seconds_per_pair=float(t.mean()) if t.size else nan,
    )


def format_value(v: float, digits: int = 1) -> str:
    """A table cell: ``v`` to ``digits`` decimals, "–" for none (NaN), "failed" for a median or P90 among failures
    (infinite)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return "failed" if math.isinf(v) else f"{v:.{digits}f}"  # (a median or P90 among failures)


def _fmt_s(v: float) -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:.2f}" if v < 10 else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def methods_in_order(results: Sequence[PairResult]) -> list[str]:
    """Method names in first-seen order."""
    seen: list[str] = []
    for r in results:
        if r.method not in seen:
            seen.append(r.method)
    return seen


def suite_table(results: Sequence[PairResult], suite: str | None = None) -> str:
    """A markdown table, one row per method: points, mean, median, P90 (mm), % <= 5 / 10 mm, s/pair.

    For methods that report ``timings["cached_s"]`` and ``timings["with_embedding_s"]`` (SAMEmbedding) the
    time column shows the cached per-pair time and the first-pair time with embedding in brackets.
    """
    rows = [r for r in results if suite is None or r.suite == suite]
    lines = ["| method | points | mean (mm) | median (mm) | P90 (mm) | ≤ 5 mm | ≤ 10 mm | s / pair |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods_in_order(rows):
        rs = [r for r in rows if r.method == m]
        s = summarise(np.concatenate([r.errors_mm for r in rs]), [r.seconds for r in rs])
        cold = [r.timings.get("with_embedding_s") for r in rs if r.timings.get("with_embedding_s") is not None]
        t = _fmt_s(s.seconds_per_pair)
        if cold:
            t += f" ({_fmt_s(float(np.mean(cold)))} first)"
        failed = f" ({s.n_failed} failed)" if s.n_failed else ""
        lines.append(f"| {m} | {s.n_points}{failed} | {format_value(s.mean_mm)} | {format_value(s.median_mm)} | {format_value(s.p90_mm)} | "
                     f"{format_value(s.within_5mm_pct, 0)} % | {format_value(s.within_10mm_pct, 0)} % | {t} |")
    return "\n".join(lines)


def per_label_table(results: Sequence[PairResult], suite: str | None = None,
                    label_order: Sequence[str] | None = None) -> str:
    """A markdown table of mean error (mm) per label (rows) and method (columns), with point counts."""
    rows = [r for r in results if suite is None or r.suite == suite]
    methods = methods_in_order(rows)
    errs: dict[tuple[str, str], list[float]] = {}
    labels: list[str] = list(label_order or [])
    for r in rows:
        for lab, e in zip(r.labels, r.errors_mm):
            errs.setdefault((lab, r.method), []).append(float(e))
            if lab not in labels:
                labels.append(lab)
    labels = [lab for lab in labels if any((lab, m) in errs for m in methods)]
    lines = ["| structure | n | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for lab in labels:
        n = max(len(errs.get((lab, m), [])) for m in methods)
        cells = []
        for m in methods:
            v = np.asarray(errs.get((lab, m), []), dtype=np.float64)
            failed = int((~np.isfinite(v)).sum())
            v = v[np.isfinite(v)]
            cells.append((format_value(float(v.mean())) if v.size else "–") + (f" ({failed} failed)" if failed else ""))
        lines.append(f"| {lab} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_point_csv(results: Sequence[PairResult], path: str | os.PathLike) -> Path:
    """Write one row per (case, method, point) with query, truth, prediction (LPS mm), error (mm), score."""
    import io

    from samembed.io import write_text_atomic

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(POINT_COLUMNS)
    for r in results:
        scores = r.scores if r.scores is not None else np.full(len(r.labels), np.nan)
        for n, lab in enumerate(r.labels):
            w.writerow([r.suite, r.case_id, r.method, lab,
                        *(f"{v:.3f}" for v in r.query_points_lps_mm[n]),
                        *(f"{v:.3f}" for v in r.truth_points_lps_mm[n]),
                        *(f"{v:.3f}" for v in r.predicted_points_lps_mm[n]),
                        f"{r.errors_mm[n]:.3f}", f"{scores[n]:.4f}"])
    return write_text_atomic(Path(path), buf.getvalue())


def write_pair_csv(results: Sequence[PairResult], path: str | os.PathLike) -> Path:
    """Write one row per (case, method): mean error (mm), seconds, named timings, error message."""
    import io

    from samembed.io import write_text_atomic

    keys = sorted({k for r in results for k in r.timings})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["suite", "case_id", "method", "n_points", "mean_error_mm", "seconds", *keys, "error"])
    for r in results:
        e = r.errors_mm
        w.writerow([r.suite, r.case_id, r.method, len(e), f"{np.nanmean(e):.3f}" if np.isfinite(e).any() else "nan",
                    f"{r.seconds:.3f}", *(f"{r.timings[k]:.3f}" if k in r.timings else "" for k in keys), r.error or ""])
    return write_text_atomic(Path(path), buf.getvalue())


def plot_error_cdf(results: Sequence[PairResult], path: str | os.PathLike, title: str = "",
                   max_mm: float | None = None) -> Path:
    """Write a PNG of the empirical cumulative distribution of point errors (mm), one curve per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    top = 0.0
    for m in methods_in_order(results):
        e = np.concatenate([r.errors_mm for r in results if r.method == m])
        n_all = e.size
        median = summarise(e).median_mm  # (failures count as misses, as the curve shows them)
        e = np.sort(e[np.isfinite(e)])
        if not e.size:
            continue
        top = max(top, float(np.percentile(e, 95)))
        y = np.arange(1, e.size + 1) / n_all * 100.0
        failed = f", {n_all - e.size} failed" if n_all > e.size else ""
        ax.step(np.concatenate([[0.0], e]), np.concatenate([[0.0], y]), where="post",
                label=f"{m} (median {format_value(median)}{' mm' if np.isfinite(median) else ''}{failed})")
    for v in (5.0, 10.0):
        ax.axvline(v, color="0.7", lw=0.8, ls="--")
    ax.set_xlim(0, max_mm or max(20.0, min(top * 1.1, 200.0)))
    ax.set_ylim(0, 100)
    ax.set_xlabel("error (mm)")
    ax.set_ylabel("points within error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:  # every pair failed: the plot says so instead of an empty legend
        ax.text(0.5, 0.5, "no finite errors: every pair failed", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    from samembed.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # (its suffix is the picture's: matplotlib picks the format from it)
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
