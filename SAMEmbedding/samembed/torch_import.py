"""How a process of the engine's own imports torch: without torch's Python meta kernels, and with the garbage
collector paused (:mod:`samembed.collector`).

``import torch`` ends with ``from torch import _meta_registrations``: about a thousand shape functions, written in
Python, for tensors on the ``meta`` device, which fake tensors, ``torch.compile`` and ``torch.export`` run instead of
real kernels. That module imports ``torch._prims``, ``torch._refs`` and ``torch._decomp`` in turn. Measured on the
2-core VM with torch 2.13.0: 0.36 s of a 1.45 s import by ``-X importtime``, and 1.38-1.48 s against 0.91-0.92 s of
wall time for the whole import in fresh interpreters (about a sixth of a cold head-and-neck pair). The engine runs
torch's eager kernels only; its one use of the meta device, building a network's modules without initialising their
weights (:func:`samembed.models.load_model`), needs only the C++ meta kernels of tensor creation and random
initialisation, which every architecture uses (tested). Every match is the same either way (tested on a real pair).

So the engine's own processes (the ``samembed match`` and ``samembed embed`` commands, the Slicer module's engine
process) call :func:`before_torch_import` before torch loads and :func:`after_torch_import` right after it: torch's
import then finds a placeholder module instead of ``torch._meta_registrations``, and the placeholder is taken away
again as soon as torch is loaded. A later ``import torch._meta_registrations`` (``torch._decomp``, fake tensors and
``torch.compile`` each import it themselves) loads the real module and registers its kernels then; so does the first
attribute asked of the placeholder, should anything ask while it is in place. Setting the environment variable
``SAMEMBED_FULL_TORCH_IMPORT=1`` imports torch whole. A script that imports the engine keeps torch's usual import.
This module imports no torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

from .collector import freeze_imported, pause_collection

#: torch's module of Python meta kernels, which the engine's processes import only when something asks for it
META_KERNELS_MODULE = "torch._meta_registrations"
#: environment variable: set to 1 to import torch whole (with its meta kernels) in the engine's processes too
FULL_IMPORT_ENV = "SAMEMBED_FULL_TORCH_IMPORT"


class _DeferredModule(types.ModuleType):
    """The placeholder of a module left out of torch's import: empty, and the real module is imported (and put in its
    place) the first time an attribute is asked of it."""

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # the import system's own questions: no reason to load
            raise AttributeError(attr)
        return getattr(_load_real(self), attr)


def _load_real(placeholder: types.ModuleType) -> types.ModuleType:
    """Replace ``placeholder`` by the real module of its name (in ``sys.modules`` and in its package), imported now."""
    name = placeholder.__name__
    if sys.modules.get(name) is placeholder:
        del sys.modules[name]
    _unbind(placeholder)
    return importlib.import_module(name)


def _unbind(placeholder: types.ModuleType) -> None:
    """Take the placeholder away from its package's namespace, where the import bound it."""
    package, _, attr = placeholder.__name__.rpartition(".")
    parent = sys.modules.get(package)
    if parent is not None and getattr(parent, "__dict__", {}).get(attr) is placeholder:
        delattr(parent, attr)


def before_torch_import() -> bool:
    """In a process of the engine's own, before torch is imported: pause the garbage collector
    (:func:`samembed.collector.pause_collection`), and have torch's import skip its Python meta kernels (see the module
    docstring) unless :data:`FULL_IMPORT_ENV` is set to 1. Returns whether the meta kernels will be skipped (False when
    torch, or the meta kernels' module, is already imported)."""
    pause_collection()
    if os.environ.get(FULL_IMPORT_ENV, "").strip() == "1" or "torch" in sys.modules or META_KERNELS_MODULE in sys.modules:
        return False
    sys.modules[META_KERNELS_MODULE] = _DeferredModule(META_KERNELS_MODULE)
    return True


def after_torch_import() -> int:
    """Right after torch's import, before the engine is made: take the placeholder of torch's meta kernels away (a
    later import of that module loads the real one), and leave the objects made so far out of the garbage collector's
    scans (:func:`samembed.collector.freeze_imported`). Nothing of either when :func:`before_torch_import` did not
    apply it. Returns how many objects the collector left out (0 when it did nothing)."""
    placeholder = sys.modules.get(META_KERNELS_MODULE)
    if isinstance(placeholder, _DeferredModule):
        del sys.modules[META_KERNELS_MODULE]
        _unbind(placeholder)
    return freeze_imported()


def meta_kernels_skipped() -> bool:
    """Whether torch is imported and its Python meta kernels are not (this process skipped them and nothing has asked
    for them since)."""
    module = sys.modules.get(META_KERNELS_MODULE)
    return "torch" in sys.modules and (module is None or isinstance(module, _DeferredModule))
