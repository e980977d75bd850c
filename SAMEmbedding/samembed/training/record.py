"""The training record a run writes beside its model: how the weights were made, for the model's card.

``samembed train`` writes ``NAME.md`` beside ``NAME.pt`` when the run ends: each chunk of the run (a process, between
resumes) with its command, iterations, wall and CPU time; the settings; the data, with each data folder's licence as
its ``SOURCE.md`` states it (a model trained on licensed data must say so in its card); the loss at the start and the
end; the software. It says how the model was trained, not how well it matches: a card for users adds the evaluation
(``benchmarks/model_gate.py``).
"""

from __future__ import annotations

import csv
import hashlib
import math
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: how much of a data folder's licence text the record quotes (characters)
LICENCE_CHARS = 400


@dataclass(frozen=True)
class Chunk:
    """One process of a run, between resumes: when it started (UTC), the command that ran it, the iterations it took
    the run from and to, and its wall and CPU time (seconds)."""

    started_utc: str
    command: str
    first_iteration: int
    last_iteration: int
    wall_s: float
    cpu_s: float

    @classmethod
    def from_dict(cls, d: dict) -> Chunk:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


def this_command() -> str:
    """The command line of this process as a shell would take it (``samembed train ...`` when run by the command)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("samembed", "samembed.exe"):
        argv[0] = "samembed"
    return shlex.join(argv) if argv else "(no command line: run from Python)"


def started_utc() -> str:
    """Now, UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def source_licence(folder: Path) -> str | None:
    """The licence a data folder's ``SOURCE.md`` states (in ``folder`` or up to two folders above it): its
    ``Licence: ...`` paragraph, or the first paragraph under a heading that names the licence, whitespace collapsed
    and cut at :data:`LICENCE_CHARS`; None when there is no such file or statement."""
    for where in (folder, *list(folder.parents)[:2]):
        source = where / "SOURCE.md"
        if not source.is_file():
            continue
        text = source.read_text(encoding="utf-8", errors="replace")
        found = re.search(r"^\**Licen[cs]e[^\n]*?:\**\s*(.+?)(?:\n\s*\n|\Z)", text, flags=re.M | re.S | re.I)
        if found is None:
            found = re.search(r"^#+[^\n]*licen[cs]e[^\n]*\n\s*(.+?)(?:\n\s*\n|\n#|\Z)", text, flags=re.M | re.S | re.I)
        if found is None:
            return None
        return clipped_words(found.group(1), LICENCE_CHARS)
    return None


def clipped_words(text: str, chars: int) -> str:
    """``text`` with its whitespace collapsed, cut at a word within ``chars`` characters, and " ..." where it was
    cut."""
    words = " ".join(text.split())
    return words if len(words) <= chars else words[:chars].rsplit(" ", 1)[0] + " ..."


def _data_folders(sources: list[str]) -> list[tuple[Path, int]]:
    """The folders of the training files ``sources``, each with how many files it gave, in first-seen order."""
    counts: dict[Path, int] = {}
    for f in sources:
        folder = Path(f).parent
        counts[folder] = counts.get(folder, 0) + 1
    return list(counts.items())


def _losses(log_csv: Path) -> tuple[float | None, float | None, int, int]:
    """The mean loss of the first and of the last tenth of the logged iterations that took a step (at least one
    each), how many iterations took a step, and how many took none (logged as nan)."""
    losses, idle = [], 0
    if log_csv.is_file():
        with log_csv.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    value = float(row.get("loss") or "nan")
                except ValueError:
                    continue
                if math.isfinite(value):
                    losses.append(value)
                else:
                    idle += 1
    if not losses:
        return None, None, 0, idle
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k, len(losses), idle


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _yaml(settings: dict) -> str:
    """The settings as YAML (the config file's own form), keys in order."""
    import yaml

    return yaml.safe_dump(settings, sort_keys=False, default_flow_style=None, width=110).rstrip()


def write_training_record(path: Path, model: Path, settings: dict, chunks: list[Chunk], sources: list[str],
                          log_csv: Path, planned: int, stopped_by: str | None = None) -> None:
    """Write the Markdown training record ``path`` of the model file ``model`` (see the module docstring),
    atomically.

    Args:
        settings: the run's resolved settings (``TrainConfig.to_dict()``).
        chunks: every chunk of the run, oldest first.
        sources: the training files.
        log_csv: the run's ``train_log.csv``.
        planned: the iterations the run was set to take.
        stopped_by: why it ended before ``planned`` (the time limit), or None.
    """
    import torch

    from .. import __version__
    from ..io import write_text_atomic

    done = chunks[-1].last_iteration if chunks else 0
    first, last, stepped, idle = _losses(log_csv)
    lines = [f"# Training record: `{settings.get('name', model.stem)}`", "",
             f"Written by `samembed train` when the run ended, beside the model `{model.name}` (SHA-256 "
             f"`{_sha256(model)}`). It says how the weights were made; a card for users adds how well they match "
             "(`benchmarks/model_gate.py`).", "", "## How it was trained", "",
             f"- **Iterations:** {done} of the {planned} planned"
             + (f" (stopped by {stopped_by})" if stopped_by else "") + f", in {len(chunks)} "
             f"chunk{'' if len(chunks) == 1 else 's'} (processes between resumes).",
             f"- **Time:** {sum(c.wall_s for c in chunks) / 3600:.2f} hours of wall time, "
             f"{sum(c.cpu_s for c in chunks) / 3600:.2f} CPU-hours.",
             f"- **Objective:** `{settings.get('objective')}`; lr {settings.get('lr')} (warm-up "
             f"{settings.get('warmup')} iterations, then a cosine over the {settings.get('iterations')}); "
             f"{settings.get('batch_volumes')} volumes per iteration; seed {settings.get('seed')}.", "",
             "| started | command | iterations | wall | CPU |", "|---|---|---|---:|---:|"]
    lines += [f"| {c.started_utc} | `{c.command}` | {c.first_iteration + 1}-{c.last_iteration} | {c.wall_s:.0f} s | "
              f"{c.cpu_s:.0f} s |" for c in chunks]
    lines += ["", "## Loss", ""]
    if first is None:
        lines.append("No iteration took a step.")
    else:
        lines.append(f"Mean loss over the first tenth of the {stepped} iterations that took a step {first:.4f}, over "
                     f"the last tenth {last:.4f}" + (f"; {idle} iteration{'' if idle == 1 else 's'} took no step (no view "
                                                     "pair overlapped on the body)" if idle else "") + ". The curve: `loss_curve.png`; "
                     "every iteration: `train_log.csv`.")
    folders = _data_folders(sources)
    lines += ["", "## Data", "", f"{len(sources)} training files"
              + (f", excluding `{'`, `'.join(settings.get('exclude') or [])}`" if settings.get("exclude") else "")
              + ". A model trained on them must say so in its card, with their licences:", "",
              "| folder | files | licence (its SOURCE.md) |", "|---|---:|---|"]
    for folder, n in folders:
        licence = source_licence(folder)
        lines.append(f"| `{folder}` | {n} | {licence or 'no SOURCE.md states it: say it here'} |")
    lines += ["", "## Settings", "", "```yaml", _yaml(settings), "```", "", "## Software", "",
              f"samembed {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.platform()}, {platform.processor() or platform.machine()}.", ""]
    write_text_atomic(path, "\n".join(lines))
