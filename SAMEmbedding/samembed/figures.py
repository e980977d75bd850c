"""Pictures a clinician reads at a glance: a source point beside its match, with the similarity heatmap.

:func:`match_figure` draws two crops through the points, each in its image's own slice plane (the source around the
clicked point, the target around its match), each labelled with its orientation (the patient directions of its
axes, from the image's direction cosines), its plane (axial, coronal or sagittal) and its slice position (LPS mm); a
radiograph (a 2D image) is shown as it is. ``samembed match --figure-dir`` draws one per matched point. The heatmap
is coloured over its robust range inside the body only, and low similarity is transparent, so the hot spot stands
out instead of washing over the slice.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .image import Grid, Image
from .preprocess import detect_modality


def matplotlib_config_dir() -> Path | None:
    """Set ``MPLCONFIGDIR`` to a folder of this user's under the temporary folder (made, kept between runs) when
    matplotlib's own (``$XDG_CONFIG_HOME/matplotlib`` or ``~/.config/matplotlib``) cannot be written, before
    matplotlib is imported; returns that folder, or None where nothing was needed. Matplotlib then makes a
    temporary folder of its own per process, removed at exit; the command ends with ``os._exit``, so each run left
    one behind, and rebuilt its font cache with a warning (a review)."""
    import os
    import sys
    import tempfile

    if "MPLCONFIGDIR" in os.environ or "matplotlib" in sys.modules:
        return None
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "matplotlib"
    probe = home if home.exists() else next((p for p in home.parents if p.exists()), home)
    if os.access(probe, os.W_OK | os.X_OK):
        return None
    folder = Path(tempfile.gettempdir()) / f"samembed-matplotlib-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    os.environ["MPLCONFIGDIR"] = str(folder)
    return folder


#: LPS axis letters: the patient direction of +x, +y, +z, and of their opposites
_POSITIVE, _NEGATIVE = "LPS", "RAI"
#: the plane of a slice whose normal lies along LPS x, y or z, and that axis's name
_PLANES = (("sagittal", "x"), ("coronal", "y"), ("axial", "z"))


def slice_plane(direction: np.ndarray) -> tuple[str, int]:
    """The plane of an image's slices (its third axis, ``direction[:, 2]``, is their normal): ("axial", 2),
    ("coronal", 1) or ("sagittal", 0), by the LPS axis nearest to the normal."""
    a = int(np.argmax(np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2])))
    return _PLANES[a][0], a


def axis_letters(direction_column: np.ndarray) -> tuple[str, str]:
    """(letter at the low-index end, letter at the high-index end) of an image axis whose direction (LPS) is
    ``direction_column``: e.g. +x -> ("R", "L")."""
    a = int(np.argmax(np.abs(direction_column)))
    if direction_column[a] >= 0:
        return _NEGATIVE[a], _POSITIVE[a]
    return _POSITIVE[a], _NEGATIVE[a]


def _crop(image: Image, point_lps_mm: np.ndarray, half_mm: float):
    """The slice through the point (a 2D image: the image itself), cropped to +-half_mm: ((rows, cols), slice index
    (None in 2D), extent (mm), the crop's own grid: one slice of the image's voxels, where a heatmap on another grid
    is resampled)."""
    d = image.ndim
    ijk = image.grid.lps_to_index(np.asarray(point_lps_mm, dtype=np.float64)[None, :d])[0]
    k = int(np.clip(np.floor(ijk[2] + 0.5), 0, image.array.shape[0] - 1)) if d == 3 else None
    sp = np.asarray(image.grid.spacing_mm, dtype=np.float64)
    r = np.ceil(half_mm / sp[:2]).astype(int)
    rows, cols = image.array.shape[-2:]
    i0, i1 = max(0, int(ijk[0]) - r[0]), min(cols, int(ijk[0]) + r[0] + 1)
    j0, j1 = max(0, int(ijk[1]) - r[1]), min(rows, int(ijk[1]) + r[1] + 1)
    extent = ((i0 - 0.5) * sp[0], (i1 - 0.5) * sp[0], (j1 - 0.5) * sp[1], (j0 - 0.5) * sp[1])
    corner = [i0, j0] + ([k] if d == 3 else [])
    grid = Grid((1, j1 - j0, i1 - i0) if d == 3 else (j1 - j0, i1 - i0), image.grid.spacing_mm,
                image.grid.index_to_lps(np.array([corner], dtype=np.float64))[0], image.grid.direction)
    return (slice(j0, j1), slice(i0, i1)), k, extent, grid


def _plane(image: Image, k: int | None) -> np.ndarray:
    """The image's slice ``k`` (a 2D image: its pixels)."""
    return image.array if k is None else image.array[k]


