"""Reading a gzipped NIfTI file's voxels with a faster inflater than SimpleITK's zlib.

A chest CT of 512 x 512 x 133 voxels is a 35-45 MB ``.nii.gz``; SimpleITK inflates it with zlib in 0.29-0.36 s on
one core of the 2-core VM, most of reading it, and a cold ``samembed match`` of such a pair waits for it (the
prefetch process reads both images while torch loads). ISA-L's inflater (the ``isal`` package, Intel's
Intelligent Storage Acceleration Library) does the same in 0.23-0.27 s. :func:`read_nifti_gz` inflates the file
with it, takes the voxels as they lie after the header, and takes the geometry from SimpleITK's own reading of the
file's first voxel (an extract of one voxel, which inflates only the start of the file), so the origin, spacing and
direction are SimpleITK's, bit for bit, and so are the voxels (checked on every ``.nii.gz`` of ``../shared`` and of
the benchmark suites, 423 files).

Only the plain case takes this route: a single-file NIfTI-1 (``n+1``), little-endian, three dimensions with more
than one slice, one scalar component of a type SimpleITK reports as such, no intensity scaling (``scl_slope`` 0, or
1 with ``scl_inter`` 0), voxels aligned in the file. Anything else, or ``isal`` missing, gives None, and the caller
reads the file with SimpleITK (whose errors it reports). Damaged gzip data (a file cut short, a corrupt stream), or
whole gzip data that inflates to fewer voxels than the header describes, is an :class:`~samembed.errors.InputError`
naming the file, whichever route reads it: SimpleITK reads such files without a word (zeros where the data ends).
NaN and infinite voxels of a floating-point file come out as SimpleITK reads them (0, as in Slicer), with a warning
that counts them.
"""

from __future__ import annotations

import logging
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError
from .nifti_complete import (
    NIFTI1_HEADER_BYTES,
    NIFTI2_HEADER_BYTES,
    check_layout,
    check_nifti_complete,
    check_voxel_offset,
    nifti_layout,
)

log = logging.getLogger(__name__)

#: NIfTI-1 ``datatype`` -> numpy type (little-endian), for the scalar types SimpleITK reads as they are stored
NIFTI_DTYPES = {2: "<u1", 4: "<i2", 8: "<i4", 16: "<f4", 64: "<f8", 256: "<i1", 512: "<u2", 768: "<u4",
                1024: "<i8", 1280: "<u8"}
#: the magic string of a single NIfTI-1 file (header and voxels together)
MAGIC = b"n+1\0"


def _whole_members(data: bytes, path: str | Path) -> bytes | None:
    """The inflated bytes of ``data``'s whole gzip members when only bytes that are not gzip data follow them
    (a file with something appended: SimpleITK reads its image, and so does this, with a warning), else None (a member
    damaged or cut short)."""
    import zlib

    out, rest = [], data
    while rest[:2] == b"\x1f\x8b":
        member = zlib.decompressobj(wbits=31)
        try:
            out.append(member.decompress(rest))
        except zlib.error:
            return None
        if not member.eof:
            return None  # cut short
        rest = member.unused_data
    if not out or not rest.strip(b"\0"):
        return None  # (no whole member; nothing but zeros after them is igzip's own case)
    log.warning("%s: %d bytes that are not gzip data follow its image's compressed data; they are left out", path,
                len(rest))
    return b"".join(out)


