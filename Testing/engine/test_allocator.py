"""The engine's processes keep freed memory for reuse (samembed.allocator): a block freed and allocated again is not
faulted in again. Each case runs in a fresh interpreter, since the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = str(Path(__file__).resolve().parents[2] / "SAMEmbedding")

#: a fresh process allocates with the C library's malloc, fills and frees a 48 MB block
#: (above glibc's largest dynamic mmap threshold, 32 MB: by default it is mapped and unmapped each time), then does it
#: again and counts the second fill's page faults
REUSE = """
import ctypes, json, resource, sys
sys.path.insert(0, {engine!r})
applied = None
if {keep}:
    from samembed.allocator import keep_freed_memory
    applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 48 << 20
a = libc.malloc(n); ctypes.memset(a, 1, n); libc.free(a)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = libc.malloc(n); ctypes.memset(b, 2, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
last = ctypes.c_uint8.from_address(b + n - 1).value
libc.free(b)
print(json.dumps({{"applied": applied, "faults": faults, "pages": n // 4096, "last": last}}))
"""


def _second_fill(keep: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", REUSE.format(engine=ENGINE, keep=keep)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_a_freed_block_is_reused_without_page_faults():
    if not sys.platform.startswith("linux"):
        pytest.skip("the allocator setting is glibc's (Linux)")
    kept = _second_fill(True)
    if kept["applied"] is False:
        pytest.skip("this C library is not glibc: the setting does not apply here")
    default = _second_fill(False)
    # the control: by default the second block is mapped afresh, and every page of it faults in again
    assert default["faults"] > 0.5 * default["pages"]
    # kept: the freed block is the new one's memory, already resident
    assert kept["applied"] is True
    assert kept["faults"] < 0.05 * kept["pages"]
    assert kept["last"] == default["last"] == 2  # the memory holds what was written

