"""The review report ``OUT/report.html``: one self-contained page (images embedded as base64 PNG) made with
Jinja2 (``templates/report.html.j2``) and matplotlib.

It lists every scan and landmark with its score, confident flag, round-trip distance and whether the
consistency step searched it again, least confident first; each row links to its scan's section, which shows
the axial/coronal thumbnails of every landmark; a summary plot shows the scores. Failures are listed too.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from ..io import write_text_atomic
from .results import ResultStore

TEMPLATE = "report.html.j2"


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _score_plot(rows: list[dict]) -> bytes:
    """PNG: histogram of scores (confident / not), and score against round-trip distance."""
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
    embedded = set()
    for r in rows[:max_thumbnails]:
        if r.get("thumbnail"):
            embedded.add((r["scan"], r["label"]))
    by_scan: dict[str, list[dict]] = {}  # scans in the order of their least confident landmark
    for r in rows:
        by_scan.setdefault(r["scan"], []).append(r)
    scans = []
    for sid, scan_rows in by_scan.items():
        items = []
        for r in sorted(scan_rows, key=lambda r: r["label"]):
            img = None
            if (sid, r["label"]) in embedded and (out / r["thumbnail"]).is_file():
                img = _b64((out / r["thumbnail"]).read_bytes())
            items.append({**r, "img": img})
        scans.append({"id": sid, "path": records[sid]["path"], "landmarks": items, "anchor": f"scan-{sid}"})
    failures = [{"scan": sid, "path": rec["path"], "reason": rec.get("reason", "")}
                for sid, rec in sorted(records.items(), key=lambda kv: order[kv[0]]) if rec.get("status") != "ok"]
    n = len(rows)
    stats = {
        "scans": len(scans), "landmarks": n, "failed": len(failures),
        "confident_pct": 100.0 * sum(r["confident"] for r in rows) / n if n else math.nan,
        "rematched": sum(r["rematched"] for r in rows),
        "thumbnails_embedded": len(embedded), "thumbnails_left_out": sum(1 for r in rows if r.get("thumbnail")) - len(embedded),
    }
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    html = env.get_template(TEMPLATE).render(
        run=run, rows=rows, scans=scans, failures=failures, stats=stats,
        plot=_b64(_score_plot(rows)) if rows else None)
    return write_text_atomic(out / "report.html", html)
