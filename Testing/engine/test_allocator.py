"""The engine's processes keep freed memory for reuse (samembed.allocator): a block freed and allocated again is not
faulted in again, and the idle engine hands what is free back to the OS. Each case runs in a fresh interpreter,
since the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samembed import allocator

ENGINE = str(Path(__file__).resolve().parents[2] / "SAMEmbedding")

#: a fresh process allocates a 48 MB block with the C library's malloc (above glibc's largest dynamic mmap threshold,
#: 32 MB: by default it is mapped and unmapped each time), fills it, frees it, does it again and counts the second
#: fill's page faults; then, with the setting, frees the block and hands the free memory back (``release``). The
#: kernel's transparent huge pages are off for the process, so a page is the system's page.
SCRIPT = """
import ctypes, json, resource, sys
sys.path.insert(0, {engine!r})
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
applied = released = None
if {keep}:
    from samembed.allocator import keep_freed_memory, release_free_memory
    applied = keep_freed_memory()
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)

def rss_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))

n = 48 << 20
a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = libc.malloc(n); ctypes.memset(b, 2, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
last = ctypes.c_uint8.from_address(b + n - 1).value
libc.free(b)
kept_kb = rss_kb()
if {keep}:
    released = release_free_memory()
print(json.dumps({{"applied": applied, "faults": faults, "pages": n // resource.getpagesize(), "last": last,
                   "released": released, "freed_kb": kept_kb - rss_kb()}}))
"""


def _run(keep: bool) -> dict:
    # the C library's own policy: no allocator settings or replacements inherited from the environment
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(engine=ENGINE, keep=keep)], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def runs() -> dict:
    if allocator._glibc() is None:
        pytest.skip("the C library here is not glibc: keep_freed_memory changes nothing (it returns False)")
    return {"kept": _run(True), "default": _run(False)}


def test_a_freed_block_is_reused_without_page_faults(runs: dict) -> None:
    kept, default = runs["kept"], runs["default"]
    # the control: by default the second block is mapped afresh, and every page of it faults in again
    assert default["faults"] > 0.5 * default["pages"]
    # kept: the freed block is the new one's memory, already resident
    assert kept["applied"] is True
    assert kept["faults"] < 0.05 * kept["pages"]
    assert kept["last"] == default["last"] == 2  # the memory holds what was written


def test_release_hands_the_kept_memory_back(runs: dict) -> None:
    kept = runs["kept"]
    assert kept["released"] is True
    assert kept["freed_kb"] > 40 << 10  # most of the 48 MB block left the process


def test_thresholds_beyond_an_int_are_refused() -> None:
    with pytest.raises(ValueError, match="mmap_threshold_bytes"):
        allocator.keep_freed_memory(mmap_threshold_bytes=4 << 30)
    with pytest.raises(ValueError, match="trim_threshold_bytes"):
        allocator.keep_freed_memory(trim_threshold_bytes=-1)


def test_an_allocator_the_user_tuned_in_the_environment_is_left_as_tuned(monkeypatch) -> None:
    """``MALLOC_TRIM_THRESHOLD_=0`` (a container kept small) was overridden: up to 256 MB of freed memory stayed
    resident (a review). Dask's own default in its workers is not a user's setting."""
    if allocator._glibc() is None:
        pytest.skip("the C library here is not glibc: keep_freed_memory changes nothing (it returns False)")
    for name in (*allocator.MALLOC_VARIABLES, "GLIBC_TUNABLES"):  # (none inherited from this test run's environment)
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: type("Libc", (), {"mallopt": lambda *a: calls.append(a) or 1})())
    for name, value in (("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_MMAP_THRESHOLD_", "131072"),
                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert allocator.keep_freed_memory() is False and calls == [], name
    with monkeypatch.context() as env:  # Dask's nannies set this in every worker: a setting of its own, not a user's
        env.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
        assert allocator.keep_freed_memory(besides={"MALLOC_TRIM_THRESHOLD_": "65536"}) is True and len(calls) == 2
    with monkeypatch.context() as env:
        env.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")  # no allocator tunable
        calls.clear()
        assert allocator.keep_freed_memory() is True and len(calls) == 2
