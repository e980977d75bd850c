"""numpy's BLAS threads in the engine's own processes (samembed.blas_threads): one, set before numpy loads."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from samembed.blas_threads import ENV, blas_environment

from ..conftest import data_file

#: a fresh ``samembed match`` process through the command's own entry (``samembed.cli.run``) with the command's
#: function replaced by a probe: prints whether numpy was loaded when the command started, the environment variable,
#: and how many threads ``import numpy`` started (OpenBLAS starts its workers then); ``plain``: the same command
#: line through ``main``, without the engine's process settings
PROCESS = """
import os, sys
import samembed.cli as cli

def probe(args):
    loaded = "numpy" in sys.modules
    before = len(os.listdir("/proc/self/task"))
    import numpy
    print(loaded, os.environ.get("OPENBLAS_NUM_THREADS"), len(os.listdir("/proc/self/task")) - before)
    return 0

cli._cmd_match = probe
argv = ["match", "a.nii.gz", "b.nii.gz", "--points", "p.csv", "--out", "o.csv"]
if sys.argv[1] == "engine":
    sys.argv = ["samembed", *argv]
    cli.run()
sys.exit(cli.main(argv))
"""


def _process(kind: str, **env: str) -> tuple[str, str, int]:
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    res = subprocess.run([sys.executable, "-c", PROCESS, kind], capture_output=True, text=True, timeout=120,
                         env={**environ, "OMP_NUM_THREADS": "2", **env})
    assert res.returncode == 0, res.stderr
    loaded, value, started = res.stdout.split()
    return loaded, value, int(started)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_the_commands_process_runs_numpys_blas_on_one_thread_and_a_users_setting_wins():
    plain = _process("plain")
    assert plain[0] == "False", "the command's imports and parser loaded numpy before the command started"
    if plain[2] < 1:
        pytest.skip("numpy's BLAS starts no worker thread here, with OMP_NUM_THREADS=2: nothing to take away")
    assert _process("engine") == ("False", "1", 0), "numpy's BLAS started worker threads in the command's process"
    assert _process("engine", **{ENV: "2"}) == ("False", "2", plain[2]), "the user's own setting was not kept"


def test_the_environment_of_a_process_the_engine_starts_keeps_a_users_setting():
    assert blas_environment({"PATH": "/bin"}) == {"PATH": "/bin", ENV: "1"}
    assert blas_environment({ENV: "4"}) == {ENV: "4"}
    # a blank variable (a CI's or container's) or 0 is no count: OpenBLAS then starts a thread per core (a review)
    for unset in ("", " ", "0", "many"):
        assert blas_environment({ENV: unset}) == {ENV: "1"}, unset


def test_the_package_and_its_command_line_load_no_numpy_and_its_names_resolve_on_first_use():
    """``import samembed``, ``samembed.cli`` and its parser load no numpy; the public names load their modules when
    first asked for; listing the package loads no torch."""
    code = ("import sys, samembed, samembed.cli; "
            "samembed.cli.build_parser().parse_args(['embed', 'a.nii.gz']); "
            "assert 'numpy' not in sys.modules, 'numpy'; "
            "from samembed.image import Image; from samembed.fusion import Atlas; "
            "assert samembed.Image is Image and samembed.Atlas is Atlas; "
            "assert {'Atlas', 'Image', 'MatchResult'} <= set(dir(samembed)); "
            "assert 'torch' not in sys.modules, 'listing the package loaded torch'; "
            "from samembed import *; assert Matcher.__module__ == 'samembed.api'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.needs_data
def test_a_cold_match_with_one_blas_thread_finds_what_two_find_bit_for_bit(tmp_path):
    """The shipped model on a real head-and-neck pair, each run a fresh ``samembed match`` process: numpy's BLAS on
    one thread (the command's default, the variable unset) and on two (the user's setting) give the same rows, every
    digit."""
    cts = [data_file("ct", "openkbp", "ct", f"pt_{n}_ct.nii.gz") for n in (210, 202)]
    points = tmp_path / "points.csv"
    points.write_text("label,x,y,z\nBrainstem,242.41,262.07,233.86\nSpinalCord,243.64,267.56,128.05\n"
                      "RightParotid,188.92,235.23,186.53\nMandible,240.8,178.42,154.21\n")
    rows = {}
    for n in ("default", "2"):
        out = tmp_path / f"blas{n}.csv"
        env = {**{k: v for k, v in os.environ.items() if k != ENV}, "OMP_NUM_THREADS": "2",
               **({ENV: n} if n != "default" else {})}
        res = subprocess.run([sys.executable, "-c", "from samembed.cli import run; run()", "match", *map(str, cts),
                              "--points", str(points), "--out", str(out), "--device", "cpu", "--quiet"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
        rows[n] = list(csv.DictReader(out.open()))
    assert len(rows["default"]) == 4 and rows["default"] == rows["2"]
