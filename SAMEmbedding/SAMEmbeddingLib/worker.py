"""One persistent worker thread for engine calls, and a queue of callbacks for the main thread.

Embedding a volume takes seconds on a CPU, so the GUI hands engine work to :class:`Worker`. Jobs run one
after the other, in submission order, on a single thread that lives as long as the worker (PyTorch keeps
its thread pools and the embedding cache warm). A job never touches MRML: whatever it reports (progress,
a finished target, the result, an error) is queued, and :meth:`Worker.poll` runs those callbacks on the
thread that calls it. In Slicer a ``qt.QTimer`` on the main thread calls ``poll``; on the Python console
or in a test, :meth:`Worker.waitForIdle` does.

Inside Slicer the engine itself runs in a child process (``MatchLogic(engine="process")``,
:mod:`~SAMEmbeddingLib.engine_process`): Slicer's Python has no thread support while Qt idles, so this thread
then only waits on the child's pipe and forwards its answers; with ``engine="here"`` (plain Python, tests) the
thread runs the engine itself. The interface is the same either way.

>>> worker = Worker()
>>> task = worker.submit(lambda task: 6 * 7, onDone=print)
>>> worker.waitForIdle()   # runs the callbacks here: prints 42
42
True
>>> worker.shutdown()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from samembed.options import ProgressFn

log = logging.getLogger(__name__)


class Task:
    """A submitted job: its cancel flag, its state, and the hooks a running job reports through.

    Attributes:
        cancelEvent: set by :meth:`cancel`; long engine calls check it between targets and tiles.
        state: "queued", "running", "done", "failed" or "cancelled".
        result: the job's return value once done.
        error: the exception once failed.
    """

    def __init__(self, worker: Worker, fn: Callable[[Task], Any], onDone, onError, onProgress, name: str) -> None:
        self._worker = worker
        self._fn = fn
        self._onDone = onDone
        self._onError = onError
        self._onProgress = onProgress
        self.name = name
        self.cancelEvent = threading.Event()
        self.finished = threading.Event()
        self.state = "queued"
        self.result: Any = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Ask the job to stop at its next check; a queued job is skipped."""
        self.cancelEvent.set()

    @property
    def cancelled(self) -> bool:
        return self.cancelEvent.is_set()

    def progress(self, done: float, total: float, phase: str = "") -> None:
        """Report progress from the worker thread (delivered on the polling thread)."""
        if self._onProgress is not None:
            self._worker.callInMainThread(self._onProgress, done, total, phase)

    def callInMainThread(self, fn: Callable, *args) -> None:
        """Queue ``fn(*args)`` to run on the polling thread (where MRML may be touched). An exception it raises goes
        to the task's ``onError`` (the user is told, e.g. a target whose results could not be written), else to the
        log; the job goes on."""

        def run() -> None:
            try:
                fn(*args)
            except Exception as e:
                if self._onError is None:
                    raise  # (poll logs it)
                self._onError(e)

        self._worker.callInMainThread(run)

    def _run(self) -> None:
        if self.cancelEvent.is_set():
            self.state = "cancelled"
            self._finish(self._onDone, None)
            return
        self.state = "running"
        try:
            self.result = self._fn(self)
        except BaseException as e:  # noqa: BLE001 - every failure is reported to the main thread
            self.error = e
            self.state = "failed"
            if self._onError is None:
                log.error("%s failed: %s", self.name, e, exc_info=e)
            self._finish(self._onError, e)
            return
        self.state = "cancelled" if self.cancelEvent.is_set() else "done"
        self._finish(self._onDone, self.result)

    def _finish(self, callback, value) -> None:
        def deliver():
            try:
                if callback is not None:
                    callback(value)
            finally:
                self.finished.set()

        self._worker.callInMainThread(deliver)


class Worker:
    """A persistent background thread running submitted jobs in order.

    Args:
        name: the thread's name (shown in debuggers).
    """

    def __init__(self, name: str = "SAMEmbeddingWorker") -> None:
        self._name = name
        self._jobs: queue.Queue[Task | None] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable, tuple]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tasks: list[Task] = []

    # -- submitting --------------------------------------------------------------------------
    def submit(self, fn: Callable[[Task], Any], onDone: Callable[[Any], None] | None = None,
               onError: Callable[[BaseException], None] | None = None,
               onProgress: ProgressFn | None = None, name: str = "job") -> Task:
        """Queue ``fn(task)`` for the worker thread and return its :class:`Task`.

        ``onDone(result)``, ``onError(exception)`` and ``onProgress(done, total, phase)`` run on the
        thread that calls :meth:`poll`. A job cancelled before it started calls ``onDone(None)``.
        """
        task = Task(self, fn, onDone, onError, onProgress, name)
        with self._lock:
            self._tasks.append(task)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(task)
        return task

    def callInMainThread(self, fn: Callable, *args) -> None:
        """Queue ``fn(*args)`` for the next :meth:`poll`."""
        self._calls.put((fn, args))

    # -- main thread -------------------------------------------------------------------------
    def poll(self) -> int:
        """Run every queued callback on the calling thread; return how many ran."""
        count = 0
        while True:
            try:
                fn, args = self._calls.get_nowait()
            except queue.Empty:
                break
            count += 1
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - one failing callback must not stop the others
                log.error("SAMEmbedding callback failed: %s", e, exc_info=e)
        with self._lock:
            self._tasks = [t for t in self._tasks if not t.finished.is_set()]
        return count

    @property
    def pendingTasks(self) -> list[Task]:
        """Tasks queued or running, or whose callbacks have not been delivered yet."""
        with self._lock:
            return [t for t in self._tasks if not t.finished.is_set()]

    @property
    def busy(self) -> bool:
        return bool(self.pendingTasks) or not self._calls.empty()

    def waitForIdle(self, timeout: float | None = None, interval: float = 0.02) -> bool:
        """Poll until every task has finished and delivered its callbacks; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if not self.busy:
                return True
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(interval)

    def cancelAll(self) -> None:
        """Cancel every queued and running task."""
        for task in self.pendingTasks:
            task.cancel()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel pending work and stop the thread (callbacks not yet polled are dropped)."""
        self.cancelAll()
        self._jobs.put(None)
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    # -- worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            task = self._jobs.get()
            if task is None:
                return
            task._run()
