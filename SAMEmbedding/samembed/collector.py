"""Python's cyclic garbage collector in an engine process: paused while torch loads, then torch's objects are left out
of its scans.

Importing torch creates about 170 k objects that the collector tracks, and they live as long as the process. Each
full collection walks all of them: on a cold ``samembed match`` of two head-and-neck CTs, three full collections took
0.03, 0.05 and 0.10 s (two during torch's import, one in the match), and the collector 0.22-0.31 s in all on every
path measured (a pair, one atlas into five targets, a chest CT pair with 50 heatmaps). Each collection found at most
a few hundred unreachable objects. With :func:`pause_collection` before torch's import and :func:`freeze_imported`
right after it (:func:`gc.freeze`: the objects tracked so far go to a permanent generation, which no collection
scans), the collector takes 0.007-0.009 s in the same runs.

Garbage that is not a cycle is freed by reference counting as before. Objects made after the freeze are collected as
usual, which matters: the engine's on-demand maps and their embedder refer to each other, and a cycle that passes
through a frozen object is never freed. So the freeze comes before the engine (the :class:`~samembed.api.Matcher`,
its model and maps) is made. What it keeps for good is what the process made until then: torch's modules, the
command's arguments and point lists, and the cycles that became garbage during the pause (about 7 k small objects,
under 1 MB, once per process; collecting them first would cost the full collection this module saves).

Like :mod:`samembed.allocator`, it is a process-wide setting. The engine applies it only in processes of its own: the
``samembed match`` and ``samembed embed`` commands (from their start) and the Slicer module's engine process (around
its import of torch, so that an engine that has not loaded torch yet collects as usual). Without
:func:`pause_collection` in the same process, :func:`freeze_imported` does nothing, so a script that calls the
commands' functions keeps its own collector as it is. This module imports no torch.
"""

from __future__ import annotations

import gc

_paused = False


def pause_collection() -> None:
    """Stop the cyclic collector until :func:`freeze_imported`, in a process of the engine's own, before torch is
    imported. Nothing when the collector is already off (the process's owner turned it off)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def freeze_imported() -> int:
    """Right after torch's import, before the engine is made: move every object tracked so far out of the collector's
    scans and start the collector again. Only after :func:`pause_collection` in this process; otherwise (and a second
    time) nothing.

    Returns about how many objects the import made: the tracked objects made since the collector last ran, and still
    alive, as its youngest generation counts them (``gc.get_count()[0]``; about 184 k after torch's), which leaves
    out the few thousand made before; 0 when it did nothing. Not ``gc.get_freeze_count()``, which walks every frozen
    object to count them: 12 ms for torch's, on a cold command's critical path."""
    global _paused
    if not _paused:
        return 0
    _paused = False
    made = gc.get_count()[0]
    gc.freeze()
    gc.enable()
    return made


def resume_after_fork() -> None:
    """In a child forked while the collector was paused (the prefetch process): collect as usual there, without
    freezing; the parent's pause is its own."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()
