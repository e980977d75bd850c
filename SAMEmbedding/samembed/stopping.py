"""How a long command stops on Ctrl-C (SIGINT) and on SIGTERM, keeping what it finished.

Python raises ``KeyboardInterrupt`` on Ctrl-C, but dies at once on SIGTERM, which ``kill``, ``timeout``, container
runtimes and batch systems (a time limit, a cancel) send: nothing finished is written and child processes are left
behind. :func:`stop_on_sigterm` makes SIGTERM raise :class:`Terminated`, a ``KeyboardInterrupt``, so every path that
keeps its work on Ctrl-C (``samembed match``: the finished targets; ``samembed propagate``: the finished scans) keeps
it on SIGTERM too. :class:`StopBetweenSteps` goes further for a loop of steps that must not be cut in half (a
training iteration): the signal is noted, the step finishes, and the loop saves its state before it stops.

Signal handlers are the main thread's: elsewhere these change nothing. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM reached a running command: it stops as on Ctrl-C, keeping what it finished; the command line exits
    with 143 (128 + SIGTERM)."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop(signum: int) -> KeyboardInterrupt:
    """The exception of a stop by signal ``signum``: :class:`Terminated` for SIGTERM, else ``KeyboardInterrupt``."""
    return Terminated(f"stopped by {signal.Signals(signum).name}") if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _stopping_on(signum: int, replaced: bool) -> Iterator[None]:
    """While the block runs, ``signum`` raises :func:`_stop`'s exception in the main thread when ``replaced`` (its
    handler now is one to replace); the previous handler is put back after it."""
    if not _in_main_thread() or not replaced:
        yield
        return

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise _stop(signum)

    previous = signal.signal(signum, stop)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def stop_on_sigterm() -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread; the previous handler is put back
    after it."""
    return _stopping_on(signal.SIGTERM, _replaceable(signal.SIGTERM))


def _replaceable(signum: int) -> bool:
    """Whether a stop may take over ``signum``'s handler: not where the signal is ignored (``trap '' TERM``, or SIGINT
    in a background job of a non-interactive shell: the parent meant it not to reach this process, as Python's own
    Ctrl-C handling leaves it), nor where its handler was set from C (``None``)."""
    return signal.getsignal(signum) not in (None, signal.SIG_IGN)


def stop_on_hang_up() -> contextlib.AbstractContextManager[None]:
    """While the block runs, SIGHUP (a closed terminal, a dropped SSH session) raises ``KeyboardInterrupt`` in the
    main thread, so that a server stops through its clean-up instead of at once; left alone where SIGHUP is ignored
    (``nohup``: the process is meant to outlive its terminal) or handled already, and where there is none (Windows)."""
    hang_up = getattr(signal, "SIGHUP", None)
    if hang_up is None:
        return contextlib.nullcontext()
    return _stopping_on(hang_up, signal.getsignal(hang_up) is signal.SIG_DFL)


class StopBetweenSteps:
    """A context in which Ctrl-C, SIGTERM and SIGHUP (where it would end the process) stop a loop between two
    steps, not within one.

    The first such signal is only noted (:attr:`requested`); the loop checks it after each step, saves what it must,
    and calls :meth:`stop`, which raises ``KeyboardInterrupt`` (Ctrl-C) or :class:`Terminated` (SIGTERM). A second
    signal before that raises at once: whoever sends it again means now. The previous handlers are put back on
    leaving the context.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal noted, if any
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopBetweenSteps:
        if _in_main_thread():
            for signum in self.SIGNALS:
                if _replaceable(signum):
                    self._previous[signum] = signal.signal(signum, self._note)
            # a closed terminal or a dropped SSH session (SIGHUP) ended a training run at once, losing the iterations
            # since its last checkpoint (a review): it stops between steps too, as Ctrl-C does; left alone under
            # nohup (ignored: the process is meant to outlive its terminal) or where it is handled already
            hang_up = getattr(signal, "SIGHUP", None)
            if hang_up is not None and signal.getsignal(hang_up) is signal.SIG_DFL:
                self._previous[hang_up] = signal.signal(hang_up, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.requested is not None:
            raise _stop(signum)
        self.requested = signum

    def stop(self) -> None:
        """Raise the noted stop (call it when :attr:`requested` is set, after saving); a plain ``KeyboardInterrupt``
        when none was noted here (another process of the same run was stopped)."""
        raise _stop(self.requested if self.requested is not None else signal.SIGINT)