def read_nifti_gz(path: str | Path, sitk_path: str | Path | None = None) -> tuple[np.ndarray, tuple, tuple, tuple] | None:
    """The voxels (zyx, read-only) and the spacing (mm), origin (LPS mm) and direction (row-major) of the
    ``.nii.gz`` file ``path``, or None when this route does not apply (see the module docstring). ``sitk_path``: the
    name SimpleITK reads the same file by, for its geometry (default ``path``; see :func:`samembed.io.read_image`).

    Raises:
        InputError: the file's gzip data is damaged or cut short, or it inflates to fewer voxels than its header
            describes (:mod:`samembed.nifti_complete`; checked by either route).
    """
    try:
        from isal import igzip, isal_zlib
    except ImportError:
        check_nifti_complete(path)  # inflated once with Python's zlib to count (SimpleITK would not say)
        return None
    import SimpleITK as sitk

    try:
        data = Path(path).read_bytes()
    except OSError:  # unreadable: SimpleITK's reading says why
        return None
    if not data.startswith(b"\x1f\x8b"):  # no gzip data at all: a file named .nii.gz that is something else
        if nifti_layout(data[:NIFTI2_HEADER_BYTES], single_file=True) is not None:
            raise InputError(f"{path}: cannot read this image: it is named .nii.gz but is an uncompressed NIfTI "
                             f"file; name it .nii")
        raise InputError(f"{path}: cannot read this image: it is named .nii.gz but is not gzip-compressed (it starts "
                         f"{data[:8]!r}): not a NIfTI image either; if it is an image of another format, give the "
                         "file that format's name")
    try:
        raw = igzip.decompress(data)
    except (OSError, EOFError, ValueError, isal_zlib.error) as exc:  # OSError: gzip.BadGzipFile, not gzip at all
        raw = _whole_members(data, path)
        if raw is None:
            # SimpleITK reads some such files without a word (a .nii.gz cut short gives an image of zeros at its end)
            raise InputError(f"{path}: cannot read this image (unreadable or corrupt): its gzip data is damaged or cut "
                             f"short ({exc}); copy or export the file again") from exc
    del data
    check_voxel_offset(raw[:NIFTI2_HEADER_BYTES], path)
    check_layout(nifti_layout(raw[:NIFTI2_HEADER_BYTES], single_file=True), len(raw), path)
    if (len(raw) < NIFTI1_HEADER_BYTES + 4 or struct.unpack_from("<i", raw, 0)[0] != NIFTI1_HEADER_BYTES
            or raw[344:348] != MAGIC):
        return None  # big-endian, NIfTI-2, a header and image pair, or not NIfTI
    dim = struct.unpack_from("<8h", raw, 40)
    datatype, bitpix = struct.unpack_from("<2h", raw, 70)
    vox_offset, slope, inter = struct.unpack_from("<3f", raw, 108)
    dtype = NIFTI_DTYPES.get(datatype)
    if dim[0] != 3 or min(dim[1:4]) < 1 or dim[3] == 1 or dtype is None or np.dtype(dtype).itemsize * 8 != bitpix:
        return None  # not a plain 3D scalar volume (a single slice is a radiograph: SimpleITK's route handles it)
    if not (inter == 0.0 and slope in (0.0, 1.0)):
        # scaled intensities: SimpleITK applies the scaling (and may change the type); a slope of 0 is ITK's 1, with
        # the intercept still added
        return None
    offset, count = int(vox_offset), int(np.prod(dim[1:4], dtype=np.int64))
    itemsize = np.dtype(dtype).itemsize
    if (offset != vox_offset or offset < NIFTI1_HEADER_BYTES + 4 or offset % itemsize
            or offset + count * itemsize > len(raw)):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sitk_path or path))
    try:
        reader.ReadImageInformation()
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1 or tuple(reader.GetSize()) != tuple(dim[1:4]):
            return None
        # the geometry as SimpleITK's reading of the image gives it: of its first voxel, read through the same
        # reader (the header's own values can differ in the sign of a zero, which the content hash would see)
        reader.SetExtractIndex([0, 0, 0])
        reader.SetExtractSize([1, 1, 1])
        first = reader.Execute()
    except RuntimeError:
        return None
    if sitk.GetArrayViewFromImage(first).dtype != np.dtype(dtype):  # SimpleITK reads another type (its own mapping)
        return None
    voxels = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dim[3], dim[2], dim[1])
    if voxels.dtype.kind == "f":
        voxels = _non_finite_as_simpleitk_reads_them(voxels, path)
        if voxels is None:
            return None
    if voxels[0, 0, 0] != first[0, 0, 0]:
        return None
    return voxels, first.GetSpacing(), first.GetOrigin(), first.GetDirection()


