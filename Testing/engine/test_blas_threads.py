"""numpy's BLAS threads in the engine's own processes (samembed.blas_threads): one, set before numpy loads."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from samembed.blas_threads import ENV, blas_environment

from ..conftest import data_file

#: a fresh process that parses a ``samembed match`` command line as ``samembed.cli.run`` does, applies the engine's
#: process settings unless told not to, then imports numpy; prints whether numpy was loaded before the settings, the
#: environment variable, and the process's thread count once numpy is loaded (OpenBLAS starts its workers then)
PROCESS = """
import os, sys
import samembed.cli as cli
cli.build_parser().parse_args(["match", "a.nii.gz", "b.nii.gz", "--points", "p.csv", "--out", "o.csv"])
loaded = "numpy" in sys.modules
if sys.argv[1] == "engine":
    cli.engine_process_settings()
import numpy
print(loaded, os.environ.get("OPENBLAS_NUM_THREADS"), len(os.listdir("/proc/self/task")))
"""


def _process(kind: str, **env: str) -> tuple[str, str, int]:
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    res = subprocess.run([sys.executable, "-c", PROCESS, kind], capture_output=True, text=True, timeout=120,
                         env={**environ, "OMP_NUM_THREADS": "2", **env})
    assert res.returncode == 0, res.stderr
    loaded, value, threads = res.stdout.split()
    return loaded, value, int(threads)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_the_commands_process_runs_numpys_blas_on_one_thread_and_a_users_setting_wins():
    plain = _process("plain")
    if plain[2] < 2:
        pytest.skip("numpy's BLAS starts no worker thread here, with OMP_NUM_THREADS=2: nothing to take away")
    assert plain[0] == "False", "the command's imports and parser loaded numpy before the engine's settings"
    assert _process("engine") == ("False", "1", 1), "numpy's BLAS started worker threads in the engine's process"
    assert _process("engine", **{ENV: "2"}) == ("False", "2", plain[2]), "the user's own setting was not kept"


def test_the_environment_of_a_process_the_engine_starts_keeps_a_users_setting():
    assert blas_environment({"PATH": "/bin"}) == {"PATH": "/bin", ENV: "1"}
    assert blas_environment({ENV: "4"}) == {ENV: "4"}


def test_the_package_and_its_command_line_load_no_numpy_and_its_names_resolve_on_first_use():
    code = ("import sys, samembed, samembed.cli; assert 'numpy' not in sys.modules, 'numpy'; "
            "from samembed.image import Image; from samembed.fusion import Atlas; "
            "assert samembed.Image is Image and samembed.Atlas is Atlas; "
            "assert {'Matcher', 'Image', 'read_image'} <= set(dir(samembed)); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.needs_data
def test_a_cold_match_with_one_blas_thread_finds_what_two_find_bit_for_bit(tmp_path):
    """The shipped model on a real head-and-neck pair, each run a fresh ``samembed match`` process: numpy's BLAS on
    one thread (the command's default) and on two (the user's setting) give the same rows, every digit."""
    cts = [data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (210, 202)]
    points = tmp_path / "points.csv"
    points.write_text("label,x,y,z\nBrainstem,242.41,262.07,233.86\nSpinalCord,243.64,267.56,128.05\n"
                      "RightParotid,188.92,235.23,186.53\nMandible,240.8,178.42,154.21\n")
    rows = {}
    for n in ("1", "2"):
        out = tmp_path / f"blas{n}.csv"
        env = {**os.environ, "OMP_NUM_THREADS": "2", ENV: n}
        res = subprocess.run([sys.executable, "-c", "from samembed.cli import run; run()", "match", *map(str, cts),
                              "--points", str(points), "--out", str(out), "--device", "cpu", "--quiet"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
        rows[n] = list(csv.DictReader(out.open()))
    assert len(rows["1"]) == 4 and rows["1"] == rows["2"]
