"""Small review pictures of a landmark on its scan: an axial and a coronal crop side by side, point marked.

Rendered on the workers (where the scan is already in memory) as PNG bytes; numpy, scipy and matplotlib's
PNG writer only (no figure, no pyplot state).
"""

from __future__ import annotations

import io

import numpy as np

from ..image import Image

#: thumbnail panel size, pixels
PANEL_PX = 96
_RED = np.array([1.0, 0.15, 0.1])


def _plane(image: Image, centre_lps: np.ndarray, u: np.ndarray, v: np.ndarray, width_mm: float) -> np.ndarray:
    """Intensities on a square of ``width_mm`` around ``centre_lps`` spanned by unit vectors ``u`` (columns) and
    ``v`` (rows), linearly interpolated; NaN outside the image."""
    from scipy.ndimage import map_coordinates

    step = width_mm / PANEL_PX
    t = (np.arange(PANEL_PX) - PANEL_PX // 2) * step  # the centre on pixel PANEL_PX // 2, where _mark draws the cross
    pts = centre_lps[None, None, :] + t[None, :, None] * u + t[:, None, None] * v  # (rows, cols, 3)
    d = image.ndim
    idx = image.grid.lps_to_index(pts.reshape(-1, 3)[:, :d])  # (n, d) in (i, j, k) order
    coords = idx[:, ::-1].T  # array order (k, j, i)
    # the voxels read as they are (a float32 copy of the whole volume per panel took most of a thumbnail's time:
    # 80 ms for a 512 x 512 x 133 CT), the interpolation computed in double, written as float32
    vals = map_coordinates(image.array, coords, output=np.float32, order=1, mode="constant", cval=np.nan)
    return vals.reshape(PANEL_PX, PANEL_PX)


#: colour of a panel's pixels outside the image (beyond its field of view): air inside it is black
OUTSIDE_RGB = np.array([0.12, 0.18, 0.42])


def _grey(values: np.ndarray, ct: bool) -> np.ndarray:
    """Intensities -> [0, 1] grey: a soft-tissue/bone window for CT, the 1-99 % range otherwise; outside the image
    (NaN) :data:`OUTSIDE_RGB`, so that a match beyond the scanned region shows as such (it looked like air)."""
    finite = values[np.isfinite(values)]
    if ct:
        lo, hi = -400.0, 600.0
    elif finite.size:
        lo, hi = np.percentile(finite, [1, 99])
    else:
        lo, hi = 0.0, 1.0
    g = np.clip((np.nan_to_num(values, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=2)
    rgb[~np.isfinite(values)] = OUTSIDE_RGB
    return rgb


#: colour of the orientation letters at each panel's edges
LETTER_RGB = np.array([1.0, 0.85, 0.2])
#: 5 x 7 pixel glyphs of the orientation letters (patient right/left, anterior/posterior, superior/inferior)
_GLYPHS = {k: np.array([[c == "#" for c in row] for row in rows.split()]) for k, rows in {
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
}.items()}


def _letters(rgb: np.ndarray, left: str, right: str, top: str, bottom: str) -> np.ndarray:
    """The patient directions at a panel's edges, as radiology viewers show them, each on a dark box."""
    h, w = _GLYPHS["R"].shape
    mid_y, mid_x = (PANEL_PX - h) // 2, (PANEL_PX - w) // 2
    for letter, (y, x) in ((left, (mid_y, 2)), (right, (mid_y, PANEL_PX - w - 2)), (top, (2, mid_x)),
                           (bottom, (PANEL_PX - h - 2, mid_x))):
        rgb[y - 1:y + h + 1, x - 1:x + w + 1] *= 0.3  # (the grey or blue under it, darkened)
        rgb[y:y + h, x:x + w][_GLYPHS[letter]] = LETTER_RGB
    return rgb


def _mark(rgb: np.ndarray) -> np.ndarray:
    """A red cross-hair with an open centre at the panel's middle."""
    c, gap, arm = PANEL_PX // 2, 3, 10
    for a in range(gap, arm):
        for y, x in ((c, c - a), (c, c + a), (c - a, c), (c + a, c)):
            rgb[y, x] = _RED
    return rgb


def is_ct(image: Image) -> bool:
    """Whether the thumbnails of ``image`` use the CT window: a volume with values below -500 (HU of air)."""
    if image.ndim != 3:
        return False
    finite = image.array[np.isfinite(image.array)] if image.array.dtype.kind == "f" else image.array
    return finite.size > 0 and float(np.min(finite)) < -500


def landmark_pngs(image: Image, points_lps_mm, width_mm: float = 80.0) -> list[bytes]:
    """:func:`landmark_png` of each point (LPS mm), the image's window found once."""
    ct = is_ct(image)
    return [landmark_png(image, p, width_mm, ct) for p in points_lps_mm]


def landmark_png(image: Image, point_lps_mm, width_mm: float = 80.0, ct: bool | None = None) -> bytes:
    """PNG bytes: axial (left; patient left to the right, anterior up) and coronal (right; superior up) crops of
    ``width_mm`` around ``point_lps_mm`` (LPS mm), the point marked and the patient directions at the edges (R, L,
    A, P, S, I); one panel for 2D images, without letters (a radiograph's plane is not known). ``ct``: the CT window
    (:func:`is_ct`; None: found here, from every voxel)."""
    from matplotlib.image import imsave

    p = np.zeros(3)
    p[: len(point_lps_mm)] = np.asarray(point_lps_mm, dtype=float)[:3]
    ct = is_ct(image) if ct is None else ct
    x, y, z = np.eye(3)
    if image.ndim == 2:
        panels = [_plane(image, p, x, y, width_mm)]
    else:
        panels = [_plane(image, p, x, y, width_mm), _plane(image, p, x, -z, width_mm)]
    rgbs = [_mark(_grey(v, ct)) for v in panels]
    if image.ndim == 3:
        rgbs = [_letters(rgbs[0], "R", "L", "A", "P"), _letters(rgbs[1], "R", "L", "S", "I")]
    sep = np.ones((PANEL_PX, 3, 3))
    out = rgbs[0] if len(rgbs) == 1 else np.concatenate([rgbs[0], sep, rgbs[1]], axis=1)
    buf = io.BytesIO()
    imsave(buf, out, format="png")
    return buf.getvalue()
