"""The engine in a persistent child process: :class:`EngineProcess`, a ``samembed.Matcher`` seen through a pipe.

Slicer's Python runs without thread support while Qt idles, so a Python worker thread computing embeddings would
advance only in the gaps of the GUI's poll timer. Here the computation runs in a separate Python process
(``PythonSlicer`` inside Slicer, ``sys.executable`` elsewhere) that lives as long as the module: it keeps the model
and the embedding cache warm across clicks. :class:`EngineProcess` has the interface of ``samembed.Matcher`` that
``MatchLogic`` uses (``match``, ``clear_cache``, ``cache_bytes``), so the logic and its worker thread do not know
whether the engine is in this process or in the child; the worker thread only waits on the pipe.

Protocol (``multiprocessing.connection`` over a localhost socket with a random key; every message is a pickled
tuple ``(kind, requestID, payload)``):

* parent -> child: ``("image", key, (grid, name, spacing_known, npy_path, shared, plane_z_mm))`` once per volume
  content (``plane_z_mm``: a one-slice volume's z, ``Image.plane_z_mm``; the
  voxels go through a temporary ``.npy`` file, which the child removes once read: on POSIX the module copies each
  volume out of VTK straight into it, :meth:`EngineProcess.newVolumeFile`, and hashes it meanwhile; ``shared``: the
  parent maps the file too, so the child and its prefetch may map it instead of copying it, ``ArrayFile.shared``;
  the geometry is pickled as float64: exact); ``("forget", key, None)``;
  ``("match", id, {...})``; ``("match_each", id, {...})`` (a click's targets, or atlases fused into targets, several
  at once, ``samembed.jobs.match_each``; a ``FuseCall``'s atlases carry their volumes' keys as their images);
  ``("match_atlases", id, {...})``; ``("prepare", id, {...})``; ``("warm", id, None)`` (load the model now);
  ``("cancel", id, None)``; ``("release", 0, None)`` (the job that sent volumes ahead is over); ``("clear", id,
  None)``; ``("stats", id, None)`` (answered with ``{"cache_bytes", "input_voxels"}``); ``("stop", 0, None)``.
* child -> parent: ``("progress", id, (done, total, phase))``; ``("target", id, (index, event))`` (a ``match_each``
  target started, matched or skipped: ``samembed.jobs.TargetEvent``); ``("result", id, samembed.MatchResult)`` (for
  ``prepare``: its timings dict; for ``warm`` and ``match_each``: None); ``("cancelled", id, None)``; ``("error", id,
  exception)``; ``("ok", id, value)``; ``("lost", 0, key)`` (the volume's file could not be read, and the child
  does not hold it: the parent sends it again with the next request that needs it).

The child imports torch from its start, in a thread, beside the parent writing the first request's volumes; its
first request that needs the engine (``warm``, which the module sends when it is entered, or a match) waits for
that import and loads the model. Before the import starts, it forks a second process (``samembed.prefetch``, as ``samembed match`` does) that
reads and preprocesses the volumes of the first ``match``, ``match_each``, ``match_atlases`` or ``prepare`` request,
and those sent ahead of it (:meth:`EngineProcess.sendVolumes`: the module sends every volume of a click before its
``match_each`` request): on a click that starts the engine, while torch loads; on one after the module started it, all but the first
volume, while the child embeds the first. A volume's ``.npy`` file is read when a request first needs it. Later
volumes are preprocessed by the engine itself.

A cancel returns at once: the parent stops waiting and raises ``samembed.Cancelled``; the child stops at the
engine's next check and its late answer is dropped. If the child dies, the waiting call raises
:class:`EngineProcessError` (with the end of the child's log) and the next call starts a new child.

>>> engine = EngineProcess(model="random:sam-lite", device="cpu")          # doctest: +SKIP
>>> result = engine.match(sourceImage, [[0.0, 0.0, 0.0]], [targetImage])   # doctest: +SKIP
>>> engine.close()                                                          # doctest: +SKIP
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import queue
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path

import numpy as np

from samembed import Cancelled, Image, InputError, MatchOptions, MatchResult, TargetError
from samembed.blas_threads import blas_environment
from samembed.jobs import atlases_of, with_atlas_images
from samembed.options import ProgressFn
from samembed.prefetch import ArrayFile

log = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parents[1]
"""The folder holding ``SAMEmbeddingLib`` and ``samembed`` (put on the child's ``PYTHONPATH``)."""
POLL_S = 0.05
"""How often a waiting call checks for cancel and for a dead child, seconds."""
START_TIMEOUT_S = 120.0
"""How long the child may take to start and connect, seconds."""
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a connection to the engine's port may take to authenticate before it is dropped, seconds (the child's
takes milliseconds; another local program's must not hold the start)."""
SHORT_REQUEST_TIMEOUT_S = 0.5
"""How long ``clear_cache`` and ``cache_bytes`` wait for a child still finishing a cancelled match, seconds."""


def _volumeKey(image: Image, contentHash: str) -> str:
    """What the child knows a volume by: its content hash, and for a one-slice volume its slice's z too (the hash
    covers the voxels and the 2D grid, not where the slice lies: two such volumes of the same pixels at two z, or one
    moved in z, are two volumes whose matches lie at their own z). The child's image keeps the plain hash."""
    return contentHash if image.plane_z_mm is None else f"{contentHash}|z={image.plane_z_mm!r}"


def _contentHashOf(key: str) -> str:
    """The content hash in a volume's key (:func:`_volumeKey`)."""
    return key.split("|", 1)[0]


class EngineProcessError(RuntimeError):
    """The engine process could not start or stopped unexpectedly; the next call starts a new one."""


#: the free space shared memory (``/dev/shm``) must have, and the memory available, for the engine's volume files to
#: go there, bytes: four thin-slice CTs (a source and 3 targets, 0.27-0.35 GB each) with room to spare
SHARED_MEMORY_MIN_FREE = 2 << 30
#: the names of the engine's folders of volume files in shared memory: this, the owner's process ID, a random part
#: and "-"
VOLUMES_PREFIX = "SAMEmbedding-volumes-"
#: the file in each such folder that its engine holds locked (``flock``) while it lives
VOLUMES_LOCK = ".lock"
#: the names of the engines' temporary folders (their log, and their volume files where shared memory has no room),
#: in the system's temporary folder, locked as those in shared memory
TEMP_PREFIX = "SAMEmbedding-engine-"
#: the engine process maps a volume file that it reads itself (not prefetched: the first volume of a request when
#: the engine was started ahead, a volume of a later request) instead of reading it into memory, as the prefetch does,
#: when the parent maps that file too (a file of :meth:`EngineProcess.newVolumeFile`): its pages are in memory (the
#: page cache, or shared memory), held by the parent's mapping anyway, and a mapping stays valid once the file is
#: removed (POSIX; Windows cannot remove a mapped file). Reading a 0.35 GB thin-slice CT into fresh memory took
#: 0.78 s of the first click's request on the 2-core VM. A file the parent wrote when it sent the volume is read into
#: memory: mapped, it would keep its disk space after its removal for as long as the child keeps the volume
MAP_VOLUME_FILES = os.name == "posix"
#: threads that hash volumes ahead (:meth:`EngineProcess.hashAhead`; the hash releases the GIL): the module copies
#: volumes on two threads (``logic.COPY_THREADS``), and one hashing thread, 0.15-0.2 s per thin-slice CT with the
#: SHA-256 of before, then held the first request back by 0.3-0.4 s after the last copy on the 2-core VM (XXH3-128,
#: the hash since 2026-12-06, takes about a tenth of that)
HASH_THREADS = 2


def _sharedMemoryFolder(root: Path = Path("/dev/shm")) -> tuple[Path, int] | None:
    """A new folder for volume files in shared memory (Linux's ``/dev/shm``) and the descriptor of its lock file,
    held locked while the engine lives; or None where there is no shared memory, or not
    :data:`SHARED_MEMORY_MIN_FREE` bytes free in it (a container's is often 64 MB) or available in the machine (its
    pages cannot be reclaimed without swap). Files there hold memory until they are removed, so the folders left by
    engines that ended without removing theirs (a Slicer that crashed) are removed first
    (:func:`_removeStaleVolumeFolders`)."""
    if not sys.platform.startswith("linux") or not root.is_dir():
        return None
    _removeStaleVolumeFolders(root)
    try:
        stat = os.statvfs(root)
        if min(stat.f_bavail * stat.f_frsize, _availableMemory()) < SHARED_MEMORY_MIN_FREE:
            return None
        return _newLockedFolder(root, lambda part: f"{VOLUMES_PREFIX}{os.getpid()}-{part}-", ".SAMEmbedding-draft-")
    except OSError as e:
        log.info("SAMEmbedding: volume files go to the temporary folder, not to shared memory: %s", e)
        return None


def _releaseEngine(state: dict) -> None:
    """An :class:`EngineProcess`'s end, from its attribute dict ``state``: its child killed if still running, its
    temporary and volume folders removed, the descriptors of their lock files closed. Run once, by :meth:`close` (after
    it stopped the child) or when the engine is dropped or the interpreter exits without it."""
    proc = state.get("_proc")
    try:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
    except Exception:  # noqa: BLE001 - the interpreter's exit: the rest is still released
        pass
    for folder in ("_tmp", "_volumes"):
        if state.get(folder) is not None:
            shutil.rmtree(state[folder], ignore_errors=True)
    for name in ("_volumesLock", "_tmpLock"):
        fd = state.get(name)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
            state[name] = None


def _saveVolume(path: Path, image: Image) -> None:
    """Write ``image``'s voxels to the volume file ``path`` for the child; a file that cannot be written whole (a
    full disk) is removed, and the error names the volume and the folder."""
    try:
        np.save(path, np.ascontiguousarray(image.array))
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        # (room is not what is short when open files are: the advice to free space misled; a review)
        advice = ("this process is at its limit of open files (each volume kept holds one): raise it (ulimit -n) or "
                  "match fewer volumes at once" if e.errno in (errno.EMFILE, errno.ENFILE) else
                  "free space there, or give the engine a temporary folder with room (TMPDIR)")
        raise InputError(f"{image.name}: cannot write its voxels for the engine process to {path.parent} "
                         f"({e.strerror or e}); {advice}") from e


def _receiveTimeout(sock: socket.socket, seconds: float) -> None:
    """Set the kernel's receive timeout (``SO_RCVTIMEO``) of ``sock``: a blocking read of its descriptor fails after
    ``seconds`` (0: never)."""
    if os.name == "nt":  # a DWORD of milliseconds
        value = struct.pack("L", int(seconds * 1000))
    else:  # a struct timeval
        value = struct.pack("ll", int(seconds), int(round((seconds % 1) * 1e6)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)


def _temporaryFolder() -> tuple[Path, int | None]:
    """A new temporary folder for an engine (its log; its volume files where shared memory has no room) and, on
    POSIX, the descriptor of its lock file, held locked while the engine lives. The temporary folders of engines that
    ended without removing theirs (a Slicer that crashed, whose volume files may hold 0.35 GB each) are removed first,
    as the shared-memory ones are (:func:`_removeStaleVolumeFolders`)."""
    if os.name == "posix":
        root = Path(tempfile.gettempdir())
        _removeStaleVolumeFolders(root, f"{TEMP_PREFIX}*")
        with contextlib.suppress(OSError):
            return _newLockedFolder(root, lambda part: f"{TEMP_PREFIX}{part}", f".{TEMP_PREFIX}draft-")
    # no lock (Windows, or it could not be had): a plain folder, never swept by another engine (removed at close)
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX)), None