def _grey(pixels: np.ndarray, ct: bool) -> np.ndarray:
    """Intensities to show: a CT in Hounsfield units from -1000 to 600 (air to bone), anything else (MRI, a
    radiograph) from its crop's 1st to 99th percentile."""
    if ct:
        return np.clip(pixels, -1000, 600)
    lo, hi = np.percentile(pixels, [1, 99]) if pixels.size else (0.0, 1.0)
    return np.clip(pixels, lo, hi if hi > lo else lo + 1)


def _heatmap_crop(heatmap: Image, image: Image, k: int | None, crop, grid: Grid) -> np.ndarray:
    """The heatmap's values on the crop: its voxels where it is on the image's grid, else resampled onto the crop's
    grid (nearest neighbour: a map on the model's grid, ``Heatmaps.on_model_grid``, costs a crop, not a volume)."""
    if heatmap.grid.same_as(image.grid):
        return _plane(heatmap, k)[crop]
    from .heatmap import heatmap_on_grid

    values = heatmap_on_grid(heatmap.array, heatmap.grid, grid).array
    return values[0] if grid.ndim == 3 else values


def _scale_bar(ax, extent: tuple[float, float, float, float], length_mm: float = 20.0) -> None:
    """A white bar of ``length_mm`` (10 mm in a crop narrower than 40 mm) at a panel's lower left, with its length:
    a crop's size in mm at a glance (the panels had none). ``extent``: the crop's (left, right, bottom, top), mm."""
    left, right, bottom, top = extent
    if right - left < 2 * length_mm:
        length_mm = 10.0
    x0 = left + 0.05 * (right - left)
    y = bottom - 0.12 * (bottom - top)  # (rows grow downwards: bottom > top)
    ax.plot([x0, x0 + length_mm], [y, y], color="white", lw=3, solid_capstyle="butt")
    ax.text(x0 + length_mm / 2, y - 0.02 * (bottom - top), f"{length_mm:g} mm", color="white", fontsize=9,
            ha="center", va="bottom")
    ax.set_xlim(left, right)  # (the bar, inside the crop, changes nothing of its view)
    ax.set_ylim(bottom, top)


def robust_range(heatmap: np.ndarray, body: np.ndarray) -> tuple[float, float]:
    """Colour range of a similarity map: from its 90th percentile inside the body to its maximum there."""
    inside = heatmap[body] if body.any() else heatmap.reshape(-1)
    hi = float(inside.max())
    lo = float(np.percentile(inside, 90))
    return (lo, hi) if hi > lo else (hi - 1e-3, hi)


