"""The review report ``OUT/report.html``: one self-contained page (images embedded as base64 PNG) made with
Jinja2 (``templates/report.html.j2``) and matplotlib.

It names every atlas, says what "confident" means in the run, summarises each landmark (how often confident, median
score and round trip), and with several atlases how often each atlas was rejected for each landmark (a misplaced
atlas point shows there); then it lists every scan and landmark with its score, confident flag, round-trip distance,
fusion details and whether the consistency step searched it again, least confident first; each row links to its
scan's section, which shows the axial/coronal thumbnails of every landmark; a summary plot shows the scores.
Failures are listed too. An interrupted run's page says so.
"""

from __future__ import annotations

import base64
import io
import math
import statistics
from pathlib import Path

from ..io import write_text_atomic
from .results import ResultStore

TEMPLATE = "report.html.j2"


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _score_plot(rows: list[dict], tolerance_mm: float | None = None) -> bytes:
    """PNG: histogram of scores (confident / not), and score against round-trip distance (with the round trip's
    tolerance, when one decides the flag, as a dashed line)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), dpi=90)
    a, b = fig.subplots(1, 2)
    conf = [r["score"] for r in rows if r["confident"]]
    not_conf = [r["score"] for r in rows if not r["confident"]]
    bins = 30
    a.hist([conf, not_conf], bins=bins, stacked=True, color=["#3a7", "#d54"], label=["confident", "not confident"])
    a.set_xlabel("score (mean of local and global cosine)")
    a.set_ylabel("landmarks")
    a.legend(fontsize=8)
    rt = [min(r["roundtrip_mm"], 200.0) for r in rows]
    b.scatter([r["score"] for r in rows], rt, s=8, c=["#3a7" if r["confident"] else "#d54" for r in rows])
    if tolerance_mm:
        b.axhline(tolerance_mm, color="#555", linestyle="--", linewidth=1)
        b.annotate(f"confident below {tolerance_mm:g} mm", (0.01, tolerance_mm), xycoords=("axes fraction", "data"),
                   xytext=(0, 3), textcoords="offset points", fontsize=8, color="#555")
    b.set_xlabel("score")
    b.set_ylabel("round trip, mm (max 200)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_rows(store: ResultStore, records: dict[str, dict]) -> list[dict]:
    """One row per (scan, landmark) of the finished scans, least confident first: not confident before confident,
    then by score (low first)."""
    rows = []
    for sid, rec in records.items():
        if rec.get("status") != "ok":
            continue
        for m in rec["matches"]:
            rows.append({"scan": sid, "path": rec["path"], **m})
    rows.sort(key=lambda r: (r["confident"], r["score"], r["scan"], r["label"]))
    return rows


def _median(values: list[float]) -> float:
    """The median of the finite values (NaN when there is none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def landmark_summary(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per landmark (in ``labels``' order, then any other): how many scans, how many confident, and the median score,
    round trip (mm) and, for fused matches, agreeing atlases and spread (mm): where to look first."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    order = [lab for lab in labels if lab in by_label] + sorted(set(by_label) - set(labels))
    out = []
    for lab in order:
        rs = by_label[lab]
        confident = sum(bool(r["confident"]) for r in rs)
        out.append({"label": lab, "scans": len(rs), "confident": confident, "confident_pct": 100.0 * confident / len(rs),
                    "score": _median([r["score"] for r in rs]), "roundtrip_mm": _median([r["roundtrip_mm"] for r in rs]),
                    "agreeing": _median([r.get("agreeing", 1) for r in rs]),
                    "atlases": _median([r.get("atlases", 1) for r in rs]),
                    "spread_mm": _median([r.get("spread_mm", 0.0) for r in rs])})
    return out


def atlas_rejections(rows: list[dict], atlases: list[dict]) -> list[dict]:
    """Per atlas (``{"name", "labels", ...}``, as the outputs name it): for each landmark it carries, in how many of
    the scans it was rejected (its prediction outside the agreeing atlases' consensus); an atlas rejected for a
    landmark in most scans, where the others agree, is likely misplaced there (a rater's error)."""
    out = []
    for a in atlases:
        counts = {lab: [0, 0] for lab in a["labels"]}
        for r in rows:
            if r["label"] in counts:
                counts[r["label"]][1] += 1
                counts[r["label"]][0] += a["name"] in (r.get("rejected") or ())
        out.append({"name": a["name"], "image": a["image"], "points": a["points"],
                    "cells": [{"label": lab, "rejected": k, "scans": n} for lab, (k, n) in counts.items()],
                    "rejected": sum(k for k, _ in counts.values()), "carried": sum(n for _, n in counts.values())})
    return out


def write_report(out_dir: str | Path, max_thumbnails: int = 3000, records: dict[str, dict] | None = None) -> Path:
    """Render ``out_dir/report.html`` from the run's records; returns its path.

    Args:
        out_dir: a propagate output folder.
        max_thumbnails: embed at most this many (scan, landmark) thumbnails, least confident first (the page
            says how many were left out; every thumbnail stays in ``thumbs/``).
        records: the run's scan records by scan id (what its ``matches.csv`` holds); default: every record in the
            folder.
    """
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    out = Path(out_dir)
    store = ResultStore(out)
    run = store.read_run()
    records = store.load() if records is None else records
    order = {sid: n for n, sid in enumerate(records)}
    rows = build_rows(store, records)
    # the least confident landmarks that have a thumbnail (rows without one, of a scan matched with --no-thumbnails,
    # took places of the limit)
    with_thumbnail = [r for r in rows if r.get("thumbnail")]
    embedded = {(r["scan"], r["label"]) for r in with_thumbnail[:max(0, max_thumbnails)]}
    by_scan: dict[str, list[dict]] = {}  # scans in the order of their least confident landmark
    for r in rows:
        by_scan.setdefault(r["scan"], []).append(r)
    scans = []
    for sid, scan_rows in by_scan.items():
        items = []
        for r in sorted(scan_rows, key=lambda r: r["label"]):
            img = link = None
            if r.get("thumbnail") and (out / r["thumbnail"]).is_file():
                if (sid, r["label"]) in embedded:
                    img = _b64((out / r["thumbnail"]).read_bytes())
                else:  # beyond the page's limit: its file, linked (relative: the folder may move)
                    link = Path(r["thumbnail"]).as_posix()
            items.append({**r, "img": img, "link": link})
        scans.append({"id": sid, "path": records[sid]["path"], "landmarks": items, "anchor": f"scan-{sid}",
                      "thumbnail_mm": records[sid].get("thumbnail_mm")})
    failures = [{"scan": sid, "path": rec["path"], "reason": rec.get("reason", "")}
                for sid, rec in sorted(records.items(), key=lambda kv: order[kv[0]]) if rec.get("status") != "ok"]
    n = len(rows)
    names = run.get("atlas_names") or []
    atlases = [{**a, "name": names[i] if i < len(names) else Path(str(a["image"])).name}
               for i, a in enumerate([run["atlas"], *run.get("more_atlases", [])])]
    labels = list(dict.fromkeys(lab for a in atlases for lab in a["labels"]))
    fused = len(atlases) > 1
    confidence = run.get("confidence") or {}
    stats = {
        "scans": len(scans), "landmarks": n, "failed": len(failures), "finished": len(scans) + len(failures),
        "confident_pct": 100.0 * sum(r["confident"] for r in rows) / n if n else math.nan,
        "rematched": sum(r["rematched"] for r in rows),
        "thumbnails_embedded": len(embedded), "thumbnails_left_out": len(with_thumbnail) - len(embedded),
    }
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    html = env.get_template(TEMPLATE).render(
        run=run, rows=rows, scans=scans, failures=failures, stats=stats, atlases=atlases, fused=fused,
        confidence=confidence, summary=landmark_summary(rows, labels),
        rejections=atlas_rejections(rows, atlases) if fused else [],
        plot=_b64(_score_plot(rows, None if fused else confidence.get("roundtrip_tolerance_mm"))) if rows else None)
    return write_text_atomic(out / "report.html", html)