def _newLockedFolder(root: Path, name, hiddenPrefix: str) -> tuple[Path, int]:
    """A new folder in ``root`` named ``name(a random part)`` and the descriptor of its lock file, held locked: made
    under a hidden name (``hiddenPrefix``), locked, then renamed, so a folder under its final name is locked from the
    start and another engine's sweep (:func:`_removeStaleVolumeFolders`) never takes it. POSIX; raises ``OSError``,
    leaving nothing behind."""
    import fcntl  # POSIX only

    draft = Path(tempfile.mkdtemp(prefix=hiddenPrefix, dir=root))
    fd = None
    try:
        fd = os.open(draft / VOLUMES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        folder = root / name(draft.name.rsplit("-", 1)[-1])
        os.rename(draft, folder)
    except OSError:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(draft, ignore_errors=True)
        raise
    return folder, fd


def _removeStaleVolumeFolders(root: Path, pattern: str = f"{VOLUMES_PREFIX}*-") -> None:
    """Remove the engines' folders in ``root`` (named as ``pattern``: volume files in shared memory, or temporary
    folders) whose engine has ended: the ones whose lock file nobody holds (``flock`` sees the holders of every
    process namespace that shares the folder, and is not fooled by a reused process ID). A folder without a lock file,
    another user's, or anything unexpected is left alone."""
    import fcntl  # POSIX only

    try:
        folders = [f for f in root.glob(pattern) if f.is_dir() and not f.is_symlink()]
    except OSError:
        return
    for folder in folders:
        try:
            fd = os.open(folder / VOLUMES_LOCK, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its engine lives
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _availableMemory() -> int:
    """Bytes of memory the machine has available (``MemAvailable`` of ``/proc/meminfo``; 0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _removeUnlessSent(path: Path, sentFiles: set[Path]) -> None:
    """Remove the volume file ``path`` of an image that has gone, unless it was sent (in ``sentFiles``): the child
    removes those once read."""
    if path not in sentFiles:
        with contextlib.suppress(OSError):
            path.unlink()


def pythonExecutable() -> str:
    """The Python interpreter for the child: ``PythonSlicer`` inside Slicer, else ``sys.executable``.

    Inside Slicer ``sys.executable`` is the Slicer application itself; Slicer puts ``PythonSlicer`` on ``PATH``
    (``bin`` beside the application), as ``slicer.util`` expects when it runs Python scripts.
    """
    exe = sys.executable or ""
    if os.path.basename(exe).lower().startswith("python"):
        return exe
    found = shutil.which("PythonSlicer")
    if found:
        return found
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(os.path.dirname(exe), name)
        if os.path.isfile(candidate):
            return candidate
    raise EngineProcessError(f"cannot find PythonSlicer (next to {exe} or on PATH) to run the engine process; "
                             "reinstall Slicer, or match in this process (MatchLogic(..., engine='here'))")


class EngineProcess:
    """A ``samembed.Matcher`` in a persistent child process (started on first use, restarted after a crash).

    Args:
        model, device, cacheBytes, cacheDir: as for ``samembed.Matcher(model, device, cache_bytes, cache_dir)``
            (``cacheDir``: the on-disk embedding cache the child reads and writes, shared with ``samembed match
            --cache-dir`` and other processes; None: none).
        maxImages: volumes the child keeps (least recently used are forgotten; they are sent again when needed); a
            request with more volumes (a click into more targets) has them all kept until the next request.
        python: the interpreter to run the child with (default: :func:`pythonExecutable`).

    Thread-safe: calls are serialised; ``match`` may run on a worker thread while the main thread asks for
    ``cache_bytes``.
    """

    def __init__(self, model: str = "default", device: str = "auto", cacheBytes: int = 3 << 30, maxImages: int = 8,
                 python: str | None = None, cacheDir: str | None = None) -> None:
        self.model, self.device, self.cacheBytes = str(model), str(device), int(cacheBytes)
        self.cacheDir = None if cacheDir is None else str(cacheDir)
        self.maxImages = int(maxImages)
        self.python = python
        self.imagesSent = 0
        """Volumes sent to the child so far (each content once while the child keeps it)."""
        self.starts = 0
        """Children started so far."""
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._requestKeys: set[str] = set()  # the volumes of the request being sent (_request): none is forgotten
        self._sentFiles: set[Path] = set()  # the volume files sent to the child (it removes each once read)
        self._hasher: concurrent.futures.ThreadPoolExecutor | None = None  # the hashing threads (_hashPool)
        self._hashing: dict[Path, concurrent.futures.Future] = {}  # volume file -> its image's hash under way
        self._hashLock = threading.Lock()
        self._ids = itertools.count(1)
        self._tmp, self._tmpLock = _temporaryFolder()
        self._logPath = self._tmp / "engine.log"
        #: where :meth:`newVolumeFile` puts volume files: a folder in shared memory where there is room (with the
        #: descriptor of its lock file, held while this engine lives), else ``_tmp``
        shared = _sharedMemoryFolder()
        self._volumes, self._volumesLock = shared if shared is not None else (self._tmp, None)
        # what close() releases, released also when the engine is dropped without it, or at the interpreter's exit:
        # its child killed, its folders (volume files of 0.35 GB each for thin-slice CTs) removed, its locks closed.
        # The finalizer holds the instance's attribute dict, not the instance, so it reads the child of the moment
        self._release = weakref.finalize(self, _releaseEngine, self.__dict__)
        self._closed = False  # by close(): a start ahead that has not begun does not start a child any more
        self._startError: BaseException | None = None  # the start ahead's failure, for the next request
        self._starter: threading.Thread | None = None  # the start ahead's thread, the last one started
        self._cacheBytes = 0
        self._inputVoxels = 0
        self._firstRequestSent = False

    # -- the Matcher interface ---------------------------------------------------------------
    def match(self, source, points_lps_mm, targets, labels=None, options: MatchOptions | None = None, *, mask=None,
              progress: ProgressFn | None = None, cancel: threading.Event | None = None,
              target_names=None) -> MatchResult:
        """``samembed.Matcher.match`` in the child (``source``/``targets``: ``samembed.Image``; no ``mask``).

        Raises:
            samembed.Cancelled: ``cancel`` was set (returns within ``POLL_S``; the child stops on its own).
            EngineProcessError: the child died or could not start (the next call starts a new one).
            samembed.InputError and others: raised by the engine in the child, as they are.
        """
        if mask is not None:
            raise InputError("the engine process takes no mask; use options.box_lps_mm or match in this process")
        images = [source, *(targets if isinstance(targets, (list, tuple)) else [targets])]
        return self._request("match", images, lambda refs: {
            "source": refs[0], "points": np.asarray(points_lps_mm, dtype=np.float64), "targets": refs[1:],
            "labels": None if labels is None else list(labels), "options": options or MatchOptions(),
            "target_names": None if target_names is None else list(target_names)}, progress, cancel)

    def match_each(self, source, targets, calls, onTarget, *, jobs: int | None = None,
                   cancel: threading.Event | None = None, target_names=None) -> None:
        """``samembed.jobs.match_each`` in the child: ``source`` into every target with that target's calls
        (``samembed.jobs.MatchCall`` lists, or ``samembed.jobs.FuseCall``: atlases fused there, whose images are
        ``samembed.Image`` volumes; ``source`` None), one at a time until one is matched, then several at once (``jobs``;
        None: ``samembed.jobs.auto_jobs``, two on a CPU of two cores or more); ``onTarget(i, event)`` is called here,
        in this thread, as each target starts, is matched or is skipped (``samembed.jobs.TargetEvent``).

        A cancel returns at once, as for :meth:`match`: the child stops at its next tile, and a target it finishes
        after the cancel is not told (in this process, ``samembed.Matcher.match_each`` tells each target before the
        next starts: a cancel set in ``onTarget`` there starts no further target; here the child may have started one,
        which the cancel then stops).

        Raises:
            samembed.Cancelled: ``cancel`` was set (the targets told as matched before are the caller's).
            EngineProcessError, samembed.InputError and others: as for :meth:`match`. Whatever ``onTarget`` raises
            is raised too, after the child is told to stop the request.
        """
        calls = [list(c) for c in calls]
        targets = list(targets)
        head = [] if source is None else [source]
        atlasImages = {id(a.image): a.image for a in atlases_of(calls)}

        shared = len(head) + len(atlasImages)  # sent first: the child keeps them over the targets (maxImages)

        def payload(refs: list[tuple[str, str]]) -> dict:
            refOf = dict(zip(atlasImages, refs[len(head):shared]))  # the atlases' volumes by their references
            sent = with_atlas_images(calls, lambda a: refOf[id(a.image)])
            return {"source": refs[0] if head else None, "targets": refs[shared:], "calls": sent, "jobs": jobs,
                    "target_names": None if target_names is None else list(target_names)}

        return self._request("match_each", [*head, *atlasImages.values(), *targets], payload, None, cancel, onTarget)

    def match_atlases(self, atlases, targets, options: MatchOptions | None = None, *,
                      progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                      target_names=None) -> MatchResult:
        """``samembed.Matcher.match_atlases`` in the child (atlas and target images: ``samembed.Image``)."""
        atlases = list(atlases)
        targets = list(targets if isinstance(targets, (list, tuple)) else [targets])

        def payload(refs: list[tuple[str, str]]) -> dict:
            return {"atlases": [(ref, np.asarray(a.points_lps_mm, dtype=np.float64), tuple(a.labels), a.name)
                                for ref, a in zip(refs, atlases)],
                    "targets": refs[len(atlases):], "options": options or MatchOptions(),
                    "target_names": None if target_names is None else list(target_names)}

        return self._request("match_atlases", [*(a.image for a in atlases), *targets], payload, progress, cancel)

    def prepare(self, source, targets, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> dict:
        """``samembed.Matcher.prepare`` in the child: the first match of these volumes then starts at the search.

        Args:
            source, targets: ``samembed.Image`` volumes (as ``MatchLogic.imageForVolume`` makes).
            progress, cancel: as for :meth:`match`.

        Returns:
            what ``Matcher.prepare`` returns (seconds per step, targets without a trustworthy prior).
        """
        images = [source, *(targets if isinstance(targets, (list, tuple)) else [targets])]
        return self._request("prepare", images, lambda refs: {"source": refs[0], "targets": refs[1:]}, progress,
                             cancel)

    def sendVolumes(self, images: list, cancel: threading.Event | None = None) -> None:
        """Send these volumes (``samembed.Image``, the source first) to the child now, each once, before the requests
        that use them, when the child's prefetch can take them (its first match or prepare request is still to come,
        on a machine and model where it prefetches, see :func:`_startPrefetch`): it reads and preprocesses them in a
        second process (``samembed.prefetch``), a click's later targets included. At most ``maxImages`` of them, so
        that none pushes out another (the source above all); ``cancel`` is checked between them. Otherwise nothing is
        sent ahead: each request sends its own volumes."""
        if not all(isinstance(i, Image) for i in images):
            raise InputError("the engine process takes samembed.Image volumes (as MatchLogic.imageForVolume makes)")
        with self._lock:
            if self._alive() and self._firstRequestSent:
                return
            self._ensureStarted()
            if not _prefetches(self.model, self.device):
                return
            for image in images[:self.maxImages]:
                if cancel is not None and cancel.is_set():
                    return
                self._ensureImage(image)

    def releaseVolumesAhead(self) -> None:
        """The job that sent its volumes ahead (:meth:`sendVolumes`) is over: finished, or stopped between its targets
        (a cancel between two requests never reaches the child). The child's prefetch then lets go of what it read and
        preprocessed for targets that will not be asked for (up to the shared region's 1 GiB), as after a cancelled
        request. Nothing when no child runs."""
        with self._lock:
            if self._alive():
                self._send(("release", 0, None))

    def startAhead(self) -> None:
        """Start the child now, in a thread, unless it runs: its start and torch's import then go beside the
        caller's work (the module copying a click's volumes out of VTK: 1-2 s for four thin-slice CTs) instead of
        after it. Its failure is raised by the next request (which does not try again: a child that hangs at its
        start is waited for once); the request after that starts a child again. Nothing after :meth:`close`."""
        if self._alive():
            return

        def start() -> None:
            with self._lock:
                if self._closed:
                    return
                try:
                    self._ensureStarted()
                except Exception as e:  # noqa: BLE001 - raised by the next request (_ensureStarted)
                    log.info("SAMEmbedding: the engine process did not start ahead of its first request: %s", e)
                    self._startError = e

        self._starter = threading.Thread(target=start, name="SAMEmbedding-engine-start", daemon=True)
        self._starter.start()

    def warm_up(self, cancel: threading.Event | None = None) -> None:
        """Start the child now (it imports torch) and have it load its model, so that the first match waits for
        neither (the module calls it when it is entered, on its worker). Nothing happens when the child runs and
        has its model."""
        self._request("warm", [], lambda refs: None, None, cancel)

    def _request(self, kind: str, images: list, payload, progress: ProgressFn | None,
                 cancel: threading.Event | None, onTarget=None):
        """Send ``images`` (each once) and the request ``kind`` whose body is ``payload(volume references)``, one
        ``(key, name)`` per image, in order; wait for the answer (see :meth:`_await`).

        The child holds one volume per key (content and geometry), whichever node sent it first; the name of each
        reference is the one its messages give that volume in this request (a twin node's, a renamed node's)."""
        if not all(isinstance(i, Image) for i in images):
            raise InputError("the engine process takes samembed.Image volumes (as MatchLogic.imageForVolume makes)")
        with self._lock:
            self._ensureStarted()
            try:
                keys = []
                for image in images:
                    keys.append(self._ensureImage(image))
                    self._requestKeys.add(keys[-1])
                self._forgetBeyondMax(keep=set())  # what an earlier, larger request left beyond maxImages
            finally:
                self._requestKeys = set()
            requestID = next(self._ids)
            self._firstRequestSent |= kind in ("match", "match_each", "match_atlases", "prepare")
            self._send((kind, requestID, payload([(key, image.name) for key, image in zip(keys, images)])))
            return self._await(requestID, progress, cancel, onTarget)

    def clear_cache(self) -> None:
        """Forget the child's embeddings (nothing to do when no child runs)."""
        with self._lock:
            if self._alive():
                self._shortRequest("clear")
            self._cacheBytes = 0

    @property
    def cache_bytes(self) -> int:
        """Bytes of embeddings the child holds (the last known value while it is busy; 0 when none runs).

        Never blocks the caller (the GUI) behind a running match.
        """
        self._refreshStats()
        return self._cacheBytes

    @property
    def inputVoxels(self) -> int:
        """Input voxels the child's on-demand tiles have run through the local branch since it started, halos
        included (``samembed.embedding.TileComputer.process_input_voxels``): what its embeddings have cost; the last
        known value while it is busy, 0 when none runs."""
        self._refreshStats()
        return self._inputVoxels

    def _refreshStats(self) -> None:
        """Ask the child for its statistics, unless a running match holds it (never blocks the GUI)."""
        if not self._lock.acquire(timeout=0.1):
            return
        try:
            if self._alive():
                value = self._shortRequest("stats")
                if value is not None:
                    self._cacheBytes, self._inputVoxels = int(value["cache_bytes"]), int(value["input_voxels"])
            else:
                self._cacheBytes = self._inputVoxels = 0
        finally:
            self._lock.release()

    # -- life cycle --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Process ID of the running child, or None."""
        return self._proc.pid if self._alive() else None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (asks, then kills after ``timeout`` s) and remove the temporary files. The engine is done
        then: a later request or volume file raises ``samembed.Cancelled`` (the logic builds a new engine)."""
        self._closed = True  # first, without the lock: a start under way (which holds it) gives up (_acceptChild)
        with self._lock:
            self._stop(timeout)
        with self._hashLock:
            hasher, self._hasher = self._hasher, None
        if hasher is not None:
            hasher.shutdown(wait=True, cancel_futures=True)  # a hash under way reads a file about to go: it ends first
        self._release()  # the folders and locks (once: the finalizer is done after)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._conn is not None

    def _ensureStarted(self) -> None:
        if self._alive():
            return
        self._refuseIfClosed()
        if self._startError is not None:  # the start ahead failed: that is this request's error
            error, self._startError = self._startError, None
            raise error
        self._stop(0.0)
        self._tmp.mkdir(parents=True, exist_ok=True)
        authkey = secrets.token_bytes(32)
        server = socket.create_server(("127.0.0.1", 0))  # the child connects back here (_acceptChild)
        env = blas_environment(dict(os.environ))  # numpy's BLAS on one thread there (samembed.blas_threads)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), *filter(None, [env.get("PYTHONPATH")])])
        logFile = open(self._logPath, "ab")  # noqa: SIM115 - the child writes it; closed with the child
        python = self.python or pythonExecutable()
        started = time.monotonic()
        try:
            proc = subprocess.Popen([python, "-m", "SAMEmbeddingLib.engine_process"], stdin=subprocess.PIPE,
                                    stdout=logFile, stderr=subprocess.STDOUT, env=env, cwd=str(MODULE_DIR),
                                    creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console on Windows
        except OSError as e:
            server.close()
            logFile.close()
            raise EngineProcessError(f"cannot start the engine process with {python}: {e}") from e
        hello = {"address": list(server.getsockname()[:2]), "authkey": authkey.hex(), "model": self.model,
                 "device": self.device, "cache_bytes": self.cacheBytes, "cache_dir": self.cacheDir}
        try:
            try:
                proc.stdin.write((json.dumps(hello) + "\n").encode())
                proc.stdin.close()
            except OSError:  # it ended before reading its connection details: reported below, with its log
                pass
            conn = self._acceptChild(server, authkey, proc, started)
        except BaseException:  # nothing of a failed start stays: the child, the listening socket, the log file
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            logFile.close()
            raise
        finally:
            server.close()
        self._proc, self._conn, self._logFile = proc, conn, logFile
        self._sent.clear()
        self._firstRequestSent = False  # this child's prefetch waits for the volumes of its first such request
        self.starts += 1
        log.info("SAMEmbedding: engine process %d started with %s in %.1f s", proc.pid, python,
                 time.monotonic() - started)

    def _acceptChild(self, server: socket.socket, authkey: bytes, proc: subprocess.Popen, started: float) -> Connection:
        """The started child's connection to ``server``, authenticated both ways with ``authkey`` (as
        ``multiprocessing.connection.Listener`` does), waited for on this thread, ``POLL_S`` at a time, while the
        child lives and for at most ``START_TIMEOUT_S`` from ``started``. A connection that fails the handshake (not
        the child) is dropped and the wait goes on. No thread is left waiting when the child does not come."""
        server.settimeout(POLL_S)
        while True:
            self._refuseIfClosed()  # close() waits for this start: it ends now, not after START_TIMEOUT_S
            if proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                raise EngineProcessError(f"the engine process did not start (exit code {proc.poll()}); "
                                         f"its log says:\n{self._logTail()}")
            try:
                sock, _ = server.accept()
            except socket.timeout:  # (TimeoutError from Python 3.10 on)
                continue
            sock.setblocking(True)
            # a peer that connects and never answers (not the child) must not hold the start: the handshake's reads
            # time out (the kernel's receive timeout: Connection reads the descriptor itself), then the wait goes on
            _receiveTimeout(sock, HANDSHAKE_TIMEOUT_S)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, authkey)
                answer_challenge(conn, authkey)
            except (AuthenticationError, OSError, EOFError) as e:
                log.warning("SAMEmbedding: a connection that is not the engine process's was refused: %s", e)
                conn.close()
                continue
            with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as same:  # (a duplicate of the
                _receiveTimeout(same, 0.0)  # same socket) no timeout from now on
            return conn

    def _stop(self, timeout: float) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._sent.clear()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(("stop", 0, None))
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if conn is not None:
            conn.close()
        if getattr(self, "_logFile", None) is not None:
            self._logFile.close()
            self._logFile = None
        for left in self._sentFiles:  # volumes the child never read: all are sent again to the next child (the
            with contextlib.suppress(OSError):  # files of volumes not sent yet stay: their images are mapped from them)
                left.unlink()
        self._sentFiles.clear()

    # -- requests ----------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (OSError, EOFError, AttributeError) as e:
            self._died(e)

    def newVolumeFile(self) -> Path | None:
        """A new ``.npy`` path in this engine's folder for a volume's voxels
        (``mrml_io.image_from_volume_node(..., voxels_file=)``): an image whose voxels are a read-only mapping of
        such a file is sent as that file, not written again (:meth:`_ensureImage`); give the image to
        :meth:`hashAhead`, which also removes the file when the image goes without having been sent. None where a
        mapped file cannot be removed (Windows): the voxels stay in memory there, and are written when sent.

        The folder is in shared memory (``/dev/shm``) where it has room for a click's thin-slice CTs
        (:data:`SHARED_MEMORY_MIN_FREE`): the files need no disk, and copying a 0.35 GB CT into one took 0.31-0.35 s
        on the 2-core VM against 0.45-0.8 s into a file on its disk, whose pages the kernel then writes back. Else the
        system's temporary folder. A volume written when sent (not mapped) always goes to the temporary folder."""
        if os.name != "posix":
            return None
        self._refuseIfClosed()
        self._volumes.mkdir(parents=True, exist_ok=True)
        return self._volumes / f"volume-{next(self._ids)}.npy"

    def _refuseIfClosed(self) -> None:
        """A closed engine (:meth:`close`: the module left, another model chosen) starts no child and makes no volume
        file again: a job still running on it when it closed stops, as if cancelled. The logic builds a new engine
        for the next request. Before, such a job started a child nobody closed, and made the shared-memory folder
        again without its lock file, so no later engine removed it."""
        if self._closed:
            raise Cancelled("the engine was closed (the module was left, or another model was chosen)")

    def hashAhead(self, image: Image) -> None:
        """Start hashing ``image`` (its content hash, the child's key for it) in a thread of this engine's
        (:data:`HASH_THREADS`), for an image mapped from a file of :meth:`newVolumeFile`: the module copies the next
        volumes out of VTK meanwhile (``MatchLogic.imagesForVolumes``; both release the GIL), and sending it waits
        only for what is left (0.15-0.2 s of a 0.35 GB thin-slice CT). Safe to call from any thread. The file is
        removed when the image goes (the logic's cache dropped it: the volume changed or was removed) unless it was
        sent (the child removes it once read). Nothing for any other image (it is hashed when sent)."""
        path = self._fileOf(image)
        if path is None:
            return
        weakref.finalize(image, _removeUnlessSent, path, self._sentFiles)
        if image.hashed:
            return
        with self._hashLock:
            future = self._hashPool().submit(image.content_hash)
            self._hashing[path] = future
        # a finished hash is memoised in the image: forget the future (it would keep the image, and its voxels)
        future.add_done_callback(lambda f, path=path: self._forgetHash(path, f))

    def _hashPool(self) -> concurrent.futures.ThreadPoolExecutor:
        """This engine's hashing threads (:data:`HASH_THREADS`, made on first use, ended by :meth:`close`); call with
        ``_hashLock`` held."""
        if self._hasher is None:
            self._hasher = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="SAMEmbedding-hash")
        return self._hasher

    def _forgetHash(self, path: Path, future: concurrent.futures.Future) -> None:
        with self._hashLock:
            if self._hashing.get(path) is future:
                del self._hashing[path]

    def _contentHash(self, image: Image, path: Path) -> str:
        """``image``'s content hash, waiting for :meth:`hashAhead`'s if it is under way (its error, if any, raised)."""
        with self._hashLock:
            future = self._hashing.get(path)
        if future is not None:
            with contextlib.suppress(concurrent.futures.CancelledError):  # (by close(), before it ran)
                return future.result()
        return image.content_hash()

    def _fileOf(self, image: Image) -> Path | None:
        """The ``.npy`` file of :meth:`newVolumeFile` that ``image``'s voxels are mapped from, while it is there
        (the child removes each file it has read; the mapping stays valid)."""
        array = image.array
        name = getattr(array, "filename", None)
        if not isinstance(array, np.memmap) or name is None or array.shape != tuple(image.grid.shape_zyx):
            return None
        path = Path(name)
        return path if path.parent == self._volumes and array.flags.c_contiguous and path.is_file() else None

    def _ensureImage(self, image: Image) -> str:
        """Send ``image`` unless the child holds its content (keyed by the engine's content hash).

        A volume not hashed yet is written to its ``.npy`` file while it is hashed (both release the GIL: on a
        0.35 GB thin-slice CT, 0.2 s each, one after the other before); the file goes if the child holds the content
        (a second node with the same voxels: its write is the price of the overlap for the first). A volume whose
        voxels are mapped from a file of :meth:`newVolumeFile` is sent as that file, after its hash alone.
        """
        mapped = self._fileOf(image)
        if mapped is not None:
            key = _volumeKey(image, self._contentHash(image, mapped))  # the file's pages, just written: no new copy
            if key in self._sent:
                if mapped not in self._sentFiles:  # another node's copy of content the child holds: not needed
                    with contextlib.suppress(OSError):
                        mapped.unlink()
                self._sent.move_to_end(key)
                return key
            if mapped not in self._sentFiles:
                return self._sendImage(image, key, mapped, shared=True)
            # sent before and forgotten since: the child removes that file when it reads its "forget", which may
            # still be on its way, so the voxels go in a new file (below)
        path = self._tmp / f"volume-{next(self._ids)}.npy"
        if image.hashed:
            key = _volumeKey(image, image.content_hash())
            if key in self._sent:
                self._sent.move_to_end(key)
                return key
            _saveVolume(path, image)  # the child loads and deletes it
        else:
            with self._hashLock:
                hashed = self._hashPool().submit(image.content_hash)
            try:
                _saveVolume(path, image)
            finally:
                try:
                    key = _volumeKey(image, hashed.result())  # the hash's own error, if any, before the file's
                except BaseException:
                    with contextlib.suppress(OSError):
                        path.unlink()
                    raise
            if key in self._sent:  # the same voxels and geometry as a volume the child holds (another node)
                with contextlib.suppress(OSError):  # one still held (Windows): removed with the folder on close
                    path.unlink()
                self._sent.move_to_end(key)
                return key
        return self._sendImage(image, key, path)

    def _sendImage(self, image: Image, key: str, path: Path, shared: bool = False) -> str:
        """Tell the child about ``image`` (content hash ``key``), whose voxels are in ``path`` (the child reads the
        file, then removes it; ``shared``: ``image`` is mapped from it), and forget the least recently sent volume
        beyond ``maxImages``."""
        # the files the child has read and removed are not needed any more (one path stayed per volume sent)
        self._sentFiles.difference_update({p for p in list(self._sentFiles) if not p.exists()})
        self._sentFiles.add(path)
        self._send(("image", key, (image.grid, image.name, image.pixel_spacing_known, str(path), shared,
                                   image.plane_z_mm)))
        self.imagesSent += 1
        self._sent[key] = None
        self._forgetBeyondMax(keep={key})
        return key

    def _forgetBeyondMax(self, keep: set[str]) -> None:
        """Tell the child to forget the least recently used volumes beyond ``maxImages``, but never one of ``keep`` or
        of the request being sent: a click into more targets than that sends them all in one request (the child
        holds them until the next request's volumes are sent)."""
        while len(self._sent) > self.maxImages:
            old = next((k for k in self._sent if k not in keep and k not in self._requestKeys), None)
            if old is None:
                return
            del self._sent[old]
            self._send(("forget", old, None))

    def _receive(self, timeout: float):
        """The next message, or None after ``timeout`` s; raises :class:`EngineProcessError` when the child died."""
        try:
            if not self._conn.poll(timeout):
                if self._proc.poll() is not None:
                    self._died(None)
                return None
            message = self._conn.recv()
        except (OSError, EOFError) as e:
            self._died(e)
        if message[0] == "lost":  # the child could not read that volume's file and dropped it: sent again when needed
            self._sent.pop(message[2], None)
            return None
        return message

    def _await(self, requestID: int, progress: ProgressFn | None, cancel: threading.Event | None, onTarget=None):
        while True:
            if cancel is not None and cancel.is_set():
                self._send(("cancel", requestID, None))
                raise Cancelled("cancelled; the engine process stops at its next check")
            message = self._receive(POLL_S)
            if message is None:
                continue
            kind, answerTo, payload = message
            if answerTo != requestID:
                continue  # the late answer of a cancelled or timed-out request
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "target" and onTarget is not None:
                try:
                    onTarget(*payload)
                except BaseException:  # the caller stops here: so does the child, at its next check
                    with contextlib.suppress(EngineProcessError):  # (a child gone meanwhile: the caller's error)
                        self._send(("cancel", requestID, None))
                    raise
            elif kind == "result":
                return payload
            elif kind == "cancelled":
                raise Cancelled("cancelled")
            elif kind == "error":
                raise payload
            else:
                raise EngineProcessError(f"unexpected answer {kind!r} from the engine process")

    def _shortRequest(self, kind: str):
        """Ask the child something quick; None when it is busy for longer than ``SHORT_REQUEST_TIMEOUT_S``."""
        requestID = next(self._ids)
        self._send((kind, requestID, None))
        end = time.monotonic() + SHORT_REQUEST_TIMEOUT_S
        while time.monotonic() < end:
            message = self._receive(POLL_S)
            if message is not None and message[1] == requestID:
                if message[0] == "error":
                    raise message[2]
                return message[2]
        return None

    def _died(self, cause: BaseException | None):
        code = self._proc.poll() if self._proc is not None else None
        self._stop(0.0)
        raise EngineProcessError(
            f"the SAMEmbedding engine process stopped unexpectedly (exit code {code}); it is started again on the "
            f"next match. The end of its log ({self._logPath}):\n{self._logTail()}") from cause

    def _logTail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self._logPath.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# ----------------------------------------------------------------------------------------------
