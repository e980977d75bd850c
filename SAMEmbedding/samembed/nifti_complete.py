"""Whether a NIfTI file holds every voxel its header describes.

ITK's NIfTI reader (niftilib's ``nifti_read_buffer``) fills the voxels missing from a file cut short with zeros and
says nothing (SimpleITK 2.5 here: a ``.nii`` of a head-and-neck CT cut to 3.0 of its 4.2 MB reads as a full volume
whose last 31 slices are 0; the same for a ``.hdr``/``.img`` pair with a short ``.img`` and for a ``.nii.gz`` whose
gzip stream is whole but holds a short file). NRRD and MetaImage readers refuse such files. A match on such an image
runs without a word and finds its points in a block of zeros, so :func:`check_nifti_complete` compares the data's
length with the header's description before SimpleITK reads it, from the header alone (540 bytes at most) and the
file's size: no cost beyond a ``stat``. A gzipped file's inflated length comes from the caller, which inflates it
anyway (:func:`samembed.nifti_gz.read_nifti_gz`), or from :func:`inflated_length` (a pass over the file that keeps
nothing, used only where ISA-L's inflater is not installed).

Header fields (NIfTI-1, and Analyze 7.5, which shares its layout up to ``vox_offset``; NIfTI-2), either byte order:
``sizeof_hdr`` (348 or 540) gives the version and the order, ``dim`` the shape (``dim[0]`` axes), ``bitpix`` the bits
per voxel (all components of a voxel), ``vox_offset`` where the voxels start (in a single file at least after the
header and its 4-byte extension flag; in a pair, in the ``.img``).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: header sizes of NIfTI-1 (and Analyze 7.5) and NIfTI-2, in bytes
NIFTI1_HEADER_BYTES, NIFTI2_HEADER_BYTES = 348, 540
#: a single file's voxels start at least this far in: the header and its 4-byte extension flag
SINGLE_FILE_MIN_OFFSET = {NIFTI1_HEADER_BYTES: 352, NIFTI2_HEADER_BYTES: 544}


@dataclass(frozen=True)
class NiftiLayout:
    """Where a NIfTI file's voxels lie, from its header.

    Attributes:
        offset_bytes: bytes before the first voxel in the file that holds the voxels (``vox_offset``; in a single
            file at least the header and its extension flag).
        data_bytes: bytes of voxels the header describes (every axis of ``dim`` times ``bitpix``).
        shape: the header's ``dim[1:dim[0] + 1]`` (x fastest).
        bitpix: bits per voxel.
    """

    offset_bytes: int
    data_bytes: int
    shape: tuple[int, ...]
    bitpix: int

    @property
    def total_bytes(self) -> int:
        """The least length of the file that holds the voxels, in bytes."""
        return self.offset_bytes + self.data_bytes


def _header_fields(head: bytes) -> tuple[int, tuple, int, float, bytes, tuple] | None:
    """``(header bytes, dim, bitpix, vox_offset, magic, pixdim)`` of a NIfTI-1, Analyze 7.5 or NIfTI-2 header in
    either byte order (the file's first bytes, at least 348 or 540), or None when ``head`` is not such a header."""
    for order in "<>":
        if len(head) >= 4 and struct.unpack_from(order + "i", head, 0)[0] == NIFTI1_HEADER_BYTES \
                and len(head) >= NIFTI1_HEADER_BYTES:
            return (NIFTI1_HEADER_BYTES, struct.unpack_from(order + "8h", head, 40),
                    struct.unpack_from(order + "h", head, 72)[0], struct.unpack_from(order + "f", head, 108)[0],
                    head[344:348], struct.unpack_from(order + "8f", head, 76))
        if len(head) >= 4 and struct.unpack_from(order + "i", head, 0)[0] == NIFTI2_HEADER_BYTES \
                and len(head) >= NIFTI2_HEADER_BYTES:
            return (NIFTI2_HEADER_BYTES, struct.unpack_from(order + "8q", head, 16),
                    struct.unpack_from(order + "h", head, 14)[0], struct.unpack_from(order + "q", head, 168)[0],
                    head[4:8], struct.unpack_from(order + "8d", head, 104))
    return None


def nifti_layout(head: bytes, single_file: bool) -> NiftiLayout | None:
    """The :class:`NiftiLayout` of a NIfTI-1, Analyze 7.5 or NIfTI-2 header (the file's first bytes, at least 348 or
    540), or None when ``head`` is not such a header or describes no voxels plainly (SimpleITK's reading then says
    what is wrong). ``single_file``: the file is a ``.nii``, whose magic must say that the voxels follow the header
    (``n+1``, ``n+2``); else a pair's ``.hdr`` (magic ``ni1``, ``ni2``, or none: Analyze 7.5), whose voxels are in
    its ``.img``."""
    fields = _header_fields(head)
    if fields is None:
        return None
    header, dim, bitpix, offset, magic, _ = fields
    # where the voxels are, by the magic: n+1/n+2 after the header, ni1/ni2 (or none: Analyze 7.5) in an .img
    if magic[:1] != b"n" or magic[3:4] != b"\0" or magic[2:3] not in (b"1", b"2"):
        magic = b""
    if magic[1:2] != (b"+" if single_file else b"i") and (single_file or magic):
        return None  # not the kind of file its name says: SimpleITK's reading decides what it is
    n = dim[0]
    if not 1 <= n <= 7 or bitpix <= 0 or not math.isfinite(offset) or offset < 0:
        return None
    shape = tuple(int(s) for s in dim[1:n + 1])
    if min(shape) < 1:
        return None
    offset = int(offset)
    if single_file:
        offset = max(offset, SINGLE_FILE_MIN_OFFSET[header])
    return NiftiLayout(offset, (math.prod(shape) * bitpix + 7) // 8, shape, int(bitpix))


def check_voxel_offset(head: bytes, path: str | Path) -> None:
    """Raise :class:`InputError` when a single-file NIfTI header (magic ``n+1``, ``n+2``; the file's first bytes)
    puts the voxels at an offset that is not a number or lies inside the header and its extension flag (below 352,
    or 544 for NIfTI-2): ITK reads such a file from byte 348 whatever it says, so its voxels came out shifted where
    they start elsewhere, or the engine's own reading stopped with a bare error; nothing for any other header."""
    fields = _header_fields(head)
    if fields is None:
        return
    header, _, _, offset, magic, _ = fields
    if magic[:2] != b"n+":
        return
    least = SINGLE_FILE_MIN_OFFSET[header]
    if not math.isfinite(offset) or offset < least:
        raise InputError(f"{path}: its header's vox_offset, where the voxels start, is {offset:g}, not a byte after the "
                         f"{least} bytes of a single-file NIfTI header: where they start is ambiguous (ITK reads them "
                         "from byte 348, shifted if they start elsewhere); write the file again with a NIfTI tool "
                         "(nibabel, SimpleITK, Slicer)")


def check_layout(layout: NiftiLayout | None, available_bytes: int, data_file: str | Path,
                 image_file: str | Path | None = None) -> None:
    """Raise :class:`InputError` when ``data_file`` (``available_bytes`` long, inflated) is shorter than ``layout``
    says; nothing when ``layout`` is None. ``image_file``: the file the user named (a pair's ``.hdr``), if not
    ``data_file``."""
    if layout is None or available_bytes >= layout.total_bytes:
        return
    have = max(0, available_bytes - layout.offset_bytes)
    named = str(image_file or data_file)
    where = "" if image_file is None else f" (its voxels' file {data_file})"
    raise InputError(
        f"{named}: the file is cut short{where}: its header describes {layout.data_bytes} bytes of voxels "
        f"({' x '.join(map(str, layout.shape))} at {layout.bitpix} bits) but it holds {have} "
        f"({100 * have / layout.data_bytes:.1f} %); SimpleITK would read the rest as zeros without a word. "
        "Copy or export the file again")


def inflated_length(path: str | Path) -> int:
    """The length of ``path``'s gzip data once inflated, in bytes (a pass over the file; nothing is kept).

    Raises:
        InputError: the gzip data is damaged or cut short.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read this image (unreadable or corrupt): its gzip data is damaged or cut "
                         f"short ({exc}); copy or export the file again") from exc
    return total


def nifti_head(path: Path, gzipped: bool) -> bytes:
    """The first bytes of ``path`` (inflated when ``gzipped``) that a NIfTI-1 or NIfTI-2 header takes; b"" when it
    cannot be read."""
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            return f.read(NIFTI2_HEADER_BYTES)
    except (OSError, EOFError, zlib.error):
        return b""  # unreadable or damaged: SimpleITK's reading says why


def check_nifti_complete(path: str | Path) -> None:
    """Raise :class:`InputError` when the NIfTI file ``path`` (``.nii``, ``.nii.gz``, or a pair's ``.hdr`` with its
    ``.img`` or ``.img.gz``) holds fewer bytes of voxels than its header describes; nothing for any other file,
    or when the header is not one this module reads (SimpleITK's reading then says what is wrong).

    A ``.nii.gz`` is inflated once to count its length, without keeping anything (:func:`inflated_length`); the
    engine's own reading of one checks the length it inflates instead (:func:`samembed.nifti_gz.read_nifti_gz`).
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        gzipped = name.endswith(".gz")
        head = nifti_head(path, gzipped)
        check_voxel_offset(head, path)
        layout = nifti_layout(head, single_file=True)
        if layout is not None:
            check_layout(layout, inflated_length(path) if gzipped else path.stat().st_size, path)
    elif name.endswith((".hdr", ".hdr.gz")):
        layout = nifti_layout(nifti_head(path, name.endswith(".gz")), single_file=False)
        stem = path.name[: -len(".hdr.gz") if name.endswith(".gz") else -len(".hdr")]
        for suffix in (".img", ".IMG", ".img.gz", ".IMG.gz"):
            data = path.with_name(stem + suffix)
            if layout is not None and data.is_file():
                size = inflated_length(data) if suffix.endswith(".gz") else data.stat().st_size
                check_layout(layout, size, data, path)
                return


def nifti_voxel_sizes(head: bytes) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """The header's ``dim[1:4]`` and ``pixdim[1:4]`` (mm) of the spatial axes it has, or None when ``head`` is not a
    NIfTI-1, Analyze 7.5 or NIfTI-2 header."""
    fields = _header_fields(head)
    if fields is None:
        return None
    _, dim, _, _, _, pixdim = fields
    n = min(max(int(dim[0]), 0), 3)
    return tuple(int(v) for v in dim[1:n + 1]), tuple(float(v) for v in pixdim[1:n + 1])


def check_nifti_voxel_sizes(path: str | Path) -> None:
    """Raise :class:`InputError` when the NIfTI file ``path`` (``.nii``, ``.nii.gz``, ``.hdr``) gives a voxel size
    (``pixdim``) that is zero, negative or not a number along a spatial axis of more than one voxel: ITK's reader
    then places the image at 1 mm per voxel, or mirrored, with no more than a warning about the sform (an audit: a
    brainstem 165 mm off). Nothing for other files, or a header this module does not read."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz")):
        return
    got = nifti_voxel_sizes(nifti_head(path, name.endswith(".gz")))
    if got is None:
        return
    for axis, (size, mm) in enumerate(zip(*got)):
        if size > 1 and not (math.isfinite(mm) and mm > 0):
            raise InputError(f"{path}: its header gives a voxel size of {mm:g} mm along {'xyz'[axis]} (pixdim[{axis + 1}]); "
                             "a voxel size must be a positive number of mm, and SimpleITK would place the image at "
                             "1 mm per voxel or mirrored. Fix the header, or export the image again")
