"""Reading and writing images and point lists; every write is atomic (temp file, then rename).

Images: everything SimpleITK reads (NIfTI, NRRD, MHA, a DICOM series folder, PNG/JPEG as 2D).
Points: CSV ``label,x,y,z`` (LPS mm unless ``ras=True``), Slicer ``.fcsv`` and ``.mrk.json``
(their coordinate-system field is honoured on read and written on write).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import Grid, Image, lps_to_ras, single_slice_to_2d
from .nifti_complete import check_nifti_complete, check_nifti_voxel_sizes, nifti_head, nifti_layout
from .nifti_gz import read_nifti_gz, warn_non_finite_nii

log = logging.getLogger(__name__)

#: one thread at a time parses a ``.npy`` header: numpy parses it with ``ast.literal_eval``, which Python 3.11 cannot
#: run in two threads at once ("SystemError: AST constructor recursion depth mismatch", CPython gh-106905)
_NPY_HEADERS = threading.Lock()


def load_npy(path: str | os.PathLike, mapped: bool = False) -> np.ndarray:
    """``np.load(path, mmap_mode="r" if mapped else None)`` for a plain ``.npy`` array, safe to call from several
    threads at once: only the header's parsing is serialised (:data:`_NPY_HEADERS`), not the reading."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        with _NPY_HEADERS:
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        order = "F" if fortran else "C"
        if mapped:
            return np.memmap(path, dtype=dtype, mode="r", shape=shape, order=order, offset=f.tell())
        count = int(np.prod(shape))
        array = np.fromfile(f, dtype=dtype, count=count)
        if array.size != count:
            raise InputError(f"{path}: the array file is cut short ({array.size} of {count} values)")
        return array.reshape(shape, order=order)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz", ".mrk.json", ".seg.nrrd"):
        if name.endswith(s):
            return s
    return path.suffix