def _non_finite_as_simpleitk_reads_them(voxels: np.ndarray, path) -> np.ndarray | None:
    """``voxels`` with their non-finite values (NaN, infinities) as SimpleITK reads them: ITK's NIfTI reader, as
    Slicer's, gives 0 for each (masked-out voxels of a processed MRI, say), said in a warning with their count; the
    same image by either route, whichever voxel comes first. None when SimpleITK reads them some other way (its
    reading is then left to it)."""
    finite = np.isfinite(voxels)
    if finite.all():
        return voxels
    read_as = _simpleitk_reads_non_finite()
    if read_as is None:
        return None
    if np.isnan(read_as[0]) and read_as[1:] == (np.inf, -np.inf):
        return voxels  # kept as they are (the image's check then names them)
    if read_as != (0.0, 0.0, 0.0):
        return None
    _say_non_finite(path, int(finite.size - np.count_nonzero(finite)))
    out = np.where(finite, voxels, voxels.dtype.type(0))
    out.setflags(write=False)
    return out


def warn_non_finite_nii(path: str | Path) -> None:
    """Say (a warning, with their count) when an uncompressed single-file NIfTI (``.nii``, little-endian, float32 or
    float64, unscaled) holds NaN or infinite voxels, which SimpleITK reads as 0 without a word: the warning the
    engine's own reading of a ``.nii.gz`` gives. Its voxels are scanned in place (mapped, not read into memory)."""
    try:
        with open(path, "rb") as f:
            head = f.read(NIFTI1_HEADER_BYTES + 4)
        if (len(head) < NIFTI1_HEADER_BYTES + 4 or struct.unpack_from("<i", head, 0)[0] != NIFTI1_HEADER_BYTES
                or head[344:348] != MAGIC):
            return
        dim = struct.unpack_from("<8h", head, 40)
        datatype, bitpix = struct.unpack_from("<2h", head, 70)
        vox_offset, slope, inter = struct.unpack_from("<3f", head, 108)
        dtype = {16: "<f4", 64: "<f8"}.get(datatype)
        if dtype is None or not 1 <= dim[0] <= 7 or not (inter == 0.0 and slope in (0.0, 1.0)):
            return
        count = int(np.prod([max(1, int(n)) for n in dim[1:dim[0] + 1]], dtype=np.int64))
        voxels = np.memmap(path, dtype=dtype, mode="r", offset=int(vox_offset), shape=(count,))
    except (OSError, ValueError):
        return  # (what is wrong with the file, SimpleITK's reading says)
    finite = 0
    for start in range(0, count, 1 << 24):  # in chunks: no image-sized boolean array
        finite += int(np.count_nonzero(np.isfinite(voxels[start:start + (1 << 24)])))
    del voxels
    if finite < count and _simpleitk_reads_non_finite() == (0.0, 0.0, 0.0):
        _say_non_finite(path, count - finite)


def _say_non_finite(path: str | Path, count: int) -> None:
    """The warning of both readings (a ``.nii.gz``'s own, a ``.nii``'s by SimpleITK) that ``count`` voxels had no value
    and are read as 0."""
    log.warning("%s: %d voxels are NaN or infinite (no value); they are read as 0, as ITK's NIfTI reader (and Slicer) "
                "reads them", path, count)


@lru_cache(maxsize=1)
def _simpleitk_reads_non_finite() -> tuple[float, float, float] | None:
    """What SimpleITK's NIfTI reading gives for NaN, +inf and -inf stored in a float32 file, found once per process
    on a file of eight voxels (0.0 for each with SimpleITK 2.x); None when that cannot be found out."""
    import tempfile

    import SimpleITK as sitk

    stored = np.array([np.nan, np.inf, -np.inf, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32).reshape(2, 2, 2)
    try:
        with tempfile.TemporaryDirectory(prefix="samembed-nifti-") as folder:
            probe = str(Path(folder) / "probe.nii.gz")
            sitk.WriteImage(sitk.GetImageFromArray(stored), probe)
            got = sitk.GetArrayFromImage(sitk.ReadImage(probe)).ravel()
    except (OSError, RuntimeError):
        return None
    return tuple(float(v) for v in got[:3])
