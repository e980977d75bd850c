"""Every benchmark script answers ``--help`` with its usage instead of starting its run."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_benchmark_script_parses_its_command_line():
    """``benchmarks/prior_fallback.py --help`` started the whole benchmark (a docs review ran it twice, and it wrote
    its cache): a script run as a command parses its arguments with argparse, itself or in the module whose
    ``main`` it calls."""
    missing = []
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        if '__name__ == "__main__"' not in text:
            continue
        sources = [text]
        for module in re.findall(r"^from (samembed_bench\.[\w.]+) import .*\bmain\b", text, flags=re.M):
            sources.append((REPO / "benchmarks" / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        if not any("ArgumentParser(" in s for s in sources):
            missing.append(script.name)
    assert not missing, f"benchmark scripts without a command-line parser: {missing}"
