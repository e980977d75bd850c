"""Cold-start benchmark: ``samembed match`` in a fresh process with no cache, against elastix, stage by stage.

Each measurement runs in its own child process (``python benchmarks/cold_start.py child ...``) so that imports,
model loading and every embedding are paid for, as a new user pays for them. The child runs the real command
line (``samembed.cli.main(["match", ...])``) with light wrappers around the engine's stage functions that record
each stage's *exclusive* wall time (a stage called inside another is not counted twice), and reports the peak RSS
(``resource.getrusage``, the process's maximum resident set).

Usage (from the repository root, with ``SAMEmbedding`` and ``benchmarks`` on ``PYTHONPATH``)::

    python benchmarks/cold_start.py run --suites cache/suites --out benchmarks/results/cold_start.md
    python benchmarks/cold_start.py child SRC TGT --points P.csv --out O.csv --json stages.json [-- match flags]

Stages (seconds): imports (the engine and torch), model (loading the checkpoint), reading, preprocessing, body
(body masks), global map, local map, assemble (upsampled global + local features), prior (affine prior), search,
polish, scores, round trip (search back and polish back), writing, other (the remainder of the process wall time:
interpreter start, argument parsing, bookkeeping).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

#: (module, attribute path, stage name); a stage called inside another is counted in the inner one only
STAGES = (
    ("samembed.api", "read_image", "reading"),
    ("samembed.api", "load_model", "model"),
    ("samembed.embedding", "preprocess", "preprocessing"),
    ("samembed.embedding", "Embedder._body_on_local", "body"),
    ("samembed.networks.lite", "SamLite.forward_global", "global map"),
    ("samembed.networks.lite", "SamLite.forward_local", "local map"),
    ("samembed.embedding", "Embedder._assemble", "assemble"),
    ("samembed.tiles", "upsample_box", "assemble"),
    ("samembed.tiles", "upsample_at", "assemble"),
    ("samembed.embedding", "Embedder.save", "writing"),
    ("samembed.api", "Matcher._prior", "prior"),
    ("samembed.api", "match_points", "search|round trip"),
    ("samembed.api", "polish_points", "polish|round trip"),
    ("samembed.api", "scores_at", "scores"),
    ("samembed.cli", "_write_match_outputs", "writing"),
)
ORDER = ("imports", "model", "reading", "preprocessing", "body", "global map", "local map", "assemble", "prior",
         "search", "polish", "scores", "round trip", "writing", "other")


class StageClock:
    """Exclusive wall time per stage: a stack of running stages, each charged for its own time only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, child seconds]

    def wrap(self, fn, name: str):
        """``fn`` timed as stage ``name``; ``"a|b"`` alternates a, b, a, b... over the calls (search, then the
        round trip's search back, per target)."""
        names = name.split("|")

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            n = self.calls.get(name, 0)
            self.calls[name] = n + 1
            stage = names[n % len(names)]
            self._stack.append([stage, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                st, t0, child = self._stack.pop()
                dt = time.perf_counter() - t0
                self.seconds[st] = self.seconds.get(st, 0.0) + dt - child
                if self._stack:
                    self._stack[-1][2] += dt

        return timed

    def install(self) -> None:
        """Wrap every function of :data:`STAGES` that exists in this version of the engine."""
        import importlib

        for module, attr, name in STAGES:
            mod = importlib.import_module(module)
            owner, parts = mod, attr.split(".")
            for p in parts[:-1]:
                owner = getattr(owner, p, None)
            if owner is None or not hasattr(owner, parts[-1]):
                continue
            fn = getattr(owner, parts[-1])
            setattr(owner, parts[-1], self.wrap(fn, name))


def peak_rss_gb() -> float:
    """Peak resident set size of this process, GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child(argv: list[str]) -> int:
    """Run one ``samembed match`` with stage timing; write ``{"stages": {...}, "peak_rss_gb", "wall_s"}``."""
    p = argparse.ArgumentParser(prog="cold_start.py child")
    p.add_argument("--json", required=True, help="where to write the stage times")
    args, rest = p.parse_known_args(argv)
    t0 = time.perf_counter()
    import torch  # noqa: F401 - the import cost is a stage of its own

    import samembed.api  # noqa: F401
    import samembed.cli as cli

    t_imports = time.perf_counter() - t0
    clock = StageClock()
    clock.install()
    rc = cli.main(["match", *rest, "--quiet", "--device", "cpu"])
    wall = time.perf_counter() - T_START
    stages = {"imports": t_imports, **clock.seconds}
    stages["other"] = wall - sum(stages.values())
    Path(args.json).write_text(json.dumps({"stages": stages, "peak_rss_gb": peak_rss_gb(), "wall_s": wall, "rc": rc},
                                          indent=1))
    return rc


def run_child(source: str, targets: list[str], points_csv: str, out_csv: str, extra: list[str] = ()) -> dict:
    """One cold ``samembed match`` in a fresh process; its stage times, peak RSS and the process wall time."""
    js = Path(out_csv).with_suffix(".stages.json")
    cmd = [sys.executable, __file__, "child", "--json", str(js), source, *targets, "--points", points_csv,
           "--out", out_csv, *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    out = json.loads(js.read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "child":
        return child(argv[1:])
    raise SystemExit("usage: cold_start.py child ... | run ...")


if __name__ == "__main__":
    sys.exit(main())
