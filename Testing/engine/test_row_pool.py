"""Feature buffers of freed maps serve later maps (``samembed.row_pool``), only when nothing else reads them, and a
multi-target match gives the same results whether its targets' buffers are fresh or reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samembed import Matcher, row_pool
from samembed.tiles import new_feature_rows

from ..conftest import data_file


class Owner:
    """Stands for the maps that hold a buffer (anything a weak reference can point to)."""


@pytest.fixture
def pool():
    """The pool switched on in this process for one test, then off (nothing kept) as the test process had it."""
    row_pool.keep_freed_rows(True)
    try:
        yield row_pool
    finally:
        row_pool.keep_freed_rows(False)


def _owned_rows(n: int, c: int, dtype=torch.float32) -> tuple[Owner, torch.Tensor]:
    owner, rows = Owner(), new_feature_rows(n, c, dtype, "cpu")
    row_pool.give_back_when_freed(owner, rows)
    return owner, rows


def test_a_freed_buffer_serves_the_next_that_fits(pool):
    owner, rows = _owned_rows(1000, 8)
    ptr = rows.data_ptr()
    before = pool.reuses()
    del owner, rows
    assert pool.kept_bytes() == 1000 * 8 * 4
    again = new_feature_rows(900, 8, torch.float32, "cpu")  # smaller: the first rows of the freed one
    assert again.data_ptr() == ptr and tuple(again.shape) == (900, 8)
    assert pool.reuses() == before + 1 and pool.kept_bytes() == 0


@pytest.mark.parametrize(("n", "dtype"), [(1001, torch.float32), (1000, torch.float16)], ids=["larger", "other-dtype"])
def test_a_buffer_that_does_not_fit_is_new_and_the_freed_one_stays_kept(pool, n, dtype):
    owner, rows = _owned_rows(1000, 8)
    ptr = rows.data_ptr()
    del owner, rows
    other = new_feature_rows(n, 8, dtype, "cpu")
    assert other.data_ptr() != ptr
    assert pool.kept_bytes() == 1000 * 8 * 4  # still there for a map it fits


def test_a_view_held_elsewhere_keeps_the_buffer_out_of_the_pool(pool):
    owner, rows = _owned_rows(1000, 8)
    rows.copy_(torch.arange(8000, dtype=torch.float32).view(1000, 8))
    held = rows[10:20].T  # as a caller's view of a map's features (maps.local, say) outlives the maps
    ptr = rows.data_ptr()
    del owner, rows
    new = new_feature_rows(1000, 8, torch.float32, "cpu")
    assert new.data_ptr() != ptr, "a buffer someone still reads was handed to another map"
    new.fill_(-1.0)
    assert torch.equal(held, torch.arange(80, 160, dtype=torch.float32).view(10, 8).T)
    assert pool.kept_bytes() == 0  # let go: it is freed when the view goes


def test_off_nothing_is_kept():
    row_pool.keep_freed_rows(False)
    before = row_pool.reuses()
    owner, rows = _owned_rows(1000, 8)
    del owner, rows
    assert row_pool.kept_bytes() == 0
    new_feature_rows(16, 8, torch.float32, "cpu")
    assert row_pool.reuses() == before


def test_at_most_two_are_kept(pool):
    owners = [_owned_rows(100 * (i + 1), 8) for i in range(3)]
    for i in range(3):  # freed in order: 100, 200, then 300 rows
        owners[i] = None
    assert pool.kept_bytes() == (200 + 300) * 8 * 4  # the two most recently freed


def test_a_match_into_several_targets_is_the_same_with_reused_buffers(pool):
    """pt_215's organ centroids into three head-and-neck CTs of the same grid size (80 x 128 x 128 local voxels), as
    ``samembed match`` runs them (no embeddings kept beyond the source and the current target), so the third target
    is embedded into the first one's freed buffer, with the first target's values still in it; then again with fresh
    buffers. Every match, score and round trip is the same, bit for bit."""
    import csv

    ct = [data_file("ct", "openkbp", "ct", f"{p}_ct.nii.gz") for p in ("pt_215", "pt_202", "pt_231", "pt_218")]
    rows = [r for r in csv.DictReader(data_file("ct", "openkbp", "oar_centroids.csv").open()) if r["patient"] == "pt_215"]
    pts = np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in rows])

    def run() -> list:
        m = Matcher("default", device="cpu", cache_bytes=0)
        res = m.match(ct[0], pts, ct[1:])
        return [(x.target_index, x.label, tuple(x.point_lps_mm), x.score, x.roundtrip_mm, x.ncc) for x in res.matches]

    before = pool.reuses()
    reused = run()
    assert pool.reuses() - before >= 1, "no target was embedded into a freed buffer"
    pool.keep_freed_rows(False)
    fresh = run()
    assert len(reused) == 3 * len(pts)
    assert reused == fresh
