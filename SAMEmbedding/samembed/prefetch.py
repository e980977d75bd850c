"""Reading and preprocessing the first images in a second process while the network library loads.

A fresh ``samembed match`` spends its first 1.3-2 s importing torch, on one core, before it can read a voxel. On a
machine with a second core, :func:`start` forks a child first (before torch is imported) that reads the source and
the first target and preprocesses them exactly as the engine would (:func:`samembed.preprocess.preprocess`, the same
code), and sends each result back through a pipe. The engine takes a prefetched input only for an image with the
same content hash, the same preprocessing settings and the same modality (:meth:`Prefetch.take`); anything else,
including an image the child could not read, is preprocessed by the engine as usual (and its error reported there).

Used by the ``samembed match`` command only (Linux, ``fork``): a library call or the Slicer module reads its images
itself. This module imports no torch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: images prefetched at most: the source and the first target (a long target list is read as the matching goes, so
#: that memory holds one pair's inputs, not every target's)
MAX_IMAGES = 2


@dataclass(frozen=True)
class PrefetchRequest:
    """What the child does: read ``paths`` and preprocess them with ``preprocess`` (a
    :class:`~samembed.preprocess.PreprocessConfig` as a dict) for ``modality``, padding CT to multiples of
    ``pad_multiple_zyx`` (the network's, as the engine pads); ``spacing_mm`` as ``as_image``'s."""

    paths: tuple[str, ...]
    preprocess: dict
    modality: str = "auto"
    spacing_mm: float | None = None
    pad_multiple_zyx: tuple[int, ...] | None = None


def available() -> bool:
    """Prefetching can help here: Linux with ``fork``, more than one core, and torch not imported yet."""
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and (os.cpu_count() or 1) > 1 and "torch" not in sys.modules)


def _child(request: PrefetchRequest, conn) -> None:
    import SimpleITK as sitk

    from .io import read_image
    from .preprocess import PreprocessConfig, preprocess

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core here, the other for the import

    config = PreprocessConfig.from_dict(request.preprocess)
    images = []
    for path in request.paths:  # every image first: the command reads them all before it embeds one
        try:
            image = read_image(path, spacing_mm=request.spacing_mm)
        except Exception:  # noqa: BLE001 - the command reads it again and reports the error itself
            conn.send(("failed", path, None))
            continue
        conn.send(("image", path, image))
        images.append(image)
    for image in images:
        try:
            prep = preprocess(image, config, request.modality, request.pad_multiple_zyx)
            conn.send(("input", image.content_hash(), prep))
        except Exception:  # noqa: BLE001 - the engine preprocesses it again and reports the error itself
            log.debug("prefetch: %s not preprocessed", image.name)
    conn.close()


class Prefetch:
    """A running prefetch (see the module docstring); :meth:`take` hands out its results."""

    def __init__(self, request: PrefetchRequest) -> None:
        ctx = multiprocessing.get_context("fork")
        self.request = request
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(request, child_conn), daemon=True, name="samembed-prefetch")
        self._proc.start()
        child_conn.close()
        self._results: dict[str, object] = {}
        self._images: dict[str, object] = {}
        self._settled: set[str] = set()  # paths whose image arrived or failed
        self._done = False
        self._cond = threading.Condition()
        # a thread empties the pipe as results come, so the child never waits for the main thread (busy importing)
        self._receiver = threading.Thread(target=self._receive, daemon=True, name="samembed-prefetch-receiver")
        self._receiver.start()

    def _receive(self) -> None:
        while True:
            try:
                kind, key, value = self._conn.recv()
            except (EOFError, OSError):  # the child finished (or died: the engine reads the rest itself)
                break
            with self._cond:
                if kind == "image":
                    self._images[key] = value
                elif kind == "input":
                    self._results[key] = value
                if kind in ("image", "failed"):
                    self._settled.add(key)
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def image(self, path: str):
        """The :class:`~samembed.image.Image` the child read from ``path`` (handed out once), or None when it did not
        (not prefetched, or it failed: the caller reads the file and reports the error)."""
        path = str(path)
        if path not in self.request.paths:
            return None
        with self._cond:
            self._cond.wait_for(lambda: path in self._settled or self._done)
            return self._images.pop(path, None)

    def take(self, content_hash: str, config, modality: str, pad_multiple_zyx: tuple[int, ...] | None = None):
        """The prefetched :class:`~samembed.preprocess.Prepared` input of the image with ``content_hash``, when it
        was made with the :class:`~samembed.preprocess.PreprocessConfig` ``config``, ``modality`` and CT padding
        multiple ``pad_multiple_zyx`` (else None). Waits for the child while it may still deliver it; each result is
        handed out once."""
        from .preprocess import PreprocessConfig

        req = self.request
        same_pad = (None if req.pad_multiple_zyx is None else tuple(req.pad_multiple_zyx)) == (
            None if pad_multiple_zyx is None else tuple(pad_multiple_zyx))
        if PreprocessConfig.from_dict(req.preprocess) != config or modality != req.modality or not same_pad:
            return None
        with self._cond:
            self._cond.wait_for(lambda: content_hash in self._results or self._done)
            return self._results.pop(content_hash, None)

    def close(self) -> None:
        """Stop the child (if still running) and drop what was not taken."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=5)
        self._receiver.join(timeout=5)
        self._conn.close()
        with self._cond:
            self._results.clear()


def start(paths: Sequence[str], preprocess: dict | None, modality: str = "auto",
          spacing_mm: float | None = None, pad_multiple_zyx: Sequence[int] | None = None) -> Prefetch | None:
    """Start prefetching the first :data:`MAX_IMAGES` of ``paths`` (None when it cannot help: see :func:`available`,
    or the model's preprocessing is not known without loading it, ``preprocess=None``)."""
    if preprocess is None or not paths or not available():
        return None
    pad = None if pad_multiple_zyx is None else tuple(int(m) for m in pad_multiple_zyx)
    try:
        return Prefetch(PrefetchRequest(tuple(str(p) for p in paths[:MAX_IMAGES]), dict(preprocess), modality,
                                        spacing_mm, pad))
    except OSError as exc:  # no process could be started: the engine reads the images itself
        log.debug("prefetch not started: %s", exc)
        return None
