"""Tests of what the cold-start benchmarks report (``benchmarks/cold_start.py``, ``first_click.py``, ``cold_ab.py``):
the run a report names as its median, the verdicts on the 3 s target, the pairing of matches with their expected
points, the provenance line, and a clear exit when the shared data is absent. No benchmark is run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cold_start  # noqa: E402
import first_click  # noqa: E402


def test_an_even_number_of_runs_reports_the_slower_middle_run_and_says_so():
    runs = [{"process_s": 5.0, "n": 0}, {"process_s": 9.0, "n": 1}]
    picked = cold_start.median_run(runs)
    assert picked["n"] == 1 and picked["process_s_runs"] == [5.0, 9.0]
    assert cold_start.median_words(2) == "the slower of the middle two of 2 runs"
    assert cold_start.median_run([{"process_s": v} for v in (3.0, 1.0, 2.0)])["process_s"] == 2.0
    assert cold_start.median_words(3) == "the median run"


def _click(seconds: list[float]) -> dict:
    """A mode's reported run (the median) with every run's click time, as ``first_click.run`` makes it."""
    return {"click_s": sorted(seconds)[len(seconds) // 2], "click_s_runs": seconds, "prepare_s": 0.5,
            "prepare_s_runs": [0.5] * len(seconds), "prepare_steps": {}, "engine_peak_rss_gb": 1.0}


def test_the_prepared_click_verdict_counts_its_slowest_run():
    """A prepared click that took 6 s in one run of three misses the 3 s target, although its median run met it."""
    row = {"source": "pt_215", "targets": ["a", "b", "c"], "cold": _click([1.5, 1.6, 1.7]),
           "started": _click([1.0, 1.1, 1.2]), "prepared": _click([2.0, 2.5, 6.0]), "same": True,
           "errors_mm": [1.0, 2.0, 3.0]}
    text = first_click.report([row], (0.0,), (0.0,), "", 0, reps=3, made=None)
    assert "(worst run 6.0 s)" in text
    assert "**missed** (worst prepared click 6.0 s)" in text
    assert "Engine commit, date and CPU model: not recorded by this run." in text
    row["prepared"] = _click([2.0, 2.5, 2.9])
    assert "**met** after preparing ahead" in first_click.report([row], (0.0,), (0.0,), "", 0, reps=3)


def test_a_clicks_matches_are_paired_with_their_targets_by_name():
    rows = [{"target": "b", "ras": [2.0, 0.0, 0.0]}, {"target": "a", "ras": [1.0, 0.0, 0.0]}]
    points = first_click._points_by_target(rows, ["a", "b"], "pt_215 cold")
    assert points[:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(SystemExit, match="pt_215 cold: no match for c"):
        first_click._points_by_target(rows, ["a", "b", "c"], "pt_215 cold")


def test_the_provenance_names_this_checkouts_commit_and_the_cpu():
    made = cold_start.provenance()
    head = subprocess.run(["git", "-C", str(BENCHMARKS.parent), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert made["commit"].split()[0] == head
    assert made["utc"].endswith(" UTC") and made["cpu"]
    line = cold_start.provenance_line(made)
    assert line.startswith(f"Engine `{made['commit']}`, run started {made['utc']}, CPU: ")


@pytest.mark.parametrize("script", ["cold_start.py", "cold_ab.py"])
def test_without_the_shared_data_a_benchmark_says_what_is_missing_and_makes_nothing(script, tmp_path):
    """One line naming the missing file and what to do, no traceback, and nothing made (no suites built, no git
    worktree)."""
    args = ["run", "--suites", str(tmp_path / "suites"), "--work", str(tmp_path / "work")] if script == "cold_start.py" \
        else ["--base", "HEAD", "--work", str(tmp_path / "work")]
    env = {**os.environ, "SAMEMBED_DATA": str(tmp_path / "absent"),
           "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent / "SAMEmbedding"), str(BENCHMARKS)])}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path / 'absent' / 'ct' / 'lidc' / 'LIDC-IDRI-0001_ct.nii.gz'} is missing" in done.stderr
    assert "SAMEMBED_DATA" in done.stderr
    assert not any(tmp_path.glob("*/*")), sorted(tmp_path.rglob("*"))
