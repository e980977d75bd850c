"""Benchmark case files: pairs of images with query points and their ground-truth matches.

A case is one (source image, target image) pair, ``N`` labelled query points in the source and the
``N`` true positions of the same anatomy in the target, all in LPS mm (each in its own image's frame).

Two file formats, read and written by :func:`read_cases` / :func:`write_cases`:

* JSON: a list of objects (or ``{"cases": [...]}``)::

    [{"suite": "popi_synthetic", "case_id": "popi_00_to_50", "source": "images/popi_00.nii.gz",
      "target": "images/popi_50.nii.gz", "labels": ["L0", "L1"],
      "query_points_lps_mm": [[48.9, 33.3, 29.5], ...], "truth_points_lps_mm": [[...], ...],
      "meta": {"note": "optional, free-form"}}]

* CSV: one row per point with columns ``suite, case_id, source, target, label, query_x_lps_mm,
  query_y_lps_mm, query_z_lps_mm, truth_x_lps_mm, truth_y_lps_mm, truth_z_lps_mm``; rows of the same
  ``(suite, case_id)`` form one case, in file order.

Relative image paths are relative to the folder holding the case file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samembed.errors import InputError

CSV_COLUMNS = ["suite", "case_id", "source", "target", "label",
               "query_x_lps_mm", "query_y_lps_mm", "query_z_lps_mm",
               "truth_x_lps_mm", "truth_y_lps_mm", "truth_z_lps_mm"]


#: a suite's name: it names the report's files (``<stem>_<suite>_cdf.png``)
SUITE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class Case:
    """One benchmark pair.

    Attributes:
        suite: suite name (e.g. ``"openkbp_inter"``).
        case_id: unique within the suite.
        source: source image path (absolute after reading).
        target: target image path (absolute after reading).
        labels: one name per query point (e.g. ``"Brainstem"``, ``"L07"``).
        query_points_lps_mm: (N, 3) points in the source, LPS mm.
        truth_points_lps_mm: (N, 3) true positions of the same points in the target, LPS mm.
        meta: free-form JSON-serialisable facts (transform parameters, seeds ...); not in CSV files.
    """

    suite: str
    case_id: str
    source: Path
    target: Path
    labels: list[str]
    query_points_lps_mm: np.ndarray
    truth_points_lps_mm: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.source = Path(self.source)
        self.target = Path(self.target)
        self.labels = [str(v) for v in self.labels]
        q = np.asarray(self.query_points_lps_mm, dtype=np.float64).reshape(-1, 3) if np.size(self.query_points_lps_mm) else None
        t = np.asarray(self.truth_points_lps_mm, dtype=np.float64).reshape(-1, 3) if np.size(self.truth_points_lps_mm) else None
        name = f"case {self.suite}/{self.case_id}"
        if not SUITE_NAME.fullmatch(str(self.suite)):  # it names the report's files: never a path out of --out
            raise InputError(f"{name}: the suite name {self.suite!r} must be letters, digits, '_', '-' or '.' (it "
                             "names the report's files), not a path")
        if q is None or t is None:
            raise InputError(f"{name}: no query or truth points")
        if q.shape != t.shape or np.shape(self.query_points_lps_mm)[-1] != 3:
            raise InputError(f"{name}: query points {np.shape(self.query_points_lps_mm)} and truth points "
                             f"{np.shape(self.truth_points_lps_mm)} must both be (N, 3) LPS mm")
        if len(self.labels) != len(q):
            raise InputError(f"{name}: {len(self.labels)} labels for {len(q)} points")
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))):
            raise InputError(f"{name}: NaN or infinite coordinates")
        self.query_points_lps_mm, self.truth_points_lps_mm = q, t

    @property
    def key(self) -> str:
        """``suite/case_id``."""
        return f"{self.suite}/{self.case_id}"

    def to_dict(self, relative_to: Path | None = None) -> dict:
        """JSON-ready dict; image paths relative to ``relative_to`` when given (and possible)."""
        return {
            "suite": self.suite,
            "case_id": self.case_id,
            "source": _rel(self.source, relative_to),
            "target": _rel(self.target, relative_to),
            "labels": list(self.labels),
            "query_points_lps_mm": np.round(self.query_points_lps_mm, 4).tolist(),
            "truth_points_lps_mm": np.round(self.truth_points_lps_mm, 4).tolist(),
            "meta": self.meta,
        }


def _rel(path: Path, base: Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def read_cases(path: str | os.PathLike) -> list[Case]:
    """Read a ``.json`` or ``.csv`` case file; relative image paths are resolved against its folder.

    Raises:
        InputError: missing file, unknown suffix, missing fields or malformed points (the message names
            the file and the case).

    >>> cases = read_cases("cache/suites/popi_synthetic/cases.json")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: case file not found")
    base = path.parent.resolve()
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if isinstance(data, dict):
            data = data.get("cases")
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of cases (or an object with a 'cases' list)")
        cases = []
        for n, d in enumerate(data):
            if not isinstance(d, dict):
                raise InputError(f"{path}: case #{n} is not an object with suite, case_id, source, target, "
                                 "query_points_lps_mm and truth_points_lps_mm")
            missing = [k for k in ("suite", "case_id", "source", "target", "query_points_lps_mm", "truth_points_lps_mm")
                       if k not in d]
            if missing:
                raise InputError(f"{path}: case #{n} lacks {', '.join(missing)}")
            q = d["query_points_lps_mm"]
            labels = d.get("labels") or [f"P{i + 1}" for i in range(len(q))]
            try:
                cases.append(Case(str(d["suite"]), str(d["case_id"]), _resolve(d["source"], base), _resolve(d["target"], base),
                                  labels, q, d["truth_points_lps_mm"], dict(d.get("meta") or {})))
            except (TypeError, ValueError) as e:
                raise InputError(f"{path}: case #{n} ({d.get('case_id')}): {e}") from e
        return cases
    if suffix == ".csv":
        groups: dict[tuple[str, str], dict] = {}
        from samembed.io import row_delimiter

        with path.open(newline="", encoding="utf-8-sig") as f:  # (a spreadsheet's "CSV UTF-8" starts with a BOM)
            header = f.readline()
            f.seek(0)
            # (a spreadsheet's CSV where the comma is the decimal separator: ';' between the values)
            delimiter = row_delimiter(header, lambda fields, d: set(CSV_COLUMNS) <= {v.strip() for v in fields}) or ","
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing CSV columns {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}")
            for row_no, row in enumerate(reader, start=2):
                key = (row["suite"], row["case_id"])
                g = groups.setdefault(key, {"source": row["source"], "target": row["target"], "labels": [], "q": [], "t": []})
                if (row["source"], row["target"]) != (g["source"], g["target"]):
                    raise InputError(f"{path}: row {row_no}: case {key[0]}/{key[1]} changes its source or target image")
                try:
                    g["q"].append([float(row[f"query_{a}_lps_mm"]) for a in "xyz"])
                    g["t"].append([float(row[f"truth_{a}_lps_mm"]) for a in "xyz"])
                except (TypeError, ValueError) as e:
                    raise InputError(f"{path}: row {row_no}: a coordinate is not a number") from e
                g["labels"].append(row["label"] or f"P{len(g['labels']) + 1}")
        return [Case(s, c, _resolve(g["source"], base), _resolve(g["target"], base), g["labels"], g["q"], g["t"])
                for (s, c), g in groups.items()]
    raise InputError(f"{path}: unknown case-file type '{path.suffix}'; use .json or .csv")


def write_cases(cases: list[Case], path: str | os.PathLike, relative: bool = True) -> Path:
    """Write cases as ``.json`` (with ``meta``) or ``.csv`` (one row per point), atomically.

    Args:
        cases: the cases.
        path: output file; its suffix picks the format.
        relative: store image paths relative to the file's folder.

    Returns:
        The path written.
    """
    from samembed.io import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent if relative else None
    suffix = path.suffix.lower()
    if suffix == ".json":
        return write_text_atomic(path, json.dumps([c.to_dict(base) for c in cases], indent=1) + "\n")
    if suffix == ".csv":
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for c in cases:
            src, tgt = _rel(c.source, base), _rel(c.target, base)
            for lab, q, t in zip(c.labels, c.query_points_lps_mm, c.truth_points_lps_mm):
                w.writerow([c.suite, c.case_id, src, tgt, lab, *(f"{v:.4f}" for v in q), *(f"{v:.4f}" for v in t)])
        return write_text_atomic(path, buf.getvalue())
    raise InputError(f"{path}: unknown case-file type '{path.suffix}'; use .json or .csv")