# the child
# ----------------------------------------------------------------------------------------------
def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception must reach the parent
        return RuntimeError(f"{type(error).__name__}: {error}")


#: requests after which the idle engine hands its free memory back to the OS: those that embed, load or drop maps (not
#: the volumes sent ahead of a match, nor the questions about the cache)
_FREES_MEMORY = frozenset({"warm", "clear", "prepare", "match", "match_each", "match_atlases"})


def readVolumeFile(source: ArrayFile) -> Image:
    """The image of a volume file that the engine process reads itself (not from the prefetch): mapped from the file
    when the parent maps it too (``source.shared``) and :data:`MAP_VOLUME_FILES` (the caller may then remove the
    file), else read into memory."""
    return source.read(mapped=source.shared and MAP_VOLUME_FILES)


def serve(conn, model: str, device: str, cacheBytes: int, cacheDir: str | None = None) -> None:
    """Answer requests on ``conn`` until told to stop or the parent goes away (runs in the child)."""
    from samembed import Atlas, Grid  # noqa: F401 - Grid: unpickling the geometry (torch loads with the Matcher)
    from samembed.allocator import release_free_memory

    # forked before torch is imported and before the reader thread starts; it waits for the first request's volumes
    try:
        prefetch = _startPrefetch(model, device)
    except Exception:  # noqa: BLE001 - without a prefetch the engine preprocesses its volumes itself
        log.exception("no prefetch process")
        prefetch = None
    requests: queue.Queue = queue.Queue()
    sendLock = threading.Lock()

    def send(message) -> None:  # one message at a time: a match_each's targets are read and told on their threads
        with sendLock:
            conn.send(message)

    cancelled: set[int] = set()
    current = {"id": None, "event": threading.Event()}
    lock = threading.Lock()

    def read() -> None:  # a thread: cancel must arrive while a match runs
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone
            kind, requestID, _ = message
            if kind == "cancel":
                with lock:
                    cancelled.add(requestID)
                    if current["id"] == requestID:
                        current["event"].set()
            else:
                requests.put(message)
            if kind == "stop":
                return

    threading.Thread(target=read, daemon=True).start()
    # torch loads from now on, beside the parent still writing the first request's volumes (0.2-0.6 s each for a
    # thin-slice CT) and the prefetch reading them; the first request that needs the engine waits for it
    importFailed: list[BaseException] = []
    importer = threading.Thread(target=_importEngine, args=(importFailed,), name="SAMEmbedding-torch-import",
                                daemon=True)
    importer.start()
    matcher = None
    images: dict[str, Image] = {}
    unread: dict[str, ArrayFile] = {}  # volumes received and not read yet: their voxels are still in their files
    prefetchGiven = False
    given: set[str] = set()  # the files of the volumes given to the prefetch

    def loaded():  # the engine (a samembed.Matcher), with torch (loading since the start) and the model loaded
        nonlocal matcher
        if matcher is None:
            importer.join()
            if importFailed:  # the thread's own error (importing again would give a misleading one)
                raise RuntimeError(f"the engine could not be imported: {importFailed[0]}") from importFailed[0]
            from samembed import Matcher  # loaded by the thread

            matcher = Matcher(model=model, device=device, cache_bytes=cacheBytes, cache_dir=cacheDir)
            matcher.embedder.prefetch = prefetch
        return matcher

    # a match_each request's targets are read in the threads that match them: one lock per volume, so that one
    # target's reading does not hold up another's
    readLocks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
    readLocksLock = threading.Lock()

    def image(reference: tuple[str, str]) -> Image:  # a request's volume (key, name), read from its file when
        key, name = reference  # first needed (or as the prefetch read it), under the name the request gives it
        with readLocksLock:
            lock = readLocks[key]
        with lock:
            return _readImage(key).renamed(name)

    def _readImage(key: str) -> Image:
        if key not in images:
            source = unread.get(key)
            if source is None:  # (the parent sends a volume again once told it is lost: not expected)
                raise RuntimeError(f"the engine process does not hold volume {key[:12]}; match again to send it")
            try:
                read = None if prefetch is None else prefetch.image(source.path)
                if read is None:
                    read = readVolumeFile(source)
                    log.info("%s: %s", source.name, "mapped from its volume file" if isinstance(read.array, np.memmap)
                             else "read from its volume file into memory")
                images[key] = read
            except InputError:  # (already names the volume)
                raise
            except (OSError, ValueError) as e:  # a file cut short, removed, unreadable: named
                raise InputError(f"{source.name}: the engine process could not read this volume's file "
                                 f"({e}); it is sent again with the next match") from e
            finally:  # read or not (a broken file is reported), the file goes: the parent sends it again if need be
                del unread[key]
                with contextlib.suppress(OSError):
                    os.remove(source.path)
                if key not in images:  # the parent forgets it sent it (not held here: a later request sends it anew)
                    send(("lost", 0, key))
        return images[key]

    def releasePrefetch(force: bool = False) -> None:
        # once every volume given to it was read by a request (or, ``force``, when a request failed or was
        # cancelled: the volumes it holds may never be asked for), the engine does the rest itself
        nonlocal prefetch
        if prefetch is None or not prefetchGiven or (given & {v.path for v in unread.values()} and not force):
            return
        log.info("%d volumes read and %d preprocessed ahead by the prefetch process",
                 prefetch.images_read, prefetch.inputs_made)
        try:
            prefetch.close()
        except Exception:  # noqa: BLE001 - a prefetch that cannot be closed is dropped all the same
            log.exception("closing the prefetch process")
        prefetch = None
        if matcher is not None:
            matcher.embedder.prefetch = None

    while True:
        kind, requestID, payload = requests.get()
        if kind == "stop":
            if prefetch is not None:
                prefetch.close()
            importer.join()  # never end the interpreter in the middle of torch's import (its C++ start-up)
            return
        try:
            if kind == "image":
                grid, name, spacingKnown, path, shared, planeZ = payload
                # the key: its hash
                unread[requestID] = ArrayFile(path, grid, name, spacingKnown, content_hash=_contentHashOf(requestID),
                                              shared=shared, plane_z_mm=planeZ)
                continue
            if kind == "release":  # the job that sent volumes ahead is over: what the prefetch holds for it goes
                releasePrefetch(force=True)
                continue
            if kind == "forget":
                images.pop(requestID, None)
                with readLocksLock:  # (one lock per volume ever sent stayed: a leak review)
                    readLocks.pop(requestID, None)
                if requestID in unread:
                    os.remove(unread.pop(requestID).path)
                continue
            if kind == "clear":
                if matcher is not None:
                    matcher.clear_cache()
                send(("ok", requestID, None))
                continue
            if kind == "stats":
                stats = {"cache_bytes": 0, "input_voxels": 0}
                if matcher is not None:  # (else torch may not be loaded yet: nothing to import it for)
                    from samembed.embedding import TileComputer

                    stats = {"cache_bytes": matcher.cache_bytes, "input_voxels": TileComputer.process_input_voxels}
                send(("ok", requestID, stats))
                continue
            if kind == "warm":  # import torch and load the model now (the module asks when it is entered)
                loaded()
                send(("result", requestID, None))
                continue
            if kind not in ("match", "match_each", "match_atlases", "prepare"):
                raise RuntimeError(f"unknown request {kind!r}")  # builtin: __main__ classes do not unpickle
            with lock:
                if requestID in cancelled:
                    send(("cancelled", requestID, None))
                    continue
                # (the cancels of earlier requests, which came late or were answered, are not needed again)
                cancelled.difference_update({i for i in cancelled if i <= requestID})
                current["id"], current["event"] = requestID, threading.Event()
                cancel = current["event"]
            if prefetch is not None and not prefetchGiven:  # the first request's volumes, then any other sent
                # ahead (sendVolumes): preprocessed in the process started with this one while this one imports
                # torch; when the module started the engine ahead (torch loaded), all but the first, which this
                # process preprocesses itself (on every core) while the other preprocesses the next
                ordered = list(dict.fromkeys(key for key, _ in _imageReferences(kind, payload)))  # a volume twice (source = target): once
                keys = [k for k in ordered if k in unread] + [k for k in unread if k not in ordered]
                # each with its hash (the parent's key): the engine does not wait for one that was not given
                volumes = [unread[k] for k in keys if matcher is None or k != ordered[0]]
                given = {v.path for v in volumes}
                prefetch.give(volumes)
                prefetchGiven = True
            loaded()

            def progress(done, total, phase, requestID=requestID):
                send(("progress", requestID, (done, total, phase)))

            if kind == "prepare":
                result = matcher.prepare(image(payload["source"]), [image(k) for k in payload["targets"]],
                                         progress=progress, cancel=cancel)
            elif kind == "match_each":  # a click's targets, several at once, each told as it starts and ends
                n = len(payload["targets"])

                def told(i: int, event, requestID=requestID, n=n) -> None:
                    if isinstance(event, TargetError):  # its own problem: one line, the job goes on
                        log.info("request match_each: target %d of %d skipped: %s", i + 1, n, event)
                    send(("target", requestID, (i, _picklable(event) if isinstance(event, BaseException)
                                                     else event)))

                calls = with_atlas_images(payload["calls"], lambda a: image(a.image))  # the volumes of their keys
                matcher.match_each(None if payload["source"] is None else image(payload["source"]),
                                   [functools.partial(image, k) for k in payload["targets"]], calls, told,
                                   jobs=payload["jobs"], cancel=cancel, target_names=payload["target_names"])
                result = None
            elif kind == "match_atlases":
                atlases = [Atlas(image(ref), points, labels, name) for ref, points, labels, name in payload["atlases"]]
                result = matcher.match_atlases(atlases, [image(k) for k in payload["targets"]], payload["options"],
                                               progress=progress, cancel=cancel, target_names=payload["target_names"])
            else:
                result = matcher.match(image(payload["source"]), payload["points"],
                                       [image(k) for k in payload["targets"]], payload["labels"],
                                       options=payload["options"], progress=progress, cancel=cancel,
                                       target_names=payload["target_names"])
            releasePrefetch()  # before the answer: its log line is written when the caller gets the result
            send(("result", requestID, result))  # samembed.result: torch-free to unpickle
        except Cancelled:
            releasePrefetch(force=True)
            send(("cancelled", requestID, None))
        except TargetError as e:  # one target's own problem: the job skips it and goes on to the targets read ahead
            log.info("request %s: %s", kind, e)
            send(("error", requestID, _picklable(e)))
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller
            log.exception("request %s failed", kind)
            releasePrefetch(force=True)
            send(("error", requestID, _picklable(e)))
        finally:
            with lock:
                current["id"] = None
            releasePrefetch()
            if kind in _FREES_MEMORY and requests.empty():  # idle: what it freed goes back to the OS (samembed.allocator)
                release_free_memory()


