"""The engine's processes pause Python's cyclic garbage collector while torch and the model load, then leave those
objects out of its scans (samembed.collector). Each case runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import data_file

ENGINE = str(Path(__file__).resolve().parents[2] / "SAMEmbedding")


def _fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with the engine importable; the JSON it prints last."""
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ENGINE!r})\n{code}"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_paused_until_loaded_then_the_loaded_objects_are_frozen_and_cycles_still_collected():
    r = _fresh("""
import gc, json
from samembed.collector import freeze_imported, pause_collection
pause_collection()
paused = gc.isenabled()
import decimal, email.parser  # stand-ins for torch: modules that make many long-lived objects
before = gc.get_freeze_count()
made = freeze_imported()
frozen = gc.get_freeze_count()
second = freeze_imported()  # a second call changes nothing
again = gc.get_freeze_count()
class Node: pass
a, b = Node(), Node(); a.other, b.other = b, a  # a cycle made after loading
del a, b
print(json.dumps({"paused_enabled": paused, "before": before, "made": made, "second": second, "frozen": frozen,
                  "again": again,
                  "enabled": gc.isenabled(), "collected": gc.collect(), "scanned": len(gc.get_objects())}))
""")
    assert r["paused_enabled"] is False
    assert r["before"] == 0 and r["frozen"] > 1000 and r["again"] == r["frozen"]
    # what it returns counts the objects the imports made (without walking the frozen ones): a good share of those
    # frozen here (after torch's import 184 k of 192 k), none the second time
    assert r["frozen"] / 4 < r["made"] <= r["frozen"] and r["second"] == 0
    assert r["enabled"] is True
    assert r["collected"] >= 2  # the later cycle is found: the collector works again
    assert r["scanned"] < r["frozen"] / 4  # what it tracks now leaves the loaded objects out


def test_without_a_pause_freezing_changes_nothing():
    # a script that calls the commands' functions keeps its collector as it is
    r = _fresh("""
import gc, json
from samembed.collector import freeze_imported
freeze_imported()
print(json.dumps({"frozen": gc.get_freeze_count(), "enabled": gc.isenabled()}))
""")
    assert r == {"frozen": 0, "enabled": True}


def test_a_child_forked_while_paused_collects_and_the_parent_stays_paused():
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    r = _fresh("""
import gc, json, os
from samembed.collector import freeze_imported, pause_collection, resume_after_fork
pause_collection()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    resume_after_fork()
    freeze_imported()  # nothing to freeze in the child: its pause was resumed
    os.write(write, json.dumps([gc.isenabled(), gc.get_freeze_count()]).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(read, 1000))
print(json.dumps({"child": child, "parent": gc.isenabled()}))
""")
    assert r == {"child": [True, 0], "parent": False}


@pytest.mark.needs_data
def test_the_match_command_freezes_torchs_objects_and_still_scans_the_engines(tmp_path):
    ct = data_file("ct", "openkbp", "ct", "pt_201_ct.nii.gz")
    (tmp_path / "p.csv").write_text("label,x,y,z\nA,250,250,150\n")
    # the command's own entry point (samembed.cli.run), with the collector's state noted when the outputs are written
    r = _fresh(f"""
import gc, json, sys
import samembed.cli as cli
seen, engine = {{}}, []
make, write = cli._make_matcher, cli._write_match_outputs
def made(*a, **k):
    engine.append(make(*a, **k))
    return engine[-1]
def noted(*a, **k):
    scanned = {{id(o) for o in gc.get_objects()}}
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(), scanned=len(scanned),
                torch="torch" in sys.modules, engine_scanned=id(engine[0]) in scanned,
                embedder_scanned=id(engine[0].embedder) in scanned,
                maps_scanned=[type(o).__name__ for o in gc.get_objects()].count("EmbeddingMaps"))
    return write(*a, **k)
cli._make_matcher, cli._write_match_outputs, cli.exit_now = made, noted, lambda code: None
sys.argv = ["samembed", "match", {str(ct)!r}, {str(ct)!r}, "--points", {str(tmp_path / "p.csv")!r},
            "--out", {str(tmp_path / "o.csv")!r}, "--model", "random:sam-lite", "--device", "cpu", "--no-polish", "-q"]
try:
    cli.run()
except SystemExit:
    pass
print(json.dumps(seen))
""")
    assert (tmp_path / "o.csv").is_file()
    assert r["torch"] and r["enabled"]
    assert r["frozen"] > 50_000  # torch's objects (about 170 k with 2.13)
    assert r["scanned"] < r["frozen"] / 2  # a full collection in the match walks only what came after the import
    # the engine is made after the freeze: the cycles of its maps and embedder are freed by a collection
    assert r["engine_scanned"] and r["embedder_scanned"] and r["maps_scanned"] >= 1
