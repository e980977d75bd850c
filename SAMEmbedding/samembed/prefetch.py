"""Reading and preprocessing the images in a second process while the network library loads and the matching goes.

A fresh ``samembed match`` spends its first 1.3-2 s importing torch, on one core, before it can read a voxel. On a
machine with a second core, :func:`start` forks a child first (before torch is imported) that reads the source and
the targets, then preprocesses them in the order the engine embeds them, exactly as the engine would
(:func:`samembed.preprocess.preprocess`, the same code), and sends each result back through a pipe. The source and
the first target are always prefetched, and so are the later targets of a long list (one atlas into many scans):
the command takes each when its turn comes, so the child reads and preprocesses them one by one, after the first
pair's inputs (:attr:`PrefetchRequest.in_turn`), each while the engine matches the targets before it, at most
:data:`AHEAD` beyond the one the engine asked for last. The engine takes a prefetched input only for an image with
the same content hash, the same preprocessing settings and the same modality (:meth:`Prefetch.take`); anything
else, including an image the child could not read, is preprocessed by the engine as usual (and its error reported
there).

The voxels do not go through the pipe. The parent maps one anonymous shared memory region before it forks
(:class:`_Arena`); the child copies the first pair's arrays into it and sends only where they lie. A pipe moves
64 KB per read, and the thread that reads it needs the GIL for each read while the main thread imports torch:
measured, a 70 MB array took 0.26 s through a pipe to an idle process and 5.8 s to a busy one. An array of the
source or the first target that does not fit in the region still goes through the pipe. The command's later
targets' arrays come each in memory of its own, which goes when the engine drops it (:class:`_Handoff`, Linux): one
atlas into 100 OpenKBP CTs, 60.8 -> 52.6 s and a peak RSS of 2.18 -> 1.69 GB, against the region, which was full
from about the 20th target on, after which the engine read and preprocessed every target itself. For a caller that
takes every image first (the Slicer module's engine process), and where memory files cannot be made, the later
images take at most half of the region, so that the first pair's inputs, made after every image is read, find
room, and what does not fit is left to the engine.
A volume file that its sender maps, with its hash (:class:`ArrayFile`, ``shared``), is not copied at all: both
processes map the file, and only its input comes through the region (or its own memory).

The child reads the source and the first target at once, one thread each (:func:`_read_first_at_once`: ISA-L's
inflater lets go of the GIL), so both arrive in about the time of the larger one once torch has loaded and left the
second core. With a pair of chest CTs in 0.5 mm slices (0.17 GB as .nii.gz each, 1.2-1.5 s each to read) the engine
no longer reads the target itself: it waited 1.5 s for the prefetch after its imports, against 1.61 s of reading and
0.22 s of preprocessing of its own before (7.24 -> 7.06 s in all). On the wall clock the change is within this VM's
spread: a cold LIDC pair (35-45 MB as .nii.gz each) 4.94 -> 4.80 s over 7 runs each, side by side
(``benchmarks/cold_ab.py``), where two identical engines differed by 1.03x and 1.17x in the same hour.

The two processes share the work (:class:`_Claims`): each image's reading and its preprocessing are claimed by
whoever starts them first, and the command reads an image that the child has not started itself instead of waiting
while the child works on an earlier one (a later target); it makes an input itself, likewise, while the child is
still reading (a later target's).

Used by the ``samembed match`` command, and by the Slicer module's engine process for the volumes of its first
request (:class:`ArrayFile`: voxels saved by the module, with their geometry), when that request starts the engine
and torch has still to load (Linux, ``fork``). A library call reads its images itself. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .collector import resume_after_fork

log = logging.getLogger(__name__)

#: images always prefetched: the source and the first target (their arrays go through the pipe when the shared
#: region is full); the later ones are handed over in memory of their own (:class:`_Handoff`), or where that
#: cannot be, prefetched only while they fit in the region
FIRST_IMAGES = 2


@dataclass(frozen=True)
class ArrayFile:
    """An image given as a ``.npy`` file of its voxels (zyx) and its geometry, as the Slicer module's engine process
    receives its volumes; read as the engine process reads it (:meth:`read`). The file is only read, never removed.
    ``content_hash``: the image's (:meth:`~samembed.image.Image.content_hash`), when the sender knows it: an input
    asked for with another hash is then known not to come, and nobody waits for it. ``shared``: the sender maps the
    file too (a volume the module copied straight into it), so its pages are in memory and held anyway: the
    processes that read it map it instead of copying it (a file written only to be sent is copied: mapped, it would
    keep its disk space after its removal for as long as the volume is kept)."""

    path: str
    grid: object  # samembed.image.Grid
    name: str
    spacing_known: bool = True
    content_hash: str | None = None
    shared: bool = False
    plane_z_mm: float | None = None  # a 2D image made from a one-slice volume: that slice's z (Image.plane_z_mm)

    def read(self, mapped: bool = False):
        """The :class:`~samembed.image.Image`, with the sender's ``content_hash`` when it is known (the file is the
        sender's copy of the voxels it hashed: hashing a 0.35 GB thin-slice CT again takes 0.2 s).

        ``mapped``: the voxels stay in the file, mapped read-only (POSIX: the mapping outlives the file's removal):
        a file just written is in the page cache, so no fresh copy is made; the pages are shared by every process
        that maps them (the sender, the prefetch process that preprocesses the volume, the engine that reads it from
        the prefetch: one copy of a 0.35 GB thin-slice CT instead of one per process; reading it into fresh memory
        took 0.29-1.0 s on the 2-core VM)."""
        from .image import Image
        from .io import load_npy

        return Image(load_npy(self.path, mapped), self.grid, self.name, self.spacing_known, self.plane_z_mm,
                     _hash=[] if self.content_hash is None else [self.content_hash])


def source_key(source: str | ArrayFile) -> str:
    """What :meth:`Prefetch.image` knows an image by: its path (a file's, or an :class:`ArrayFile`'s ``.npy``)."""
    return source.path if isinstance(source, ArrayFile) else str(source)


def first_index(paths: Sequence[str | ArrayFile], path: str) -> int:
    """The index in ``paths`` of the first image read from ``path`` (a file named twice is read once, there; its
    tasks are claimed by that index, :class:`_Claims`)."""
    return next(i for i, s in enumerate(paths) if source_key(s) == path)


@dataclass(frozen=True)
class PrefetchRequest:
    """What the child does: read ``paths`` (files, or :class:`ArrayFile` volumes) and preprocess them with ``preprocess`` (a
    :class:`~samembed.preprocess.PreprocessConfig` as a dict) for ``modality``, padding CT to multiples of
    ``pad_multiple_zyx`` (the network's, as the engine pads), and make each input's body mask on the grid of stride
    ``body_stride_zyx`` (the local map's, as the engine does, on the input padded to that multiple; carried by the
    :class:`~samembed.preprocess.Prepared`; None: the engine makes it); ``spacing_mm`` as ``as_image``'s."""

    paths: tuple[str | ArrayFile, ...]
    preprocess: dict
    modality: str = "auto"
    spacing_mm: float | None = None
    pad_multiple_zyx: tuple[int, ...] | None = None
    body_stride_zyx: tuple[int, ...] | None = None
    #: the later images (after :data:`FIRST_IMAGES`) are each read and preprocessed in turn, once the first images'
    #: inputs are made: for a caller that takes each later image when it matches it (the command, one atlas into
    #: many: the next target's reading and preprocessing on the second core while the engine matches this one);
    #: False: every image is read before any is preprocessed (a caller that takes them all before it embeds one)
    in_turn: bool = False


def _arena_bytes() -> int:
    """An eighth of the RAM, at most 1 GiB (a pair of 512 x 512 x 400 CTs and their inputs); 0 where the RAM cannot
    be read: no shared region. Where the kernel commits shared memory up front (``vm.overcommit_memory=2``) the whole
    region counts, so it stays small. 0 (no region) under a limit of the address space (``ulimit -v``): its address
    space counts against it, and a run that fits without it failed (torch could not load, or could not allocate; a
    review: limits of 1.3-2.6 GB)."""
    try:
        import resource

        if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
            return 0
    except (ImportError, OSError, ValueError, AttributeError):  # (no such limit here)
        pass
    try:
        return min(1 << 30, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
    except (AttributeError, ValueError, OSError):
        return 0


#: the shared region's size (address space only: a page exists once the child writes it)
ARENA_BYTES = _arena_bytes()


class _Arena:
    """An anonymous shared memory region, mapped before the fork: the child copies arrays into it one after
    another (:meth:`put`) and the parent views them in place (:meth:`view`), no copy and no pipe. The region lives
    as long as an array viewing it (each holds a reference); a page exists once the child writes it. The child
    writes an array before it sends where it lies and never writes there again. A process forked later would share
    the region too (not copy on write); ``samembed match`` forks none."""

    def __init__(self, nbytes: int) -> None:
        self.buf = mmap.mmap(-1, nbytes)  # MAP_SHARED | MAP_ANONYMOUS: the child's writes are the parent's pages
        self.offset = 0

    def put(self, arr: np.ndarray, limit: int | None = None) -> tuple | None:
        """Copy ``arr`` into the region (in the child); where it lies, or None when it does not fit (below ``limit``
        bytes of the region, when given)."""
        start = -(-self.offset // 64) * 64
        end = len(self.buf) if limit is None else min(limit, len(self.buf))
        if start + arr.nbytes > end:
            return None
        np.ndarray(arr.shape, arr.dtype, buffer=self.buf, offset=start)[...] = arr
        self.offset = start + arr.nbytes
        return start, arr.dtype.str, tuple(arr.shape)

    def view(self, where: tuple) -> np.ndarray:
        """The array the child put at ``where`` (in the parent)."""
        start, dtype, shape = where
        return np.ndarray(shape, np.dtype(dtype), buffer=self.buf, offset=start)


class _Handoff:
    """The later images' arrays (:attr:`PrefetchRequest.in_turn`), each handed over in memory of its own (Linux
    ``memfd``), not in the shared region: the child copies an array into a new anonymous memory file and passes its
    descriptor through a socket (made before the fork); the parent maps it and closes the descriptor (:meth:`view`).
    Its memory then goes when the parent drops the array: the command drops each target once matched
    (``Matcher.forget``, :meth:`Prefetch.discard`), so a long run holds the arrays in use only, and the child never
    runs out of room, as it did in the region, after which the engine read and preprocessed every later target itself
    (one atlas into 100 OpenKBP CTs: from about the 20th).

    Each descriptor goes in a datagram of its own with a sequence number, which the message naming it carries too:
    a descriptor sent for a message that was never sent (the child failed in between) is skipped and closed, never
    taken for the next array."""

    def __init__(self) -> None:
        self.parent_end, self.child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sent = 0  # in the child: the next sequence number

    @staticmethod
    def available() -> bool:
        """This system can hand arrays over so: memory files and descriptors passed through sockets (Linux)."""
        return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")

    def put(self, arr: np.ndarray) -> tuple | None:
        """Copy ``arr`` into a new memory file and send its descriptor (in the child): where it lies, for
        :meth:`view`; None for an empty array, or when no memory file can be made (the caller sends it another
        way or leaves it to the engine)."""
        if arr.nbytes == 0:
            return None
        try:
            fd = os.memfd_create("samembed-prefetch", os.MFD_CLOEXEC)
        except OSError:
            return None
        seq = self._sent
        try:
            os.ftruncate(fd, arr.nbytes)
            buf = mmap.mmap(fd, arr.nbytes)
            np.ndarray(arr.shape, arr.dtype, buffer=buf)[...] = arr
            buf.close()  # the file keeps the values; the child holds none of it
            socket.send_fds(self.child_end, [seq.to_bytes(8, "little")], [fd])
        except OSError:  # no memory for it: never sent
            return None
        finally:
            os.close(fd)
        self._sent += 1
        return "memfd", arr.dtype.str, tuple(arr.shape), seq

    def view(self, where: tuple) -> np.ndarray:
        """The array the child put at ``where`` (in the parent, which takes them in the order sent): its memory file
        mapped, the descriptor closed; the memory goes with the array."""
        _, dtype, shape, seq = where
        while True:
            data, fds, _, _ = socket.recv_fds(self.parent_end, 8, 1)
            got = int.from_bytes(data, "little")
            if got == seq and fds:
                break
            if got == seq:  # its descriptor dropped by the kernel (MSG_CTRUNC): waiting for it held the engine forever
                raise RuntimeError(f"prefetch: memory file {seq} came without its descriptor (this process is at its "
                                   "limit of open files, ulimit -n)")
            for fd in fds:  # an earlier one whose message never came
                os.close(fd)
            if got > seq:
                raise RuntimeError(f"prefetch: memory file {seq} never came (got {got})")
        try:
            buf = mmap.mmap(fds[0], int(np.prod(shape)) * np.dtype(dtype).itemsize)
        finally:
            os.close(fds[0])
        return np.ndarray(shape, np.dtype(dtype), buffer=buf)


def _pack(arena: _Arena | None, obj, limit: int | None = None, handoff: _Handoff | None = None):
    """An :class:`~samembed.image.Image` or :class:`~samembed.preprocess.Prepared` for the pipe: its array handed
    over in memory of its own (``handoff``, when given) or in the shared region (the pipe carries the rest), or the
    whole object when it does not fit (below ``limit``)."""
    if handoff is not None:
        where = handoff.put(obj.array)
    else:
        where = None if arena is None else arena.put(obj.array, limit)
    return (obj, None) if where is None else (dataclasses.replace(obj, array=np.empty(0, obj.array.dtype)), where)


def _unpack(arena: _Arena | None, packed, handoff: _Handoff | None = None):
    obj, where = packed
    if where is None:
        return obj
    return dataclasses.replace(obj, array=handoff.view(where) if where[0] == "memfd" else arena.view(where))


#: who does a task (:class:`_Claims`): nobody yet, the child, the engine (the parent)
FREE, CHILD, ENGINE = 0, 1, 2
#: the tasks of each image: reading it, preprocessing it
READ, PREPROCESS = 0, 1
#: images whose tasks can be claimed (the rest: the child does them, the engine waits for it, as for any image)
CLAIMED_IMAGES = 1024
#: later images (:attr:`PrefetchRequest.in_turn`, handed over in memory of their own) that the child reads beyond the
#: last one the engine has asked for (or the first pair, before it asks): each is read and preprocessed while the
#: engine matches a target before it, and no more wait in memory for their turn
AHEAD = 2
#: seconds a process waits for the claims' shared lock (:class:`_Claims`), held for microseconds unless its holder
#: was killed holding it
LOCK_WAIT_S = 5.0


class _Claims:
    """Who reads and who preprocesses each image (by its index in the request): one byte per task in a shared
    region mapped before the fork, set under a lock that both processes share. The child claims a task before it
    starts it; the engine claims one that nobody has started when it needs the result (:meth:`Prefetch.image`,
    :meth:`Prefetch.take`), and does it itself instead of waiting while the child works on an earlier image. The
    child claims the first two images' reading at once (:func:`_read_first_at_once`)."""

    def __init__(self, ctx) -> None:
        self._state = mmap.mmap(-1, 2 * CLAIMED_IMAGES)
        self._lock = ctx.Lock()
        self._asked = mmap.mmap(-1, 8)  # the highest index the engine has asked for, plus one (0: none yet)
        self._broken = False  # the lock could not be had once (_acquire): never waited for again

    def _acquire(self) -> bool:
        """The shared lock, within :data:`LOCK_WAIT_S`; False, and from then on at once, when it cannot be had: the
        child was killed while it held it (the engine then waits for nothing the child would do)."""
        if self._broken:
            return False
        if self._lock.acquire(timeout=LOCK_WAIT_S):
            return True
        self._broken = True
        log.debug("prefetch: the claims' lock is held by a process that is gone")
        return False

    def ask(self, index: int) -> None:
        """The engine asks for image ``index`` (its image or its input) now (in the parent)."""
        if not self._acquire():  # only paces the child's look-ahead: nothing to do without it
            return
        try:
            if index > self.asked():
                self._asked[:8] = int(index + 1).to_bytes(8, "little")
        finally:
            self._lock.release()

    def asked(self) -> int:
        """The highest index of an image the engine has asked for, -1 before the first."""
        return int.from_bytes(self._asked[:8], "little") - 1

    def claim(self, index: int, task: int, who: int) -> bool:
        """Claim ``task`` of image ``index`` for ``who``: True when nobody had (or ``who`` itself had) claimed it; an
        image beyond :data:`CLAIMED_IMAGES` is the child's."""
        if index >= CLAIMED_IMAGES:
            return who == CHILD
        k = 2 * index + task
        if not self._acquire():  # (a child killed while holding it) the task stays the child's
            return who == CHILD
        try:
            if self._state[k] == FREE:
                self._state[k] = who
            return self._state[k] == who
        finally:
            self._lock.release()


def can_fork_ahead() -> bool:
    """This machine can prefetch at all: Linux with ``fork``, more than one core (torch aside, see :func:`available`).
    """
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and (os.cpu_count() or 1) > 1)


def available() -> bool:
    """Prefetching can help here: :func:`can_fork_ahead`, and torch not imported yet."""
    return can_fork_ahead() and "torch" not in sys.modules


def _sources(paths: Sequence[str | os.PathLike | ArrayFile]) -> tuple[str | ArrayFile, ...]:
    """Paths as the child takes them: file paths as strings, :class:`ArrayFile` volumes as they are."""
    return tuple(p if isinstance(p, ArrayFile) else str(p) for p in paths)


#: the signals that stop a command (Ctrl-C, and ``samembed.stopping``'s SIGTERM), blocked across the child's fork
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _block_stop_signals() -> set | None:
    """Block :data:`_STOP_SIGNALS` in this thread (kept pending by the kernel): the mask before, or None where
    signal masks are not available."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _unblock_stop_signals(previous: set | None = None) -> None:
    """Put this thread's signal mask back to ``previous`` (from :func:`_block_stop_signals`), or, without it (the
    child), unblock :data:`_STOP_SIGNALS`."""
    if not hasattr(signal, "pthread_sigmask"):
        return
    if previous is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    else:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _HeldRecords(logging.Handler):
    """The prefetch child's one logging handler: what a thread logs while it reads an image (:meth:`holding`, a
    warning about the file) is held, to go with that image to the engine, which logs it when it takes the image
    (:meth:`Prefetch.image`). A file whose reading failed here, or that the engine reads itself after all, is warned
    of by the engine's own reading, and a target the command never reaches not at all: said here too, each such
    warning came twice, or for nothing (a review). Whatever else this process logs goes to the handlers it
    inherited (the command's), as before."""

    def __init__(self, inherited: Sequence[logging.Handler]) -> None:
        super().__init__()
        self._inherited = list(inherited)
        self._held: dict[int, list[tuple[str, int, str]]] = {}

    @contextlib.contextmanager
    def holding(self):
        """``(logger name, level, message)`` of each record this thread logs inside, in order."""
        me = threading.get_ident()
        records = self._held[me] = []
        try:
            yield records
        finally:
            del self._held[me]

    def emit(self, record: logging.LogRecord) -> None:
        held = self._held.get(threading.get_ident())
        if held is not None:
            held.append((record.name, record.levelno, record.getMessage()))
            return
        for handler in self._inherited:
            if record.levelno >= handler.level:
                handler.handle(record)


def _child(request: PrefetchRequest, conn, arena: _Arena | None, claims: _Claims, given=None,
           handoff: _Handoff | None = None, parent_ends: Sequence = (), scratch: str | None = None) -> None:
    # Ctrl-C reaches the whole process group: the engine stops this process itself (Prefetch.close), so the
    # interrupt is the engine's to report, not a traceback of this process's. SIGTERM (Prefetch.close's) ends it
    # at once, whatever handler the command had when it forked (samembed.cli stops on SIGTERM as on Ctrl-C)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _unblock_stop_signals()  # blocked across the fork (Prefetch.__init__): one sent meanwhile comes now, to these
    resume_after_fork()  # the engine's paused collector is its own (samembed.collector)
    # the parent's ends of the pipes and the socket, inherited by the fork, closed: after the parent's death a send
    # fails (EPIPE) instead of waiting for ever, and recv() ends
    for end in parent_ends:
        end.close()
    # this process's temporary files (a link through which ITK reads a file it cannot open by its own name) in a
    # folder named by its parent, which removes it (Prefetch.close) however this process ended: ended by SIGTERM, or
    # the OOM killer's SIGKILL, it runs no clean-up of its own, which left such folders in /tmp (a review). Made
    # here, and removed here when this process ends by itself, so that the parent's own death leaves none
    try:
        if scratch is not None:
            os.mkdir(scratch, 0o700)  # (a name taken: the system's folder, as before)
            tempfile.tempdir = scratch
    except OSError:
        scratch = None
    held = _HeldRecords(logging.root.handlers or [logging.lastResort])
    logging.root.handlers = [held]
    engine_gone = False
    try:
        _child_work(request, conn, arena, claims, given, handoff, held)
    except (BrokenPipeError, ConnectionError):  # the engine is gone (killed): nobody takes what this would make
        engine_gone = True
    finally:
        _remove_scratch(scratch)
    if engine_gone:
        os._exit(0)


def _remove_scratch(scratch: str | None) -> None:
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _child_work(request: PrefetchRequest, conn, arena: _Arena | None, claims: _Claims, given,
                handoff: _Handoff | None, held: _HeldRecords) -> None:
    """The child's work (:func:`_child`): read and preprocess the images, sending each result (with what was logged
    while each was read: ``held``)."""
    parent = os.getppid()
    with contextlib.suppress(OSError):  # the engine's threads first where they share a core with this process
        os.nice(10)  # (which works ahead of them)
    import SimpleITK as sitk

    from .io import read_image
    from .preprocess import PreprocessConfig, body_mask_on_grid, pad_to_multiple, preprocess

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core here, the other for the import

    if given is not None:  # started ahead (start_waiting): the images come when the engine's first request does
        try:
            paths = given.recv()
        except (EOFError, OSError):
            paths = None
        if not paths:
            conn.close()
            return
        request = dataclasses.replace(request, paths=tuple(paths))
    config = PreprocessConfig.from_dict(request.preprocess)
    full = False  # the later images' share of the region is used up: the rest are left to the engine
    half = None if arena is None else len(arena.buf) // 2

    def skipped(i: int, source) -> None:  # the engine told that this process does not read image i
        conn.send(("skipped", source_key(source), None))

    def claim(i: int, source, tell: bool = True) -> bool:  # whether this process reads image i; if not (and
        path = source_key(source)  # ``tell``), the engine is told at once
        # skipped: a later image that cannot be shared, a file named twice (read once), one the engine reads
        later_unshared = i >= FIRST_IMAGES and handoff is None and (full or arena is None)
        if later_unshared or first_index(request.paths, path) != i or not claims.claim(i, READ, CHILD):
            if tell:
                skipped(i, source)
            return False
        return True

    def load(source):  # the image, or the exception that reading it raised (the command reports it, reading again;
        # without its traceback, whose frames would hold the reader's buffers); and what was logged meanwhile
        with held.holding() as records:
            try:
                if isinstance(source, ArrayFile):
                    return source.read(mapped=True), records
                # (the command warns of an assumed spacing)
                return read_image(source, spacing_mm=request.spacing_mm, warn_spacing=False), records
            except Exception as exc:  # noqa: BLE001 - the command reads it again and reports the error itself
                return exc.with_traceback(None), records

    def read(i: int, source, loaded=None):  # the image read, sent, and kept for its preprocessing; None: left to
        nonlocal full  # the engine. ``loaded``: what load() gave, when its claim and reading were done before
        later = i >= FIRST_IMAGES
        path = source_key(source)
        if loaded is None:
            if not claim(i, source):
                return None
            loaded = load(source)
        loaded, records = loaded
        if isinstance(loaded, Exception):  # (what was logged goes too: the engine's own reading says it again)
            conn.send(("failed", path, None))
            return None
        if records:  # before the image: the engine logs them when it takes the image, drops them otherwise
            conn.send(("log", path, records))
        image = loaded
        if isinstance(source, ArrayFile) and source.content_hash is not None and source.shared:
            # a volume file its sender maps, with its hash: the engine maps the file itself (its pages, just written,
            # are in the page cache, shared by every process that maps them); only its input comes through the region
            conn.send(("mapped", path, None))
            return image
        image.content_hash()  # the cache key's hash travels with the image: the parent need not compute it
        packed = _pack(arena, image, half if later else None, handoff if later else None)
        if later and packed[1] is None:  # a later image that does not fit: never through the pipe
            full = handoff is None  # the region is used up; a memory file fails for this image alone
            conn.send(("skipped", path, None))
            return None
        if packed[1] is None and isinstance(image.array, np.memmap):  # through the pipe as a plain array
            image = dataclasses.replace(image, array=np.array(image.array))
            packed = (image, None)
        conn.send(("image", path, packed))
        if packed[1] is not None and packed[1][0] != "memfd":  # preprocessed from the shared copy: the child's own
            image = dataclasses.replace(image, array=arena.view(packed[1]))  # is freed (one copy held)
        return image

    def make_input(i: int, image) -> None:  # its input sent, or word that it will not come
        made = False
        try:
            if claims.claim(i, PREPROCESS, CHILD):  # else the engine preprocesses it itself
                pad, stride = request.pad_multiple_zyx, request.body_stride_zyx
                prep = preprocess(image, config, request.modality, pad)
                if stride is not None and pad is not None:  # as Embedder._body_on_local makes it, on the padded input
                    arr = pad_to_multiple(prep.array, pad, prep.fill_value)  # CT comes padded: itself
                    body = body_mask_on_grid(arr, stride, prep.modality)
                    prep = dataclasses.replace(prep, body=body, body_stride_zyx=tuple(stride))
                packed = _pack(arena, prep, None, handoff if i >= FIRST_IMAGES else None)
                if i < FIRST_IMAGES or packed[1] is not None:
                    conn.send(("input", image.content_hash(), packed))
                    made = True
        except Exception:  # noqa: BLE001 - the engine preprocesses it again and reports the error itself
            log.debug("prefetch: %s not preprocessed", image.name)
        if not made:  # the engine need not wait for it
            conn.send(("no input", image.content_hash(), None))

    # every image read first (the caller takes them all before it embeds one), or, in turn, the first ones, then
    # each later one read and preprocessed as the engine will take it
    first = FIRST_IMAGES if request.in_turn else len(request.paths)
    images = _read_first_at_once(request.paths[:first], claim, load, read, skipped)
    for i, image in images:
        if image is not None:
            make_input(i, image)
    for i, source in enumerate(request.paths[first:], first):
        if handoff is not None:  # (in turn: the only way memory files are used)
            # at most AHEAD images beyond the engine's (or, while it loads, beyond the first pair): each waits in
            # memory of its own for its turn
            while i > max(claims.asked(), FIRST_IMAGES - 1) + AHEAD:
                if os.getppid() != parent:  # the engine is gone
                    return
                time.sleep(0.005)
        image = read(i, source)
        if image is not None:
            make_input(i, image)
    conn.close()


def _read_first_at_once(sources: Sequence, claim, load, read, skipped) -> list[tuple[int, object]]:
    """The child's first images (``[(index, read(...))]``, in order): the first :data:`FIRST_IMAGES` that this process
    claims (``claim(i, source, tell=False)``) loaded at once, one thread each (ISA-L's inflater and SimpleITK's
    reader let go of the GIL), each sent (``read``) in order as soon as it and those before it are loaded, and the
    engine told of each one not claimed (``skipped``) in that order too (a scan named twice is then still read once,
    here: its second name's word comes after the image); the rest one by one. Two chest CTs of 0.5 mm slices (0.17 GB
    as .nii.gz, 1.2-1.5 s each to inflate) are then read in about the time of one once torch has loaded and left the
    second core, where the engine used to read the first target itself while this process, done with the source,
    waited. Both files' gzip data and voxels are in memory at once while they are read (a LIDC-0001 pair: this
    process's peak 351 -> 396 MB)."""
    from concurrent.futures import ThreadPoolExecutor

    heads = list(enumerate(sources[:FIRST_IMAGES]))
    claimed = [claim(i, source, tell=False) for i, source in heads]
    out: list[tuple[int, object]] = []
    with ThreadPoolExecutor(max(1, sum(claimed)), thread_name_prefix="samembed-prefetch-read") as pool:
        loads = [pool.submit(load, source) if ok else None for (_, source), ok in zip(heads, claimed)]
        for k, (i, source) in enumerate(heads):
            if loads[k] is None:
                skipped(i, source)
                out.append((i, None))
                continue
            loaded, loads[k] = loads[k].result(), None  # the future no longer holds it: read() may keep a shared copy
            out.append((i, read(i, source, loaded)))
            del loaded
    return out + [(i, read(i, source)) for i, source in enumerate(sources[FIRST_IMAGES:], FIRST_IMAGES)]


class Prefetch:
    """A running prefetch (see the module docstring); :meth:`take` hands out its results."""

    def __init__(self, request: PrefetchRequest, waiting: bool = False, share_work: bool = False) -> None:
        ctx = multiprocessing.get_context("fork")
        self.request = request
        # share_work: the engine reads an image, or makes an input, that the child has not started, instead of
        # waiting for it (:class:`_Claims`); for a caller that asks for each result when it needs it and would
        # otherwise wait (the command). The Slicer module's engine process asks for its targets' volumes as soon as
        # it gives them, and splits the work itself (its first volume its own, the rest the child's)
        self.share_work = share_work
        # waiting: the child is started now (before torch is imported) and told its images later (:meth:`give`)
        self._later, later_child = ctx.Pipe(duplex=False)[::-1] if waiting else (None, None)
        try:
            self._arena = _Arena(ARENA_BYTES) if ARENA_BYTES > 0 else None
        except (OSError, ValueError) as exc:  # no shared memory here: the arrays go through the pipe
            log.debug("prefetch: no shared region (%s)", exc)
            self._arena = None
        self._claims = _Claims(ctx)
        # the later images in memory of their own only when the caller takes them in turn (each dropped once
        # matched); a caller that takes every image first (the Slicer module's engine process) gets the region's
        # one shared copy of each, the later ones while they fit in half of it
        self._handoff = _Handoff() if request.in_turn and _Handoff.available() else None
        self._conn, child_conn = ctx.Pipe(duplex=False)
        # the child's folder for its temporary files (it makes it), removed by close() whatever ends the child
        self._scratch = os.path.join(tempfile.gettempdir(), f"samembed-prefetch-{secrets.token_hex(8)}")
        # the parent's ends, inherited by the fork: the child closes them (_child)
        parent_ends = [end for end in (self._conn, self._later, getattr(self._handoff, "parent_end", None))
                       if end is not None]
        self._proc = ctx.Process(target=_child,
                                 args=(request, child_conn, self._arena, self._claims, later_child, self._handoff,
                                       parent_ends, self._scratch),
                                 daemon=True, name="samembed-prefetch")
        # Ctrl-C and SIGTERM blocked across the fork: until the child has set its own handlers it runs the parent's
        # (the command's SIGTERM raises), so one arriving in those few milliseconds left a traceback, or a child that
        # missed close()'s SIGTERM (a review). Blocked, it waits for the child's handlers (_child); the parent's own
        # is delivered when its mask is put back, a moment later
        blocked = _block_stop_signals()
        try:
            self._proc.start()
        finally:
            _unblock_stop_signals(blocked)
        child_conn.close()
        if self._handoff is not None:
            self._handoff.child_end.close()
        if later_child is not None:
            later_child.close()
        self._results: dict[str, object] = {}
        self._images: dict[str, object] = {}
        self._settled: set[str] = set()  # paths whose image arrived, failed or was skipped
        self._logs: dict[str, list[tuple[str, int, str]]] = {}  # what the child logged while it read each path
        self._coming: set[str] = set()  # content hashes of the images read: their inputs may still come
        self._no_input: set[str] = set()  # content hashes whose input will not come
        self._index: dict[str, int] = {}  # the request's index of each content hash the child read
        self._discarded: set[str] = set()  # content hashes whose input the engine will not take (discard())
        self._done = False
        self.images_read = 0  # images handed out by image(), and inputs by take() (what the engine did not do itself)
        self.inputs_made = 0
        self._cond = threading.Condition()
        # a thread empties the pipe as results come, so the child never waits for the main thread (busy importing)
        self._receiver = threading.Thread(target=self._receive, daemon=True, name="samembed-prefetch-receiver")
        self._receiver.start()

    def _receive(self) -> None:
        try:
            while True:
                try:
                    kind, key, value = self._conn.recv()
                except (EOFError, OSError):  # the child finished (or died: the engine reads the rest itself)
                    break
                log.debug("prefetch: %s %s", kind, key)
                if kind == "mapped":  # a volume file the child has read: mapped here too (outside the lock)
                    kind, value = self._map(key)
                with self._cond:
                    if kind == "image":
                        image = self._images[key] = _unpack(self._arena, value, self._handoff)
                        self._coming.add(image.content_hash())  # the child's hash, carried with the image
                        self._index.setdefault(image.content_hash(), first_index(self.request.paths, key))
                    elif kind == "input" and key not in self._discarded:
                        self._results[key] = _unpack(self._arena, value, self._handoff)
                    elif kind == "input":  # the engine is done with that image: its input goes at once
                        _unpack(self._arena, value, self._handoff)
                    elif kind == "no input":
                        self._no_input.add(key)
                    elif kind == "log":
                        self._logs[key] = value
                    if kind in ("image", "failed", "skipped"):
                        self._settled.add(key)
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the engine must not wait for more
            # and the child must not wait either: nobody reads its pipe any more, so its next large send would hold
            # it, and its memory, until close()
            log.warning("prefetch stopped (the engine reads the remaining images itself): %s", exc)
            with contextlib.suppress(Exception):
                self._proc.terminate()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _map(self, path: str) -> tuple[str, object]:
        """The message for a volume file the child has read (``"mapped"``): ``("image", (the image mapped from its
        file, None))``, or ``("failed", None)`` when the file is gone (forgotten by the engine meanwhile)."""
        try:
            source = self.request.paths[first_index(self.request.paths, path)]
            return "image", (source.read(mapped=True), None)
        except Exception as exc:  # noqa: BLE001 - the engine reads it itself and reports what is wrong
            log.debug("prefetch: %s not mapped: %s", path, exc)
            return "failed", None

    def give(self, paths: Sequence[str | ArrayFile]) -> None:
        """Tell a prefetch started by :func:`start_waiting` its images (the source, then the targets), once."""
        if self._later is None:
            raise RuntimeError("this prefetch was given its images when it started")
        sources = _sources(paths)
        with self._cond:
            self.request = dataclasses.replace(self.request, paths=sources)
        try:
            self._later.send(sources)
        except OSError as exc:  # the child is gone: nothing will come, and the engine reads the images itself
            log.debug("prefetch: the child took no images: %s", exc)
        self._later.close()
        self._later = None

    def image(self, path: str):
        """The :class:`~samembed.image.Image` the child read from ``path`` (handed out once), or None when it did not
        (not prefetched, or it failed: the caller reads the file and reports the error)."""
        path = str(path)
        if path not in {source_key(s) for s in self.request.paths}:
            return None
        self._claims.ask(first_index(self.request.paths, path))
        with self._cond:
            if (self.share_work and path not in self._settled and not self._done
                    and self._claims.claim(first_index(self.request.paths, path), READ, ENGINE)):
                self._settled.add(path)  # nobody had started it: the caller reads it, while the child works on
                return None  # (the child skips it)
            self._cond.wait_for(lambda: path in self._settled or self._done)
            image = self._images.pop(path, None)
            self.images_read += image is not None
            logs = self._logs.pop(path, [])
        for name, level, message in logs if image is not None else ():  # (else the caller's reading says it)
            logging.getLogger(name).log(level, "%s", message)
        return image

    def take(self, content_hash: str, config, modality: str, pad_multiple_zyx: tuple[int, ...] | None = None):
        """The prefetched :class:`~samembed.preprocess.Prepared` input of the image with ``content_hash``, when it
        was made with the :class:`~samembed.preprocess.PreprocessConfig` ``config``, ``modality`` and CT padding
        multiple ``pad_multiple_zyx``, or with no multiple at all (else None). Waits for the child while it may still
        deliver it; each result is handed out once."""
        from .preprocess import PreprocessConfig

        req = self.request
        # an input made without a multiple is the engine's before it pads (it pads it then, to the same values)
        same_pad = req.pad_multiple_zyx is None or (pad_multiple_zyx is not None
                                                    and tuple(req.pad_multiple_zyx) == tuple(pad_multiple_zyx))
        if PreprocessConfig.from_dict(req.preprocess) != config or modality != req.modality or not same_pad:
            return None
        known = [s.content_hash for s in req.paths if isinstance(s, ArrayFile)]
        if len(known) == len(req.paths) and None not in known and content_hash not in known:
            return None  # not one of its images (their hashes came with them): nothing to wait for
        paths = {source_key(s) for s in req.paths}
        with self._cond:  # wait while the child may still make it: an image it read and has not given up on
            if req.in_turn and (content_hash not in self._index
                                or (content_hash not in self._coming and content_hash not in self._results)):
                # the child sends each image before its input, and the caller takes an image before its input: one
                # not sent is the caller's own (read itself, or no image of the request), and one handed out (or
                # claimed by the caller) does not come again. Waiting until every image is settled would never end:
                # the child reads no more than AHEAD images beyond what the caller asked for.
                return None
            if content_hash in self._index:
                self._claims.ask(self._index[content_hash])
            if (self.share_work and content_hash not in self._results and content_hash in self._index and not self._done
                    and not self._settled >= paths  # the child is still reading: its preprocessing comes after
                    and self._claims.claim(self._index[content_hash], PREPROCESS, ENGINE)):
                self._coming.discard(content_hash)  # the engine preprocesses it itself (the child skips it)
                return None
            self._cond.wait_for(lambda: content_hash in self._results or self._done or content_hash in self._no_input
                                or (self._settled >= paths and content_hash not in self._coming))
            self._coming.discard(content_hash)  # handed out (or never coming): a second call need not wait
            prepared = self._results.pop(content_hash, None)
            self.inputs_made += prepared is not None
            return prepared

    def discard(self, content_hash: str) -> None:
        """The caller is done with the image of ``content_hash`` (the command, once a target is matched): its input,
        if it came and was not taken (its maps came from the disk cache), goes now, and so does one that comes later
        (for a file of the same content further on). A later :meth:`take` of it gets None at once, as for an input
        that will not come."""
        with self._cond:
            self._discarded.add(content_hash)
            self._results.pop(content_hash, None)
            self._no_input.add(content_hash)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the child (if still running) and drop what was not taken."""
        if self._later is not None:  # never given its images: it waits for none
            self._later.close()
            self._later = None
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=5)
        if self._proc.is_alive():  # (SIGTERM ignored or held up: never left running)
            log.warning("the prefetch process did not stop within 5 s; killing it")
            self._proc.kill()
            self._proc.join(timeout=5)
        self._receiver.join(timeout=5)
        self._conn.close()
        if self._handoff is not None:
            self._handoff.parent_end.close()
        with self._cond:
            self._results.clear()
            self._images.clear()
            self._logs.clear()
        _remove_scratch(self._scratch)  # what the child left there (it ended by a signal)
        self._arena = None  # its pages go when no array handed out views them any more


def start(paths: Sequence[str | ArrayFile], preprocess: dict | None, modality: str = "auto",
          spacing_mm: float | None = None, pad_multiple_zyx: Sequence[int] | None = None,
          body_stride_zyx: Sequence[int] | None = None) -> Prefetch | None:
    """Start prefetching ``paths`` in the order given (the source, then the targets; see the module docstring), or
    None when it cannot help (see :func:`available`) or the model's preprocessing is not known without loading it
    (``preprocess=None``). The caller reads an image, or makes an input, that the child has not started itself
    (``share_work``, :class:`_Claims`), and takes the later images in turn, as it matches them
    (:attr:`PrefetchRequest.in_turn`)."""
    if not paths:
        return None
    return _launch(_sources(paths), preprocess, modality, spacing_mm, pad_multiple_zyx, body_stride_zyx, False,
                   share_work=True, in_turn=True)


def start_waiting(preprocess: dict | None, modality: str = "auto", spacing_mm: float | None = None,
                  pad_multiple_zyx: Sequence[int] | None = None,
                  body_stride_zyx: Sequence[int] | None = None) -> Prefetch | None:
    """Start the prefetch process now, before torch is imported, and tell it its images later
    (:meth:`Prefetch.give`): for a process that learns its images after it must start loading torch (the Slicer
    module's engine process). None where it cannot help (see :func:`start`)."""
    return _launch((), preprocess, modality, spacing_mm, pad_multiple_zyx, body_stride_zyx, True)


def _launch(sources: tuple[str | ArrayFile, ...], preprocess: dict | None, modality: str, spacing_mm: float | None,
            pad_multiple_zyx: Sequence[int] | None, body_stride_zyx: Sequence[int] | None,
            waiting: bool, share_work: bool = False, in_turn: bool = False) -> Prefetch | None:
    """:func:`start` and :func:`start_waiting`: the :class:`Prefetch`, or None where it cannot help."""
    if preprocess is None or not available():
        return None
    pad = None if pad_multiple_zyx is None else tuple(int(m) for m in pad_multiple_zyx)
    stride = None if body_stride_zyx is None else tuple(int(m) for m in body_stride_zyx)
    try:
        return Prefetch(PrefetchRequest(sources, dict(preprocess), modality, spacing_mm, pad, stride, in_turn),
                        waiting=waiting, share_work=share_work)
    except OSError as exc:  # no process could be started: the engine reads the images itself
        log.debug("prefetch not started: %s", exc)
        return None