def _importEngine(failed: list[BaseException]) -> None:
    """Import the engine with torch (a thread of :func:`serve`, from the child's start): no collection while torch
    loads, and no meta kernels (``samembed.torch_import``). A failure is logged and put in ``failed``: every request
    that needs the engine reports it to the caller."""
    from samembed.torch_import import after_torch_import, before_torch_import, meta_kernels_skipped

    started = time.monotonic()
    before_torch_import()
    try:
        from samembed import Matcher  # noqa: F401 - torch
    except Exception as e:  # noqa: BLE001 - reported by the requests that need it
        log.exception("importing the engine failed")
        failed.append(e)
        return
    finally:  # loaded or not, the collector runs again; what was tracked so far, it no longer scans (not the
        frozen = after_torch_import()  # engine's objects, made next: their cycles must still be freed)
    log.info("torch loaded in %.1f s%s; the objects tracked so far (about %d made by the import) left out of the "
             "garbage collector's scans",
             time.monotonic() - started, " without its Python meta kernels" if meta_kernels_skipped() else "", frozen)


def _imageReferences(kind: str, payload: dict) -> list[tuple[str, str]]:
    """The volumes, ``(key, name)``, of a ``match``, ``match_each``, ``match_atlases`` or ``prepare`` request, in the
    order the engine embeds them."""
    if kind == "match_atlases":
        return [key for key, *_ in payload["atlases"]] + list(payload["targets"])
    if kind == "match_each":  # the source or the atlases, then the targets
        atlases = [a.image for a in atlases_of(payload["calls"])]
        return [*([] if payload["source"] is None else [payload["source"]]), *atlases, *payload["targets"]]
    return [payload["source"], *payload["targets"]]


