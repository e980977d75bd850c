"""Progress on stderr for the ``samembed`` commands: a tqdm bar on a terminal, plain lines in a file or a pipe.

A redrawn bar written to a log (``nohup samembed train ...``, a batch job's output, CI) leaves one long line of
carriage returns. When stderr is not a terminal, progress is a line per phase (:class:`PhaseProgress`) or a line
every :data:`PROGRESS_LINE_S` seconds and at the end (:class:`CountProgress`), each with the seconds since the
start::

      1.5 s  embedding target 1/2 pt_232_ct.nii.gz
     30.1 s  train 120/600 (20 %), 3.98 it/s, loss=0.412

Torch-free (``samembed --help`` imports it); tqdm is imported only for a terminal.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

#: when progress goes to a file or a pipe: the most seconds between two lines of a count, or of a phase whose
#: numbers alone move (tiles 3/40, 4/40, ...)
PROGRESS_LINE_S = 10.0
_DIGITS = re.compile(r"\d+(?:\.\d+)?")


def is_terminal(stream: TextIO | object) -> bool:
    """``stream`` is an interactive terminal (False for a file, a pipe, or a stream without a descriptor)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _line(started_s: float, text: str) -> None:
    print(f"{time.perf_counter() - started_s:5.1f} s  {text}", file=sys.stderr, flush=True)


class PhaseProgress:
    """Progress that names the current phase (reading, embedding source, embedding target k/N, matching, polishing,
    writing), counting ``total`` units (targets, images); nothing when not ``enabled`` (``--quiet``).

    On a terminal it is one tqdm bar, cleared at the end. Elsewhere each new phase is one line; a phase whose
    numbers alone move gets a line when it starts and then at most one every :data:`PROGRESS_LINE_S` seconds.

    Args:
        total: the units to count.
        phase: the first phase's name.
        enabled: show anything at all.
        started_s: where the lines' clock starts (``time.perf_counter()``, e.g. the command's start); default now.
    """

    def __init__(self, total: int, phase: str, enabled: bool = True, started_s: float | None = None) -> None:
        self.bar = None
        self.lines = enabled and not is_terminal(sys.stderr)
        self._t0 = time.perf_counter() if started_s is None else started_s
        self._last_at = time.perf_counter()
        self._last = ""
        if self.lines:
            self._line(phase)
        elif enabled:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, desc=phase, dynamic_ncols=True, file=sys.stderr, leave=False,
                            bar_format="{desc}: {n:g}/{total_fmt} {bar} [{elapsed}<{remaining}]")
            # log lines while the bar is shown go above it, not onto its line
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def _line(self, phase: str) -> None:
        if not phase or phase == self._last:
            return
        now = time.perf_counter()
        if _DIGITS.sub("#", phase) == _DIGITS.sub("#", self._last) and now - self._last_at < PROGRESS_LINE_S:
            return  # only its numbers moved
        self._last, self._last_at = phase, now
        _line(self._t0, phase)

    def phase(self, phase: str) -> None:
        """Name the phase now running (shown at once)."""
        if self.lines:
            self._line(phase)
        elif self.bar is not None:
            self.bar.set_description_str(phase)
            self.bar.refresh()

    def update(self, done: float, total: float, phase: str = "") -> None:
        """A :data:`samembed.options.ProgressFn`: ``done`` of ``total`` in the named phase."""
        if self.lines:
            self._line(phase)
        elif self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            if phase:
                self.bar.set_description_str(phase)
            self.bar.refresh()

    def close(self) -> None:
        """Clear the bar (a terminal); lines stay as written."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self._redirect.__exit__(None, None, None)


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads a wait: ``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {minutes:02d} min"


class CountProgress:
    """A count of ``total`` units (iterations, scans, images) with a note (``set_postfix``): tqdm's ``update``,
    ``set_postfix``, ``set_postfix_str`` and ``close``.

    On a terminal it is a tqdm bar. Elsewhere it is a line when the count starts, then at most one every
    :data:`PROGRESS_LINE_S` seconds, and one at the end: ``  30.1 s  train 120/600 (20 %), 3.98 it/s, 2 min left,
    loss=0.412`` (the rate counts this run's units per second of wall time, and the time left follows it).

    Args:
        total: the units to count.
        desc: what is counted (the lines' first word).
        initial: units already done (a resumed run); the rate counts only this run's.
        unit: the units' name in the rate.
        started_s: where the lines' clock starts (``time.perf_counter()``, e.g. the command's start, as
            :class:`PhaseProgress`'s); default now. The rate counts from now either way.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", started_s: float | None = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._initial = int(initial)
        self.postfix = ""
        self._t0 = self._last_at = time.perf_counter()
        self._clock0 = self._t0 if started_s is None else started_s
        self.bar = None
        #: plain lines (stderr is not a terminal) rather than a bar
        self.lines = not is_terminal(sys.stderr)
        if not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr)
        else:
            self._line()

    def _line(self) -> None:
        self._last_at = time.perf_counter()
        share = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
        done = self.n - self._initial
        per_s = done / max(self._last_at - self._t0, 1e-9)
        rate = f", {per_s:.3g} {self.unit}/s" if done else ""
        # what is left at this run's rate (a log of a long run said how fast, not how long: a review)
        left = f", {_duration((self.total - self.n) / per_s)} left" if done and self.total > self.n else ""
        note = f", {self.postfix}" if self.postfix else ""
        _line(self._clock0, f"{self.desc} {self.n}/{self.total}{share}{rate}{left}{note}")

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self._last_at >= PROGRESS_LINE_S:
            self._line()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        """The note after the count (the next line or redraw shows it; ``refresh`` redraws a bar at once)."""
        self.postfix = s
        if self.bar is not None:
            self.bar.set_postfix_str(s, refresh=refresh)

    def set_postfix(self, refresh: bool = True, **values: object) -> None:
        """The note as ``key=value`` pairs, as tqdm's."""
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()), refresh=refresh)

    def close(self) -> None:
        """End the count: close the bar, or write the last line."""
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()