def match_figure(source: Image, point_lps_mm, target: Image, match_lps_mm, heatmap: Image | None = None, *,
                 truth_lps_mm=None, title: str = "", half_mm: float = 60.0, body_hu: float = -950.0):
    """A matplotlib Figure: the source crop with its point beside the target crop with the match and the map.

    Args:
        source, target: the images (3D or 2D, LPS mm; a CT is shown from -1000 to 600 HU, others by their crop's
            percentiles).
        point_lps_mm: the clicked point in the source; match_lps_mm: its match in the target.
        heatmap: the point's similarity map in the target's physical space: on the target's grid (from
            ``MatchOptions(heatmap=True)``), or on any other (``Heatmaps.on_model_grid``), resampled on the crop.
        truth_lps_mm: the true position in the target, when known (drawn as a green cross).
        half_mm: half-size of each crop, mm.
        body_hu: for a CT, intensities above this count as body (lungs included) for the heatmap's colour range;
            elsewhere the range is over the voxels the map was computed on.
    """
    matplotlib_config_dir()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.6))  # (not pyplot's: figures of targets matched at once are drawn from threads)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], source, point_lps_mm, None, "source"), (axes[1], target, match_lps_mm, heatmap, "target"))
    colour_bar = None
    for ax, img, p, hm, name in panels:
        crop, k, extent, grid = _crop(img, np.asarray(p, dtype=np.float64), half_mm)
        sl = _plane(img, k)[crop].astype(np.float32)
        ct = detect_modality(img) == "ct"  # (the engine's own test: air in HU, on a sample of slices)
        ax.imshow(_grey(sl, ct), cmap="gray", extent=extent, interpolation="nearest")
        if hm is not None:
            hsl = _heatmap_crop(hm, img, k, crop, grid)
            lo, hi = robust_range(hsl, (sl > body_hu) & (hsl > -1) if ct else hsl > -1)
            norm = Normalize(lo, hi, clip=True)
            rgba = colormaps["inferno"](norm(hsl))
            rgba[..., 3] = 0.75 * np.clip((hsl - lo) / max(hi - lo, 1e-6), 0, 1)  # low similarity: transparent
            ax.imshow(rgba, extent=extent, interpolation="nearest")
            colour_bar = ScalarMappable(norm=norm, cmap="inferno")
        d = img.ndim
        at = img.grid.lps_to_index(np.asarray(p, dtype=np.float64)[None, :d])[0]
        ij = at[:2] * np.asarray(img.grid.spacing_mm)[:2]
        ax.plot(ij[0], ij[1], "c+", ms=16, mew=2, label="click" if name == "source" else "match")
        if name == "target" and truth_lps_mm is not None:
            truth = np.asarray(truth_lps_mm, dtype=np.float64)[:3]
            tijk = img.grid.lps_to_index(truth[None, :d])[0]
            t = tijk[:2] * np.asarray(img.grid.spacing_mm)[:2]
            inside = extent[0] <= t[0] <= extent[1] and extent[3] <= t[1] <= extent[2]
            if (k is None or abs(tijk[2] - k) <= 0.5) and inside:  # on this slice, in the crop: drawn where it is
                ax.plot(t[0], t[1], "gx", ms=12, mew=2, label="truth")
            else:  # elsewhere: said, not drawn on a slice it is not on (nor beyond the crop, stretching it)
                off = "" if k is None else f", {(tijk[2] - k) * float(img.grid.spacing_mm[2]):+.1f} mm off this slice"
                away = float(np.linalg.norm((truth - np.asarray(p, dtype=np.float64)[:3])[:d]))
                ax.text(0.02, 0.08, f"truth {away:.1f} mm from the match{off}"
                        + ("" if inside else ", outside the crop"), transform=ax.transAxes, color="lime",
                        fontsize=9, ha="left", va="bottom")
        _scale_bar(ax, extent)
        if k is None:  # (a radiograph's axes are its detector's, not the patient's: no orientation letters)
            where = "2D image"
        else:
            direction = np.asarray(img.grid.direction).reshape(3, 3)
            (left, right), (top, bottom) = axis_letters(direction[:, 0]), axis_letters(direction[:, 1])
            for text, xy in ((left, (0.02, 0.5)), (right, (0.98, 0.5)), (top, (0.5, 0.97)), (bottom, (0.5, 0.03))):
                ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=13, fontweight="bold",
                        ha="center", va="center")
            plane, axis = slice_plane(direction)
            at_mm = float(img.grid.index_to_lps(np.array([[*at[:2], float(k)]]))[0][axis])
            where = f"{plane} slice {_PLANES[axis][1]} = {at_mm:.1f} mm (LPS)"
        ax.set_title(f"{name}: {Path(img.name).name}\n{where}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=8)
    if colour_bar is not None:
        fig.colorbar(colour_bar, ax=axes[1], fraction=0.046, pad=0.02,
                     label="SAM similarity (colour: the map's top 10 % in the crop)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


#: one figure drawn at a time: targets matched at once (``--jobs``) draw from their threads, and matplotlib's text
#: and font caches are not made for threads (drawing holds the GIL anyway: serialising costs little)
_DRAWING = threading.Lock()


def save_match_figure(path: str | Path, *args, **kwargs) -> Path:
    """:func:`match_figure` written to a PNG (atomically, following the umask)."""
    from .io import atomic_path

    with _DRAWING:
        fig = match_figure(*args, **kwargs)
    with atomic_path(path) as tmp, _DRAWING:
        # zlib's fastest level: 0.15 -> 0.02 s of the 0.34 s of a figure, for a file about a third larger
        fig.savefig(tmp, dpi=110, format="png", pil_kwargs={"compress_level": 1})
    return Path(path)