def _prefetches(model: str, device: str) -> bool:
    """Whether an engine process for ``model`` on ``device`` starts a prefetch (:func:`_startPrefetch`); torch-free,
    so the parent can ask before it sends volumes ahead."""
    from samembed.prefetch import can_fork_ahead
    from samembed.registry import registered_preprocess

    try:
        return can_fork_ahead() and device != "cuda" and registered_preprocess(model) is not None
    except Exception:  # noqa: BLE001 - a registry that cannot be read: no prefetch, and the engine reports the model
        return False


def _startPrefetch(model: str, device: str):
    """A second process, started before this one imports torch, that will read and preprocess the volumes of the
    first match or prepare request (``samembed.prefetch.start_waiting``, as ``samembed match`` prefetches its
    images), or None where that cannot help (torch already imported, one core, not Linux, CUDA, or a model whose
    preprocessing is not known before it is loaded)."""
    from samembed import prefetch
    from samembed.registry import registered_local_stride_zyx, registered_pad_multiple_zyx, registered_preprocess

    if not _prefetches(model, device):
        return None
    return prefetch.start_waiting(registered_preprocess(model), "auto", None, registered_pad_multiple_zyx(model),
                                  registered_local_stride_zyx(model))


def main() -> None:
    """Entry point of the child: read the connection details from stdin, connect, serve."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from samembed.allocator import keep_freed_memory

    # the engine's own process: freed memory is kept for the next tile, and returned when a request ends with no other
    # waiting (serve; samembed.allocator); the garbage collector pauses while torch loads, then leaves what was
    # tracked until then out of its scans (serve's loaded; samembed.collector)
    keep_freed_memory()
    hello = json.loads(sys.stdin.readline())
    conn = Client(tuple(hello["address"]), authkey=bytes.fromhex(hello["authkey"]))
    log.info("engine process %d serving model %s on %s", os.getpid(), hello["model"], hello["device"])
    serve(conn, hello["model"], hello["device"], int(hello["cache_bytes"]), hello.get("cache_dir"))


if __name__ == "__main__":
    main()