def check_is_folder(what: str, folder: Path) -> None:
    """Raise :class:`InputError` when ``folder`` (the value of ``what``, e.g. ``--cache-dir``) exists and is a file;
    a folder, or nothing yet, passes."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder}: is a file, expected a folder")


def output_folder(flag: str, folder: Path) -> None:
    """Make the output folder ``folder`` of option ``flag`` (with its parents) unless it exists, before anything is
    computed; :class:`InputError` names the flag, the path and the problem (a file, not creatable, not writable)."""
    check_is_folder(flag, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {folder}: cannot create the folder ({e.strerror or e}); choose another {flag}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder}: the folder is not writable; choose another {flag}")


def _output_target(path: str | os.PathLike) -> Path:
    """The file an output named ``path`` is written to (a symbolic link's target); :class:`InputError` when it
    cannot be a written file: its folder is missing or not writable, or it is a folder, a device, a pipe or a
    socket (:func:`atomic_path` renames a new file onto the name: a device such as ``/dev/null``, written as root,
    became a regular file, and a pipe's reader waited forever; a review)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: output folder {folder} is not writable; choose another folder")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file name")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: is not a regular file (a device, a pipe or a socket), and an output is written as a "
                         "file in its place; choose a file name")
    return path


def _read_only(path: Path) -> bool:
    """Whether ``path`` is an existing file this user may not write (never for root, as for the shell's ``>``)."""
    return path.is_file() and not os.access(path, os.W_OK)


def check_writable(path: str | os.PathLike) -> Path:
    """Raise :class:`InputError` unless ``path`` can be written: its folder exists and is writable, and it is no
    folder, no device, pipe or socket, and no file this user may not write (a read-only earlier result: the rename
    of :func:`atomic_path` would replace it, where the shell's ``>`` refuses). Returns the path written: a symbolic
    link's target (outputs are written through links, :func:`atomic_path`)."""
    path = _output_target(path)
    if _read_only(path):
        raise InputError(f"{path}: the file is read-only (this user may not write it), and it would be replaced; make "
                         "it writable, or choose another name")
    return path


def check_readable(path: Path) -> None:
    """Raise :class:`PermissionError` (the system's refusal: exit code 1, the file named) when ``path`` exists but
    this user may not read it (a folder: list it), rather than let a reader call it missing or corrupt."""
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(errno.EACCES, "permission denied: this user may not read it; check its permissions",
                              str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    A new file gets the permissions any other tool would give it (0666 less the umask), not the owner-only
    mode of the private temporary file, so collaborators on a shared disk can read results. A file written
    again keeps its own permissions (a user who restricted a file of patient data keeps it restricted), and a
    symbolic link is written through, as the shell's ``>`` does: its target gets the new content. A
    write that fails for want of room (a full disk, a quota) is raised naming ``path``, with what to do.
    """
    path = _output_target(path)  # (a link's target)
    if _read_only(path):  # (as the rename onto it would have failed: an OSError naming both files, as os.replace's)
        raise PermissionError(errno.EACCES, "the file is read-only (this user may not write it); make it writable, "
                                            "or choose another name", str(path), None, str(path))
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~current_umask()
    except OSError:
        mode = 0o666 & ~current_umask()
    suffix = ".tmp" + _suffix(path)
    # named after the file (an entry's unfinished write is known by it: samembed.tiles.UNFINISHED_NAME), unless that
    # name would be too long for the folder, where a name that fits alone failed for its temporary name (a review)
    prefix = f".{path.name}." if len(os.fsencode(f".{path.name}.{suffix}")) + 8 <= _name_max(path.parent) \
        else ".samembed-"
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as e:
        raise _named(e, path) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except OSError as e:
        raise _named(e, path) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: the errors of a write that had no room
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _named(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` where it names no file (a write's "No space left on device" named none, and the
    command printed it as it was: a review), with what to do when there was no room."""
    if error.filename is not None and error.errno not in _NO_ROOM:
        return error
    what = error.strerror or str(error)
    if error.errno in _NO_ROOM:
        what += f" (free space in {path.parent}, or write elsewhere)"
    return type(error)(error.errno, what, str(path))


def _name_max(folder: Path) -> int:
    """The longest file name ``folder``'s file system takes, in bytes (255 where it cannot be asked)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where the system allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore, under a lock
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, as UTF-8, and return the path. A file name in it that is not valid
    UTF-8 (read by Python as surrogate escapes, :func:`utf8_name`) is written as its own bytes, as the shell shows it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    return Path(path)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` of ``array`` to ``path`` atomically (a process killed or a disk filled mid-write leaves no
    cut-short ``.npy`` under the name, which a later ``np.load`` would take for whole); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
class _SitkVoxels:
    """A SimpleITK image's voxel buffer exposed through NumPy's array interface, writable, keeping the image alive
    (an array made from it holds it as its base). SimpleITK's own view is read-only and does not keep the image."""

    def __init__(self, image) -> None:
        import SimpleITK as sitk

        view = sitk.GetArrayViewFromImage(image)  # makes the buffer the image's own (MakeUnique)
        self._image = image
        self.__array_interface__ = {**view.__array_interface__, "data": (view.__array_interface__["data"][0], False)}


def sitk_voxels(img) -> np.ndarray:
    """The voxels of a ``SimpleITK.Image`` (zyx, components last), a writable array in the image's own memory: the
    values of ``GetArrayFromImage`` without its copy (a volume-sized array less to make; on a VM whose fresh memory
    costs about 10 us per 4 KB page, 0.05-0.2 s of a CT). The image stays alive as long as the array, and a write
    to the array is a write to the image: use it on an image that is nobody else's."""
    return np.asarray(_SitkVoxels(img))


#: the suffixes of pictures (2D, no pixel spacing of their own, several components = colours)
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_from_sitk(img, name: str = "<sitk>", spacing_known: bool = True, own: bool = False) -> Image:
    """Convert a ``SimpleITK.Image`` (scalar) to an engine :class:`Image`, keeping its geometry.

    ``own``: ``img`` is nobody else's (e.g. just read from a file): the :class:`Image` takes its voxel buffer instead of
    a copy (:func:`sitk_voxels`). Otherwise the voxels are copied, so that a change to ``img`` never reaches the engine.
    """
    import SimpleITK as sitk

    if "LabelMap" in type(img).__name__ or "label" in img.GetPixelIDTypeAsString().lower() or (
            "complex" in img.GetPixelIDTypeAsString().lower()):
        # (SimpleITK ends the whole process, a Jupyter kernel or Slicer, when a label map is turned into an array)
        raise InputError(f"{name}: a {img.GetPixelIDTypeAsString()} image cannot be matched; pass a scalar image "
                         "(a label map: SimpleITK.LabelMapToLabel(image); complex values: SimpleITK.ComplexToModulus)")
    n = img.GetNumberOfComponentsPerPixel()
    if n > 1:
        picture = name.lower().endswith(RASTER_SUFFIXES)  # a picture's components are its colours, of any type
        if n not in (2, 3, 4) or not picture and img.GetPixelID() not in (sitk.sitkVectorUInt8, sitk.sitkVectorUInt16):
            # not grey + alpha, RGB or RGBA: several volumes in one (a multi-volume NRRD holds a 4D CT's phases so)
            raise InputError(
                f"{name}: {n} values per voxel ({img.GetPixelIDTypeAsString()}), not a colour image: several volumes in "
                f"one (e.g. the phases of a 4D CT) or a vector field; pass one scalar volume (the frame you want, "
                f"e.g. from Slicer's Sequences module or SimpleITK.VectorIndexSelectionCast(image, k))")
        # colour PNG/JPEG/TIFF: the grey channel of grey + alpha, else the mean of red, green and blue
        img = sitk.VectorIndexSelectionCast(img, 0, sitk.sitkFloat32) if n == 2 else _rgb_to_grey(img)
    arr = sitk_voxels(img) if own else sitk.GetArrayFromImage(img)
    d = img.GetDimension()
    if d not in (2, 3):
        raise InputError(f"{name}: {d}D images are not supported; expected a 2D or 3D scalar image"
                         + ("; pass one 3D volume (the frame you want, e.g. from Slicer's Sequences module or "
                            "SimpleITK's image[:, :, :, k])" if d == 4 else ""))
    direction, spacing = np.array(img.GetDirection()).reshape(d, d), np.array(img.GetSpacing(), dtype=np.float64)
    lengths = np.linalg.norm(direction, axis=0)
    if np.all(np.isfinite(lengths)) and np.all(lengths > 0) and np.any(np.abs(lengths - 1.0) > 1e-6):
        # a direction whose axes are not unit vectors (an MHA's TransformMatrix may scale them; NRRD's space
        # directions are normalised by ITK): the same physical grid with the lengths in the spacing, which the
        # resampling reads alone (a scaled axis was resampled at the wrong scale: 204 mm of error in a review)
        log.info("%s: the direction's axes have lengths %s, not 1: taken into the spacing (%s mm), the same positions",
                 name, " x ".join(f"{v:g}" for v in lengths), " x ".join(f"{v:g}" for v in spacing * lengths))
        direction, spacing = direction / lengths, spacing * lengths
    grid = Grid(arr.shape, spacing, img.GetOrigin(), direction)
    if d == 3 and arr.shape[0] == 1:
        # one slice (a radiograph as DICOM or NIfTI, a PNG read as 3D): a 2D image
        return single_slice_to_2d(arr, grid, name, spacing_known)
    return Image(arr, grid, name, spacing_known)


def _rgb_to_grey(img):
    import SimpleITK as sitk

    n = img.GetNumberOfComponentsPerPixel()
    chans = [sitk.VectorIndexSelectionCast(img, c, sitk.sitkFloat32) for c in range(min(n, 3))]
    grey = chans[0]
    for c in chans[1:]:
        grey = grey + c
    return grey / float(len(chans))


def image_to_sitk(image: Image):
    """Convert an engine :class:`Image` to a ``SimpleITK.Image`` with the same geometry."""
    import SimpleITK as sitk

    return set_sitk_geometry(sitk.GetImageFromArray(np.ascontiguousarray(image.array)), image.grid)


def set_sitk_geometry(img, grid: Grid):
    """Give the ``SimpleITK.Image`` ``img`` the spacing, origin and direction of ``grid`` (in place); returns it."""
    img.SetSpacing(tuple(float(s) for s in grid.spacing_mm))
    img.SetOrigin(tuple(float(s) for s in grid.origin_lps_mm))
    img.SetDirection(tuple(float(s) for s in grid.direction.ravel()))
    return img


def shadowing_file(path: Path) -> Path | None:
    """The uncompressed ``.nii`` file beside the ``.nii.gz`` file ``path`` with the same name, whose voxels ITK's
    NIfTI reader reads instead of ``path``'s (with ``path``'s header: a corrupt image, without a word; the NIfTI
    library looks for the image file by extension, ``.nii`` first, ITK issue 2243, Slicer issue 5378), or None."""
    name = path.name
    if not name.lower().endswith(".nii.gz"):
        return None
    stem = name[: -len(".nii.gz")]
    for other in (stem + ".nii", stem + ".NII"):
        if (path.parent / other).exists():
            return path.parent / other
    return None


def utf8_name(path: str | os.PathLike) -> bool:
    """Whether ``path`` is valid UTF-8, as SimpleITK needs a file name to be: a name of other bytes (from a Latin-1
    or Windows archive, unzipped on Linux) reaches Python as surrogate escapes, which SimpleITK's wrapper cannot
    convert, and the process ends in C++ (``std::logic_error``, SIGABRT) with no word of the file."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_utf8_name(path: str | os.PathLike, what: str = "this file") -> None:
    """Raise :class:`InputError` naming ``path`` when SimpleITK cannot be given it (:func:`utf8_name`)."""
    if not utf8_name(path):
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # its bytes that are not UTF-8 as \xNN
        raise InputError(f"{shown}: the name of {what} is not valid UTF-8, which ITK cannot open; rename it (e.g. "
                         "with convmv -f latin1 -t utf8)")


@contextlib.contextmanager
def _unshadowed(path: Path) -> Iterator[Path]:
    """A name by which SimpleITK reads the file ``path`` itself: ``path``, or, when a ``.nii`` file beside it would
    be read instead (:func:`shadowing_file`) or the path is not valid UTF-8 (:func:`utf8_name`), a link to it (a
    copy where links cannot be made) alone in a private temporary folder, removed afterwards, with the file's own
    suffix. The user's folder is not touched."""
    other = shadowing_file(path)
    if other is None and utf8_name(path):
        yield path
        return
    if other is not None:
        log.warning("%s: %s lies beside it, and ITK's NIfTI reader would read that file's voxels instead; reading %s "
                    "through a link of its own (rename or remove one of the two to avoid the confusion in other "
                    "tools, such as Slicer)", path, other.name, path.name)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    require_utf8_name(suffix, "this file's suffix")  # (which tells ITK its format)
    with tempfile.TemporaryDirectory(prefix="samembed-read-") as folder:
        alias = Path(folder) / f"image{suffix}"
        try:
            alias.symlink_to(path.resolve())
        except OSError:  # no links here (Windows without the privilege): a copy
            import shutil

            shutil.copyfile(path, alias)
        yield alias


#: held while ITK's warnings are switched off for one call (:func:`_series_files`)
_ITK_WARNINGS_LOCK = threading.Lock()


def _series_files(folder: Path, reader) -> tuple[str, ...]:
    """The files of the DICOM series to read from ``folder``: its only series, or, when it holds several (a study
    folder: scouts, reconstructions), the one with the most files (the first of them in GDCM's order on a tie), with
    a warning that names each series and says how to choose another."""
    import SimpleITK as sitk

    with _ITK_WARNINGS_LOCK:  # (the switch is the process's: one thread at a time turns it off and back)
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own "No Series were found" lines: said below
        try:
            series = reader.GetGDCMSeriesIDs(str(folder))
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not series:
        images = sorted(f.name for f in folder.iterdir()
                        if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) and not f.name.lower().endswith(".dcm"))
        hint = (f"; it holds {len(images)} image file(s) ({', '.join(images[:3])}{', ...' if len(images) > 3 else ''}): "
                "pass them themselves" if images else "; pass an image file or a DICOM folder")
        raise InputError(f"{folder}: folder holds no DICOM series{hint}")
    files = [reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series]
    pick = max(range(len(series)), key=lambda k: (len(files[k]), -k))
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({len(f)} files{_series_description(f[0])})" for uid, f in zip(series, files))
        log.warning("%s: the folder holds %d DICOM series: %s. Reading the one with the most files, %s; to read "
                    "another, put its files in a folder of their own", folder, len(series), listed, series[pick])
    return files[pick]


#: a DICOM series is one regular volume when each slice lies within this share of the usual slice step of where the
#: volume that ITK makes of it puts the slice: rounding of the positions in the files (0.005 mm at two decimals, 0.05
#: mm at one) passes; a slice missing or repeated (half a step), or a tilt that adds up, does not
SLICE_TOLERANCE = 0.2


def _slice_position(reader, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Slice ``k``'s Image Position (Patient) and its normal (from Image Orientation (Patient)), LPS mm, as an
    ``ImageSeriesReader`` with its meta-data array read them; None where either is missing or unreadable."""
    try:
        position = np.array([float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")])
        row_col = np.array([float(v) for v in reader.GetMetaData(k, "0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return None
    if position.shape != (3,) or row_col.shape != (6,):
        return None
    return position, np.cross(row_col[:3], row_col[3:])


def check_slice_positions(folder: Path, slices: list[tuple[np.ndarray, np.ndarray] | None]) -> None:
    """Raise :class:`InputError` when a DICOM series' slices, in the order read, are not one regular volume.

    ITK reads a series as a regular volume stacked along the first slice's normal, whose step is the first to last
    slice's distance over the steps between them, and only warns on the console when the slices are not so placed: a
    slice missing or repeated, two acquisitions in one series (for slices at 0, 3, 6, 12, 15 mm: steps of 3.75 mm,
    the middle slice 1.5 mm off), or slices that step off their normal (a gantry tilt: the volume sheared, by the
    tilt's offset times the slice count at the far end). Refused when a slice lies further than
    :data:`SLICE_TOLERANCE` of the usual step from its place in that volume, along the normal or across it. Nothing
    is checked for fewer than two slices or slices without positions."""
    if len(slices) < 2 or any(s is None for s in slices):
        return
    rel = np.array([p for p, _ in slices]) - slices[0][0]
    normal = slices[0][1] / (np.linalg.norm(slices[0][1]) or 1.0)
    along = rel @ normal
    steps = np.abs(np.diff(along))
    usual = float(np.median(steps))
    regular = np.arange(len(slices)) * (along[-1] - along[0]) / (len(slices) - 1)
    off_along = float(np.abs(along - regular).max())
    off_across = float(np.linalg.norm(rel - along[:, None] * normal, axis=1).max())
    fix = "load it in Slicer's DICOM module, which can regularise it, and save it as NIfTI or NRRD"
    if usual <= 0 or off_along > SLICE_TOLERANCE * usual:
        raise InputError(
            f"{folder}: the DICOM series' slices are not evenly spaced ({len(slices)} slices, steps from "
            f"{float(steps.min()):.3g} to {float(steps.max()):.3g} mm; read as one volume, a slice would lie up to "
            f"{off_along:.3g} mm from its place): slices missing, repeated, or two acquisitions in one series; {fix}, "
            f"or export the series again")
    if off_across > SLICE_TOLERANCE * usual:
        angle = float(np.degrees(np.arctan2(off_across, abs(float(along[-1] - along[0])))))
        raise InputError(
            f"{folder}: the DICOM series' slices step off their normal (a gantry tilt of about {angle:.2g} degrees; "
            f"read as one volume, a slice would lie up to {off_across:.3g} mm from its place); {fix}")


def _series_description(first_file: str) -> str:
    """``, "<Series Description>"`` of the DICOM file, or nothing when it has none or cannot be read."""
    import SimpleITK as sitk

    try:
        r = sitk.ImageFileReader()
        r.SetFileName(first_file)
        r.LoadPrivateTagsOff()
        r.ReadImageInformation()
        text = r.GetMetaData("0008|103e").strip() if r.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        return ""
    return f', "{text}"' if text else ""


#: whether this process has warned that a PNG/JPEG was read without its pixel spacing (once: a batch of 100
#: radiographs would warn 100 times)
_warned_no_spacing = False


def warn_unknown_spacing(image: Image) -> None:
    """Warn that ``image`` (a PNG/JPEG read without a given spacing: ``pixel_spacing_known`` False) is in pixels, not
    mm: a warning for the first such picture of the process, a debug line for the rest. :func:`read_image` calls it
    unless told not to; the ``samembed`` command calls it when it uses a picture (not for a target it skips)."""
    global _warned_no_spacing
    if image.pixel_spacing_known:
        return
    rows, cols = image.array.shape[-2:]
    log.log(logging.DEBUG if _warned_no_spacing else logging.WARNING,
            "%s: a %s carries no pixel spacing: 1 mm per pixel is assumed, so positions and search windows (mm) are "
            "in pixels, and this %d x %d pixel picture is taken as %.0f x %.0f cm of anatomy: the model sees it at "
            "the wrong scale (a radiograph's pixels are about 0.1-0.2 mm; on hand radiographs of 0.2 mm pixels read at "
            "1 mm, the mean error grew 2-12x); give the spacing (--spacing MM; Matcher(spacing_mm=...))%s", image.name,
            Path(image.name).suffix.lstrip(".").upper() or "raster", cols, rows, cols / 10, rows / 10,
            "" if _warned_no_spacing else " (said once: the same holds for every such picture read after it)")
    _warned_no_spacing = True


def spacing_warning_said() -> None:
    """Count :func:`warn_unknown_spacing`'s warning as said in this process, where another said it for the same
    pictures: a Dask worker of a ``samembed propagate`` run, whose command warned as it read the atlas (each worker
    said it again, without its level)."""
    global _warned_no_spacing
    _warned_no_spacing = True


def read_image(path: str | os.PathLike, spacing_mm: float | None = None, constant_ok: bool = False,
               warn_spacing: bool = True) -> Image:
    """Read an image file or a DICOM series folder into an :class:`Image`.

    Args:
        path: a file SimpleITK reads, or a folder holding a DICOM series (of several, the one with the most files,
            with a warning naming them all).
        spacing_mm: pixel spacing to assume for 2D files that carry none (PNG/JPEG); otherwise 1 mm is
            assumed and ``pixel_spacing_known`` is False.
        warn_spacing: warn, when that spacing is assumed, that positions are in pixels (:func:`warn_unknown_spacing`;
            False: the caller warns when it uses the image).

    Raises:
        InputError: missing, unreadable or corrupt file; a NIfTI file cut short (:mod:`samembed.nifti_complete`);
            an empty or non-finite image; a DICOM series that is not one regular volume
            (:func:`check_slice_positions`).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found{did_you_mean(path)}")
    check_readable(path)
    if path.is_file() and path.stat().st_size == 0:  # (named a format it did not have, or "no ImageIO reader")
        raise InputError(f"{path}: the file is empty (0 bytes); copy or export the image again")
    try:
        if path.is_dir():
            require_utf8_name(path, "this DICOM folder")
            reader = sitk.ImageSeriesReader()
            files = _series_files(path, reader)
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the check below
            img = reader.Execute()
            check_slice_positions(path, [_slice_position(reader, k) for k in range(len(files))])
        else:
            gzipped_nifti = path.name.lower().endswith(".nii.gz")
            check_nifti_voxel_sizes(path)  # SimpleITK reads a voxel size of 0 as 1 mm, one below 0 mirrored
            with _unshadowed(path) as sitk_path:
                fast = read_nifti_gz(path, sitk_path) if gzipped_nifti else None
                if fast is not None:  # inflated by isal, the geometry SimpleITK's (samembed.nifti_gz)
                    voxels, spacing, origin, direction = fast
                    grid = Grid(voxels.shape, spacing, origin, np.array(direction).reshape(3, 3))
                    image = Image(voxels, grid, str(path))
                    validate_image(image, constant_ok)
                    return image
                if not gzipped_nifti:  # a .nii.gz's length: checked as it was inflated (read_nifti_gz)
                    check_nifti_complete(path)  # SimpleITK reads a NIfTI cut short as zeros, without a word
                    if path.name.lower().endswith(".nii"):
                        warn_non_finite_nii(path)  # and its NaN voxels as 0 (the .nii.gz reading says so)
                img = sitk.ReadImage(str(sitk_path))
    except InputError:
        raise
    except RuntimeError as e:
        img = _grey_alpha_png(path) if path.suffix.lower() == ".png" else None
        if img is None:
            raise InputError(f"{path}: cannot read this image (unreadable or corrupt): {itk_reason(e, path)}") from e
    name = str(path)
    is_2d_raster = name.lower().endswith(RASTER_SUFFIXES)
    dicom_xy_mm = None
    if not path.is_dir() and img.GetDimension() == 3 and img.GetDepth() == 1 and img.HasMetaDataKey("0008|0016"):
        # a one-frame DICOM file (a radiograph): GDCM reads 1 mm where its kind of file keeps the spacing elsewhere
        # (a CR or DX with Pixel Spacing only) or nowhere (a secondary capture), and says nothing
        dicom_xy_mm = dicom_pixel_spacing_xy(img)
        if dicom_xy_mm is None:
            is_2d_raster = True  # spacing unknown: --spacing applies, and the warning says so
        elif np.allclose(img.GetSpacing()[:2], 1.0) and not np.allclose(dicom_xy_mm, 1.0):
            log.info("%s: pixel spacing %.4g x %.4g mm from the file's DICOM tags (ITK read 1 mm)", name, *dicom_xy_mm)
            img.SetSpacing((*dicom_xy_mm, img.GetSpacing()[2]))
    image = image_from_sitk(img, name, spacing_known=not is_2d_raster, own=True)
    if name.lower().endswith((".jpg", ".jpeg", ".tif", ".tiff")):
        turned = _exif_orientation(path)
        if turned not in (None, 1):
            log.warning("%s: its EXIF orientation tag (%d) asks viewers to turn or mirror the picture; the pixels are "
                        "used as stored (as ITK and Slicer show them), so points clicked in a viewer that applies the "
                        "tag do not fit: save the image upright without the tag", name, turned)
    if is_2d_raster:  # the given spacing, else 1 mm, as said: never the print resolution (DPI) that SimpleITK reads
        grid = image.grid  # from a JPEG's or TIFF's header as 25.4 / dpi mm
        given = spacing_mm is not None
        image = Image(image.array, Grid(grid.shape_zyx, np.full(grid.ndim, float(spacing_mm) if given else 1.0),
                                        grid.origin_lps_mm, grid.direction), name, given, image.plane_z_mm)
    validate_image(image, constant_ok)
    if warn_spacing:  # (the README says the log says so): a warning once, then a debug line
        warn_unknown_spacing(image)
    return image


def did_you_mean(path: str | os.PathLike) -> str:
    """" (did you mean NAME?)" for a missing file whose folder holds one of a close name (``pt_2_ct.nii`` for
    ``pt_2_ct.nii.gz``, a letter off), else "". Flags got such a suggestion, files did not."""
    import difflib

    path = Path(path)
    try:
        names = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names[:10000], 1, 0.8)
    return f" (did you mean {path.parent / close[0] if str(path.parent) != '.' else close[0]}?)" if close else ""


def _grey_alpha_png(path: Path):
    """The grey channel of a grey + alpha PNG (GIMP's and Pillow's "LA"), which ITK's PNG reader refuses ("Unknown
    PixelType"), as a ``SimpleITK.Image``; None for any other file (ITK's error then stands)."""
    import SimpleITK as sitk
    from PIL import Image as Picture  # (matplotlib's dependency)

    try:
        with Picture.open(path) as picture:
            if picture.mode != "LA":
                return None
            grey = np.asarray(picture.getchannel("L"))
    except (OSError, ValueError):
        return None
    log.info("%s: a grey + alpha PNG; its grey channel is used (its transparency is not)", path)
    return sitk.GetImageFromArray(grey)


def dicom_pixel_spacing_xy(img) -> tuple[float, float] | None:
    """A DICOM image's pixel spacing (x, y) in mm from its tags: Pixel Spacing (0028,0030), else Imager Pixel
    Spacing (0018,1164), else Nominal Scanned Pixel Spacing (0018,2010, a secondary capture's) (each "row
    spacing\\column spacing", i.e. y then x); None when it has none of them as two positive numbers."""
    for tag in ("0028|0030", "0018|1164", "0018|2010"):
        if img.HasMetaDataKey(tag):
            try:
                row, column = (float(v) for v in img.GetMetaData(tag).strip().split("\\"))
            except ValueError:
                continue
            if row > 0 and column > 0 and math.isfinite(row) and math.isfinite(column):
                return column, row
    return None


def _exif_orientation(path: Path) -> int | None:
    """The EXIF orientation tag of a JPEG or TIFF (1: upright; 2-8: to be mirrored or turned), or None when it has
    none or it cannot be read. Read from the file's header and its tag block, wherever they lie (no imaging library:
    Pillow's import alone took 12-16 ms of a cold first read)."""
    try:
        with open(path, "rb") as f:
            lead = f.read(4)
            if lead[:2] == b"\xff\xd8":  # JPEG: the TIFF structure inside its APP1 "Exif" segment
                base = _jpeg_exif_start(f)
            elif lead in (b"II*\0", b"MM\0*"):  # TIFF: the file is one
                base = 0
            else:
                return None
            return None if base is None else _tiff_orientation(f, base)
    except (OSError, ValueError):
        return None


def _jpeg_exif_start(f) -> int | None:
    """The file offset of the TIFF structure in a JPEG's APP1 "Exif" segment (``f`` just past the start marker,
    anywhere before the image data), or None. Fill bytes (0xFF) before a marker are skipped."""
    f.seek(2)
    for _ in range(256):  # segments before the image data; a damaged file ends the search
        byte = f.read(1)
        if byte != b"\xff":
            return None
        while byte == b"\xff":
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):  # the end, or the image data: no EXIF before it
            return None
        size = int.from_bytes(f.read(2), "big")
        if size < 2:
            return None
        start = f.tell()
        if marker == 0xE1 and f.read(6) == b"Exif\0\0":
            return start + 6
        f.seek(start + size - 2)
    return None


def _tiff_orientation(f, base: int) -> int | None:
    """The Orientation tag (0x0112) of the first tag block of the TIFF structure at file offset ``base``."""
    f.seek(base)
    head = f.read(8)
    order = {b"II": "little", b"MM": "big"}.get(head[:2])
    if order is None or len(head) < 8 or int.from_bytes(head[2:4], order) != 42:
        return None
    f.seek(base + int.from_bytes(head[4:8], order))
    count = int.from_bytes(f.read(2), order)
    entries = f.read(12 * min(count, 4096))
    for k in range(len(entries) // 12):
        entry = entries[12 * k: 12 * k + 12]
        if int.from_bytes(entry[:2], order) == 0x0112:  # a SHORT, held in the value field
            return int.from_bytes(entry[8:10], order)
    return None


#: voxels, evenly spread, that :func:`_varies` compares first
VARIES_SAMPLES = 1024


def _varies(arr: np.ndarray) -> bool:
    """Whether ``arr`` (no NaN) holds two different values: first :data:`VARIES_SAMPLES` voxels of a contiguous array,
    evenly spread, against the first voxel (a scan's differ at once: a 0.35 GB thin-slice CT is not read twice more,
    0.03 s of a first click each, nor its pages mapped one by one), then, when they are all equal, every voxel."""
    if arr.flags.c_contiguous and arr.size > VARIES_SAMPLES:
        flat = arr.reshape(-1)
        if bool((flat[::arr.size // VARIES_SAMPLES] != flat[0]).any()):
            return True
    return bool(arr.max() != arr.min())


def itk_reason(error: Exception, path: Path) -> str:
    """The reason in an ITK exception's text, on one line: what follows ``ITK ERROR: Class(0x...):`` (its last line
    was a matrix row, "0 0 1", for a singular direction). ITK's "Reason:" names the system's last error, which for a
    file that exists and was cut short is an unrelated "No such file or directory": left out."""
    text = str(error).strip()
    found = re.search(r"ITK ERROR: \w+\(0x[0-9a-fA-F]+\): (.*)", text, re.S)
    reason = " ".join((found.group(1) if found else text.splitlines()[-1] if text else "unknown reason").split())
    if path.exists():
        reason = reason.replace(" Reason: No such file or directory", "")
    return reason


def validate_image(image: Image, constant_ok: bool = False) -> None:
    """Raise :class:`InputError` for an empty, constant or non-finite image (``constant_ok``: a constant one passes,
    as a search mask of ones, everywhere, does).

    The check reads every voxel once; an image that passed is remembered (like its content hash), so
    repeated queries on the same :class:`Image` object do not pay for it again.
    """
    if image._validated:
        return
    arr = image.array
    if arr.size == 0 or min(arr.shape) == 0:
        raise InputError(f"{image.name}: image is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        n = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{image.name}: image holds {n} NaN or infinite voxels; fix or mask them before matching")
    if not constant_ok and not _varies(arr):
        raise InputError(f"{image.name}: image is constant (every voxel is {arr.flat[0]}); nothing to match")
    if np.iscomplexobj(arr) or arr.dtype.kind not in "biuf":
        raise InputError(f"{image.name}: voxels of type {arr.dtype} are not intensities; give a real-valued image "
                         "(the magnitude of a complex one, say)")
    grid = image.grid
    spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{image.name}: spacing {spacing.tolist()} mm: each must be a finite number > 0")
    if not np.all(np.isfinite(np.asarray(grid.origin_lps_mm, dtype=np.float64))):
        raise InputError(f"{image.name}: origin {np.asarray(grid.origin_lps_mm).tolist()}: not finite")
    direction = np.asarray(grid.direction, dtype=np.float64)
    if not np.all(np.isfinite(direction)) or abs(float(np.linalg.det(direction))) < 1e-6:
        raise InputError(f"{image.name}: direction {direction.round(6).tolist()} folds space flat (or is not "
                         "finite): its axes must point in independent directions")
    if not constant_ok:  # (the memo is of the full check)
        image._validated.append(True)


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write an :class:`Image` atomically in the format given by the file suffix. An image whose voxels are a
    ``SimpleITK.Image``'s own buffer (:func:`new_sitk_buffer`) is written from it, without a copy. A 2D image made
    from a one-slice volume (``plane_z_mm``: a radiograph stored as DICOM or NIfTI, its heatmaps) is written as such
    a volume, at its slice's z (:func:`samembed.image.one_slice_volume`)."""
    import SimpleITK as sitk

    if image.ndim == 2 and image.plane_z_mm is not None:
        from .image import one_slice_volume

        image = one_slice_volume(image)
    own = _backing_sitk(image)
    require_utf8_name(os.path.abspath(path), "the file to write")
    with atomic_path(path) as tmp:
        sitk.WriteImage(own if own is not None else image_to_sitk(image), str(tmp), True)
        check_nifti_written(tmp)
    return Path(path)


def check_nifti_written(path: Path) -> None:
    """Raise ``OSError`` (ENOSPC) when the NIfTI file ``path`` (``.nii`` or ``.nii.gz``; other formats are left
    alone) holds less than its header describes (:func:`samembed.nifti_complete.nifti_layout`), or no header: ITK's
    NIfTI writer reports a short write (a full disk) only on the console, and the cut-short file, or an empty one,
    took the output's place with the command's success (a review). A ``.nii.gz``'s length is its gzip trailer's (the
    uncompressed size, modulo 2^32), read without inflating the file."""
    name = path.name.lower()
    gz = name.endswith(".nii.gz")
    if not (gz or name.endswith(".nii")):
        return
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 4))
        trailer = int.from_bytes(f.read(4), "little")
    layout = nifti_layout(nifti_head(path, gz), single_file=True)
    complete = layout is not None and (trailer == layout.total_bytes % (1 << 32) and size >= 18 if gz
                                       else size >= layout.total_bytes)
    if not complete:
        raise OSError(errno.ENOSPC, "written only in part, or not at all; the disk may be full", str(path))


def new_sitk_buffer(grid: Grid, dtype=np.float32) -> tuple[object, np.ndarray]:
    """A new ``SimpleITK.Image`` of ``grid``'s geometry and its voxels as a writable array (zyx) in its own memory
    (:func:`sitk_voxels`): fill the array, and :func:`write_image` of an :class:`Image` of it writes the image
    without copying it; the pair can be filled and written again (e.g. one heatmap after another)."""
    import SimpleITK as sitk

    pixel = {np.dtype(np.float32): sitk.sitkFloat32}[np.dtype(dtype)]
    img = set_sitk_geometry(sitk.Image([int(s) for s in grid.size_ijk], pixel), grid)
    return img, sitk_voxels(img)


def _backing_sitk(image: Image):
    """The ``SimpleITK.Image`` whose whole buffer ``image``'s array is (made by :func:`new_sitk_buffer`, with the
    image's geometry), else None."""
    arr = image.array
    base = arr.base if isinstance(arr, np.ndarray) else None
    if not isinstance(base, _SitkVoxels) or not arr.flags.c_contiguous:
        return None
    img = base._image
    same = (tuple(int(v) for v in img.GetSize()) == tuple(int(v) for v in image.grid.size_ijk)
            and np.allclose(img.GetSpacing(), image.grid.spacing_mm) and np.allclose(img.GetOrigin(), image.grid.origin_lps_mm)
            and np.allclose(img.GetDirection(), image.grid.direction.ravel())
            and arr.__array_interface__["data"][0] == base.__array_interface__["data"][0]
            and arr.shape == tuple(base.__array_interface__["shape"]))
    return img if same else None


#: heatmap files store similarities on multiples of this step (2^-12, about 0.00024: finer than the three decimals
#: a score is shown with): float noise below it does not compress; a 128^3 head-and-neck map (-1 outside the body)
#: takes 0.30 MB instead of 0.46 MB
HEATMAP_STEP = 2.0**-12


def write_heatmap(image: Image, path: str | os.PathLike, in_place: bool = False) -> Path:
    """Write a similarity map (compressed NIfTI/NRRD) with its values rounded to :data:`HEATMAP_STEP`: in a new
    array (``image`` is kept), or, with ``in_place``, in ``image``'s own float32 array (one image-sized array less)."""
    own = in_place and image.array.dtype == np.float32 and image.array.flags.writeable
    # the same values either way: one division, rounding and product, in float32
    rounded = np.divide(image.array, np.float32(HEATMAP_STEP), dtype=np.float32, out=image.array if own else None)
    np.round(rounded, out=rounded)
    rounded *= np.float32(HEATMAP_STEP)
    return write_image(Image(rounded, image.grid, image.name, plane_z_mm=image.plane_z_mm), path)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files and DICOM series folders under ``folder`` (recursive), sorted. Hidden files and folders
    (a name starting with a dot) are not images: an unfinished write's temporary file
    (``.scan.nii.gz.x1y2.tmp.nii.gz``, left by a killed process), macOS's ``._scan.nii.gz``, ``.git``; the folder
    given may itself be hidden."""
    folder = Path(folder)
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        files = [f for f in files if not f.startswith(".")]
        dcm = [f for f in files if f.lower().endswith(".dcm")]
        if dcm:
            found.append(Path(root))
        for f in files:
            low = f.lower()
            if low.endswith(IMAGE_SUFFIXES) and not low.endswith(".dcm"):
                found.append(Path(root) / f)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# points
# ----------------------------------------------------------------------------------------------
@dataclass
class PointList:
    """Named points in LPS mm. ``points_lps_mm`` has shape (N, 3) (z = 0 for 2D points of a file without z); ``dims`` is how many
    coordinates the file gave per point (2 for a ``label,x,y`` CSV, else 3): see :func:`check_point_dims`."""

    labels: list[str]
    points_lps_mm: np.ndarray
    descriptions: list[str] | None = None
    dims: int = 3

    def __post_init__(self) -> None:
        self.points_lps_mm = np.asarray(self.points_lps_mm, dtype=np.float64).reshape(-1, 3)
        if len(self.labels) != len(self.points_lps_mm):
            raise InputError("point labels and coordinates differ in length")
        if self.dims not in (2, 3):
            raise InputError(f"points have 2 or 3 coordinates, not {self.dims}")

    def __len__(self) -> int:
        return len(self.labels)


def check_point_dims(points: PointList, points_file: str | os.PathLike, image_ndim: int, image_name: str) -> None:
    """Raise :class:`InputError` when the point file gave fewer coordinates per point than the image has axes: a
    ``label,x,y`` CSV for a 3D scan would otherwise put every point on the plane z = 0, and match it there."""
    refuse_missing_z(points.dims, points_file, image_ndim, image_name)


def check_points_inside(points: PointList, points_file: str | os.PathLike, image: Image, ras: bool) -> None:
    """Raise :class:`InputError` naming the point file when a point lies outside ``image`` (by more than half a
    voxel; a 2D image's z is not checked), with the hint that fits how the file was read: the engine's own check
    named only the image and always advised --ras, also to a user who had given it (an audit)."""
    outside = ~image.grid.contains_lps(points.points_lps_mm)
    if outside.any():
        i = int(np.argmax(outside))
        if markups_suffix(points_file):  # (--ras changes nothing of a .fcsv or .mrk.json: a review)
            hint = ("the file gives its own coordinate system (read as it says; --ras changes nothing of a Slicer "
                    "markups file): check that its points were placed on this image, not on another scan")
        else:
            hint = ("the points were read as RAS (--ras): if the file holds LPS coordinates, leave out --ras" if ras
                    else "if the coordinates are RAS (Slicer's), add --ras")
        if image.ndim == 2:  # a radiograph's points are often given in pixels
            spacing = " x ".join(f"{v:g}" for v in image.grid.spacing_mm[:2])
            hint += (f"; if they are pixel indices, give them in mm instead (index x the pixel spacing, {spacing} mm, "
                     "from the image's origin)")
        raise InputError(f"{points_file}: point '{points.labels[i]}' at "
                         f"({', '.join(f'{v:.1f}' for v in points.points_lps_mm[i])}) mm LPS lies outside "
                         f"{image.name} ({int(outside.sum())} of {len(outside)} points do); {hint}")


def refuse_missing_z(dims: int, points_file: str | os.PathLike, image_ndim: int, image_name: str | os.PathLike) -> None:
    """:func:`check_point_dims` for a file whose points have ``dims`` coordinates each (an atlas of a run)."""
    if dims < image_ndim:
        raise InputError(f"{points_file}: its points have {dims} coordinates (label,x,y), but {image_name} is a "
                         f"{image_ndim}D image; give each point's z too (label,x,y,z in LPS mm, or RAS with --ras; "
                         "a line of x,y,z alone is read as label,x,y: put a label before the coordinates)")


def _parse_float(value: str, path: Path, row: int | str) -> float:
    """A coordinate; ``row``: the line number of a table, or where in another file (a markups file's control point)."""
    where = f"line {row}" if isinstance(row, int) else row
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {where}: '{value}' is not a number") from e
    if not np.isfinite(v):
        raise InputError(f"{path}: {where}: coordinate {value} is not finite")
    return v


def read_points(path: str | os.PathLike, ras: bool = False) -> PointList:
    """Read points from CSV (``label,x,y,z``), ``.fcsv`` or ``.mrk.json`` into LPS mm.

    Args:
        path: the point file.
        ras: for CSV only, the file's coordinates are RAS (Slicer) instead of LPS (ITK). A CSV whose ``frame``
            column or ``L,P,S``/``R,A,S`` header states its frame is read in it, and a ``ras`` that contradicts it
            is refused (:class:`InputError`); ``.fcsv`` and ``.mrk.json`` carry their own coordinate system, which
            wins.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a point file (.csv, .fcsv or .mrk.json)")
    if not path.is_file():
        raise InputError(f"{path}: point file not found{did_you_mean(path)}")
    check_readable(path)
    name = path.name.lower()
    try:
        if name.endswith(".mrk.json") or name.endswith(".json"):
            return _read_mrk_json(path)
        if name.endswith(".fcsv"):
            return _read_fcsv(path)
        return _read_csv(path, ras)
    except (InputError, PermissionError):
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise InputError(f"{path}: cannot parse point file: {e}") from e


#: header names of a CSV point file's label column, the first found is used (else a column of names besides x, y, z)
LABEL_COLUMNS = ("label", "name", "landmark", "id")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _decimal_point(text: str, decimal_comma: bool) -> str:
    """``text`` with a decimal comma written as a point when the file uses decimal commas (values separated by
    ``;``, as a spreadsheet writes them)."""
    return text.replace(",", ".") if decimal_comma else text


def _is_comment(row: list[str]) -> bool:
    """A row that starts with ``#`` and is not a point (a label such as ``#1 tumour`` followed by numbers is)."""
    return row[0].lstrip().startswith("#") and not (len(row) >= 3 and all(_is_number(v) for v in row[1:3]))


#: a CSV header's coordinate columns, by the frame its names give: x, y, z (the frame ``--ras`` says, LPS by default),
#: or the axes' own letters: L, P, S (LPS, ITK) and R, A, S (RAS, Slicer), which also say the frame
HEADER_AXES = {"xyz": ("x", "y", "z"), "LPS": ("l", "p", "s"), "RAS": ("r", "a", "s")}


def _header_axes(header: list[str]) -> str | None:
    """The key of :data:`HEADER_AXES` whose first two names a CSV header row (lower case, stripped) holds, or None
    (the row is not a header)."""
    names = set(header)
    return next((k for k, (a, b, _) in HEADER_AXES.items() if {a, b} <= names), None)


def _row_fits(fields: list[str], decimal_comma: bool) -> bool:
    """``fields`` look like a point file's first row: a header naming x and y (or L and P, or R and A), or a label
    and 2 or 3 numbers."""
    if _header_axes([f.strip().lower() for f in fields]) is not None:
        return True
    return len(fields) in (3, 4) and all(_is_number(_decimal_point(f, decimal_comma)) for f in fields[1:])


#: the separators a CSV of ours may use: ``;`` as spreadsheets write CSV where the comma is the decimal separator
CSV_DELIMITERS = (",", ";", "\t")


def row_delimiter(row: str, fits: Callable[[list[str], str], bool]) -> str | None:
    """The first of :data:`CSV_DELIMITERS` by which the CSV line ``row`` splits into fields that ``fits(fields,
    delimiter)`` takes (e.g. a header naming the columns a file needs), or None."""
    return next((d for d in CSV_DELIMITERS if fits(next(csv.reader([row], delimiter=d), []), d)), None)


def _csv_delimiter(text: str) -> str:
    """The separator of a CSV point file (:func:`row_delimiter`; with ``;``, decimal commas) that makes its first row
    a header naming x and y or a label and 2 or 3 numbers; else spaces (" ") when they do (a ``label x y z`` text
    file: "looks like a header but names no coordinate columns" named the columns it had); ``,`` when none does (the
    error then names the row)."""
    first = next((line for line in text.splitlines() if line.strip() and not _is_comment(next(csv.reader([line])))), "")
    found = row_delimiter(first, lambda fields, d: _row_fits(fields, d == ";"))
    if found is None and _row_fits(first.split(), False):
        return " "
    return found or ","


def _label_column(header: list[str], coords: list[int], body: list[list[str]]) -> int | None:
    """Index of the label column of a CSV header (lower case, stripped), or None (labels P1, P2, ... then): a column
    named as in :data:`LABEL_COLUMNS`, else the one other named column whose values are names (not all numbers) and
    unique (``structure``, ``organ``, ...; not a score, nor a spreadsheet's unnamed row numbers)."""
    for name in LABEL_COLUMNS:
        if name in header:
            return header.index(name)
    others = [i for i, h in enumerate(header) if i not in coords and h]
    if len(others) != 1:
        return None
    values = [r[others[0]].strip() for r in body if len(r) > others[0]]
    names = len(set(values)) == len(values) and not all(_is_number(v) for v in values)
    return others[0] if names else None


def _read_csv(path: Path, ras: bool) -> PointList:
    """``label,x,y,z`` (3D) or ``label,x,y`` (2D, z = 0), with or without a header row; rows are numbered as
    the file's lines, so an error names the line to fix. A header names the label column ``label``, ``name``,
    ``landmark`` or ``id`` (or it is the one other column, of unique names); a byte-order mark (spreadsheets' "CSV
    UTF-8") is skipped, and a file separated by ``;`` (with decimal commas or points) or tabs is read as such.
    A header may name the coordinates by the axes' letters instead of x, y, z: ``L,P,S`` (LPS) or ``R,A,S`` (RAS);
    that header, not ``ras``, then gives the frame, and a ``ras`` that contradicts it is an error. So does a
    ``frame`` column of ``LPS`` or ``RAS`` beside x, y, z (the CSV that ``samembed match`` writes)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:  # (said as a codec's byte 0x8b: an image or a .gz given as --points, say)
        raise InputError(f"{path}: not a text file (an image?); the points are a CSV of label,x,y,z (LPS mm), a .fcsv "
                         "or a .mrk.json") from None
    delimiter = _csv_delimiter(text)
    if delimiter == " ":  # separated by spaces or tabs, however many (aligned columns)
        text = "\n".join(" ".join(line.split()) for line in text.splitlines())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)  # quoted line breaks stay in their value
    # a row of blank fields is no point: a spreadsheet's empty ",,," row, a last line of spaces (each was refused as a
    # row of the wrong width or a non-number: a review)
    rows = [(n, r) for n, r in enumerate(reader, start=1) if any(v.strip() for v in r) and not _is_comment(r)]
    if not rows:
        raise InputError(f"{path}: no points in file")
    header = [h.strip().lower() for h in rows[0][1]]
    width = len(rows[0][1])  # the first row's columns (a header's, or the first point's)
    axes = _header_axes(header)
    if axes is not None:
        body = rows[1:]
        if axes == "xyz" and "frame" in header:  # (samembed match's own output: the frame of its x, y, z per row)
            axes = _frame_column(path, [r for _, r in body], header.index("frame"), ras)
        if axes != "xyz":
            if ras and axes == "LPS":
                raise InputError(f"{path}: its header names L, P, S columns (LPS coordinates), but RAS coordinates "
                                 "were asked for (--ras); leave out --ras, or name the columns R, A, S or x, y, z")
            ras = axes == "RAS"
        cols = [header.index(a) for a in HEADER_AXES["xyz" if "x" in header else axes] if a in header]
        il = _label_column(header, cols, [r for _, r in body])
        if il is None:
            log.warning("%s: no label column (%s, or one other column of unique names) in its header: the points are "
                        "labelled P1, P2, ...", path, ", ".join(LABEL_COLUMNS))
    else:
        if len(rows) > 1 and not any(_is_number(_decimal_point(v, delimiter == ";")) for v in rows[0][1][1:]):
            raise InputError(f"{path}: line {rows[0][0]} looks like a header ({', '.join(rows[0][1])}) but names no "
                             "coordinate columns; name them x,y,z (the frame of --ras, LPS by default), or L,P,S or "
                             "R,A,S (which also give the frame)")
        if width not in (3, 4):
            raise InputError(f"{path}: line {rows[0][0]} has {width} columns; expected label,x,y,z (3D) or "
                             "label,x,y (2D), optionally under a header row naming them (x,y,z; or L,P,S or R,A,S, "
                             "which also give the frame)")
        il, cols = 0, list(range(1, width))
        body = rows
        comma = delimiter == ";"
        if width == 3 and len(rows) > 1 and all(_is_number(_decimal_point(r[0], comma)) for _, r in rows) and len(
                {_decimal_point(r[2], comma).strip() for _, r in rows if len(r) > 2}) == 1:
            # x,y,z of points on one plane (a radiograph's, z constant) read as label,x,y: every point on y = z
            raise InputError(f"{path}: its lines look like x,y,z without labels (numbers first, the same last value "
                             "on every line); put a label before the coordinates (label,x,y,z), or a header row "
                             "naming the columns (x,y,z)")
    expected = "label,x,y,z" if len(cols) == 3 else "label,x,y"
    labels, pts = [], []
    for n, r in body:
        if len(r) <= max(cols):
            raise InputError(f"{path}: line {n} has {len(r)} columns; expected {expected}")
        if any(v.strip() for v in r[width:]):  # e.g. "A,1,5,2,5,3,5": decimal commas would shift x, y, z silently
            raise InputError(f"{path}: line {n} has {len(r)} values, but line {rows[0][0]} has {width} columns; if a "
                             "decimal comma splits a number, quote it or separate the columns with ';'")
        labels.append(r[il].strip() if il is not None else f"P{len(labels) + 1}")
        xyz = [_parse_float(_decimal_point(r[i], delimiter == ";"), path, n) for i in cols]
        pts.append(xyz + [0.0] * (3 - len(xyz)))
    if not pts:
        raise InputError(f"{path}: no points in file")
    p = np.array(pts)
    return PointList(labels, lps_to_ras(p) if ras else p, dims=len(cols))


def _frame_column(path: Path, body: list[list[str]], at: int, ras: bool) -> str:
    """The frame a ``frame`` column gives every row's x, y, z (``LPS`` or ``RAS``: ``samembed match``'s CSV), as a
    key of :data:`HEADER_AXES`; ``xyz`` (the frame of ``ras``) when the column is empty. Rows of both frames, or
    another value, are an error naming the file."""
    frames = {r[at].strip().upper() for r in body if len(r) > at and r[at].strip()}
    if not frames:
        return "xyz"
    if not frames <= {"LPS", "RAS"} or len(frames) > 1:
        raise InputError(f"{path}: its frame column holds {', '.join(sorted(frames))}; expected one of LPS or RAS "
                         "for every row")
    frame = frames.pop()
    if ras and frame == "LPS":
        raise InputError(f"{path}: its frame column says LPS, but RAS coordinates were asked for (--ras); leave out "
                         "--ras (the file gives its frame)")
    return frame


#: Slicer's position status of a placed control point in a ``.fcsv`` (``vtkMRMLMarkupsNode::PositionDefined``); 0 is
#: undefined, 1 preview, 3 missing
FCSV_PLACED = "2"


def _read_fcsv(path: Path) -> PointList:
    """A Slicer ``.fcsv``: RAS unless its ``CoordinateSystem`` line says LPS. Slicer 5 writes each point's position
    status in a column after ``associatedNodeID`` that its ``# columns`` line does not name (then its
    ``autoCreated``); a point not placed (status other than 2: a skipped landmark of a template, written at
    0, 0, 0) is left out with a warning, as the ``.mrk.json`` reader does (it was read as a landmark at the origin:
    a review)."""
    coord = "RAS"
    labels, pts, descs, unplaced = [], [], [], []
    columns = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"]
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for n, r in enumerate(csv.reader(fh), start=1):
            if not r:
                continue
            if r[0].startswith("#"):
                line = ",".join(r)
                if "CoordinateSystem" in line:
                    val = line.split("=", 1)[1].strip().upper()
                    coord = {"0": "RAS", "1": "LPS"}.get(val, val)
                if line.startswith("# columns"):
                    columns = [c.strip() for c in line.split("=", 1)[1].split(",")]
                continue
            row = dict(zip(columns, r))
            status = row.get("positionStatus")
            if status is None and columns[-1] == "associatedNodeID" and len(r) > len(columns):
                status = r[len(columns)]  # (the column the header does not name)
            if status is not None and status.strip() and status.strip() != FCSV_PLACED:
                unplaced.append(row.get("label") or f"#{n}")
                continue
            pts.append([_parse_float(row[a], path, n) for a in ("x", "y", "z")])
            labels.append(row.get("label", f"F-{len(labels) + 1}"))
            descs.append(row.get("desc", ""))
    if coord not in ("RAS", "LPS"):
        raise InputError(f"{path}: unknown CoordinateSystem '{coord}'; expected RAS or LPS")
    if unplaced:
        log.warning("%s: %d control point(s) not placed, left out: %s", path, len(unplaced), ", ".join(unplaced[:10]))
    if not pts:
        raise InputError(f"{path}: no points in file" + (f" ({len(unplaced)} not placed)" if unplaced else ""))
    p = np.array(pts)
    return PointList(labels, lps_to_ras(p) if coord == "RAS" else p, descs)


def _read_mrk_json(path: Path) -> PointList:
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    markups = data.get("markups") if isinstance(data, dict) else None
    if not markups:
        raise InputError(f"{path}: not a Slicer markups file (no 'markups' list)")
    labels, pts, descs, unplaced = [], [], [], []
    for k, m in enumerate(markups, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("controlPoints", []), list):
            raise InputError(f"{path}: markup {k} is not a Slicer markup (an object with a 'controlPoints' list)")
        coord = str(m.get("coordinateSystem", "LPS")).upper()
        if coord not in ("RAS", "LPS"):
            raise InputError(f"{path}: unknown coordinateSystem '{coord}'; expected RAS or LPS")
        for n, cp in enumerate(m.get("controlPoints", []), start=1):
            if not isinstance(cp, dict):
                raise InputError(f"{path}: control point {n} of markup {k} is not an object with a position")
            pos = cp.get("position")
            where = f"control point {n} ({cp.get('label', 'no label')}) of markup {k}"
            # a point not placed yet (Slicer's "undefined", "preview" or "missing"): its position means nothing
            if pos is None or str(cp.get("positionStatus", "defined")).lower() != "defined":
                unplaced.append(str(cp.get("label", f"#{n}")))
                continue
            if not isinstance(pos, list) or len(pos) != 3:  # placed, but not a point (it was called not placed)
                raise InputError(f"{path}: {where}: its position is {pos!r}, not 3 numbers (x, y, z)")
            p = np.array([_parse_float(v, path, where) for v in pos])
            pts.append(lps_to_ras(p) if coord == "RAS" else p)
            labels.append(str(cp.get("label", f"P{len(labels) + 1}")))
            descs.append(str(cp.get("description", "")))
    if unplaced:
        log.warning("%s: %d control point(s) not placed, left out: %s", path, len(unplaced), ", ".join(unplaced[:10]))
    if not pts:
        raise InputError(f"{path}: no placed control points in file" + (f" ({len(unplaced)} not placed)" if unplaced else ""))
    return PointList(labels, np.array(pts), descs)


#: decimals of the numbers in the match tables (``samembed match``'s CSV, ``samembed propagate``'s ``matches.csv``, the
#: Slicer module's CSV export): positions in mm as markups files write them, other distances in mm (round trip,
#: spread), and scores and correlations
POSITION_DECIMALS, DISTANCE_DECIMALS, SCORE_DECIMALS = 4, 3, 4


def csv_number(value: float, decimals: int) -> str:
    """``value`` as a CSV cell with ``decimals`` decimals, or an empty cell (a missing value, as spreadsheets, pandas
    and R read it) when it is NaN or infinite, e.g. the correlation of a match that was not polished.

    >>> csv_number(1.23456, 3), csv_number(float("nan"), 3)
    ('1.235', '')
    """
    value = float(value)
    return f"{value:.{decimals}f}" if math.isfinite(value) else ""


def csv_text(rows: list[list[str]]) -> str:
    """``rows`` of strings as CSV text, one line each (``\\n``): a value holding a comma, a quote or a line break is
    quoted, as spreadsheets and Slicer read it (a label such as ``Parotid, left`` stays one column)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


#: suffixes of the point files that hold one set of markups (:func:`write_points` writes them as Slicer does)
MARKUPS_SUFFIXES = (".mrk.json", ".json", ".fcsv")


def markups_suffix(path: str | os.PathLike) -> str | None:
    """The suffix of :data:`MARKUPS_SUFFIXES` that ``path`` ends with (the longest: ``.mrk.json`` before ``.json``),
    or None for any other file (a CSV)."""
    name = Path(path).name.lower()
    return next((s for s in MARKUPS_SUFFIXES if name.endswith(s)), None)


def write_points(points: PointList, path: str | os.PathLike, ras: bool = False) -> Path:
    """Write points atomically; the format follows the suffix (.csv, .fcsv, .mrk.json).

    CSV is LPS under ``label,x,y,z`` unless ``ras`` (RAS under ``label,R,A,S``: the header gives the frame when it is
    read back); ``.fcsv`` and ``.mrk.json`` are written in LPS when ``ras`` is False and RAS otherwise, with the
    coordinate-system field set accordingly.
    """
    path = Path(path)
    name = path.name.lower()
    p = lps_to_ras(points.points_lps_mm) if ras else points.points_lps_mm
    coord = "RAS" if ras else "LPS"
    descs = points.descriptions or [""] * len(points)
    if name.endswith(".json"):
        cps = [
            {"id": str(i + 1), "label": lab, "description": d, "position": [float(v) for v in xyz],
             "positionStatus": "defined"}
            for i, (lab, d, xyz) in enumerate(zip(points.labels, descs, p))
        ]
        doc = {
            "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": coord, "coordinateUnits": "mm", "controlPoints": cps}],
        }
        return write_text_atomic(path, json.dumps(doc, indent=2))
    if name.endswith(".fcsv"):
        lines = [
            "# Markups fiducial file version = 5.6",
            f"# CoordinateSystem = {coord}",
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
        ]
        rows = [[str(i + 1), f"{xyz[0]:.4f}", f"{xyz[1]:.4f}", f"{xyz[2]:.4f}", "0", "0", "0", "1", "1", "1", "0", lab,
                 d, ""] for i, (lab, d, xyz) in enumerate(zip(points.labels, descs, p))]
        return write_text_atomic(path, "\n".join(lines) + "\n" + csv_text(rows))
    rows = [[lab, f"{xyz[0]:.4f}", f"{xyz[1]:.4f}", f"{xyz[2]:.4f}"] for lab, xyz in zip(points.labels, p)]
    # RAS under R, A, S (which give the frame when the file is read back, with or without ras); LPS under x, y, z,
    # the default frame of a point file
    return write_text_atomic(path, csv_text([["label", *(("R", "A", "S") if ras else ("x", "y", "z"))], *rows]))
