"""How a process of the engine's own imports torch: without torch's Python meta kernels until something needs them,
and with the garbage collector paused (:mod:`samembed.collector`).

``import torch`` ends with ``from torch import _meta_registrations``: about a thousand shape functions, written in
Python, for tensors on the ``meta`` device, which fake tensors, ``torch.compile`` and ``torch.export`` run instead of
real kernels. That module imports ``torch._prims``, ``torch._refs`` and ``torch._decomp`` in turn. Measured on the
2-core VM with torch 2.13.0: 0.36 s of a 1.45 s import by ``-X importtime``, and 1.38-1.48 s against 0.91-0.92 s of
wall time for the whole import in fresh interpreters (a cold head-and-neck pair takes 2-3 s). The engine's matching
runs torch's eager kernels only; its one use of the meta device, building a network's modules without initialising
their weights (:func:`samembed.models.load_model`), needs only the C++ meta kernels of tensor creation and random
initialisation (tested for every architecture). Every match is the same either way (tested on real data).

So the engine's own processes (the ``samembed match`` and ``samembed embed`` commands, the Slicer module's engine
process) call :func:`before_torch_import` before torch loads and :func:`after_torch_import` right after the engine's
modules are imported:

- torch's import finds a placeholder module instead of ``torch._meta_registrations``; the placeholder is taken away
  by :func:`after_torch_import`;
- the first import of a torch module that is not loaded yet, after torch's own import, loads the meta kernels first
  (:func:`load_meta_kernels`), as torch's own import would have: ``torch._decomp``, ``torch._refs``, fake tensors,
  ``torch.compile``, ``torch.export`` and anything else that builds on them then work as usual. Only
  :data:`LIGHT_MODULES`, which the engine imports while it matches and which need no meta kernel, are imported
  without;
- ``torch._prims``, ``torch._refs`` and ``torch._decomp``, which a whole import leaves as attributes of ``torch``
  (``torch.broadcast_shapes`` reads ``torch._refs``), stand there from :func:`after_torch_import` on as placeholders
  that load the meta kernels, then the module, the first time anything is asked of them; so does the placeholder of
  the meta kernels' own module while it is in place. Between torch's import and :func:`after_torch_import` (while the
  engine's own modules load) those attributes are missing; imports load the meta kernels as above.

Setting the environment variable ``SAMEMBED_FULL_TORCH_IMPORT=1`` imports torch whole. A script that imports the
engine keeps torch's usual import. This module imports no torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types

from .collector import freeze_imported, pause_collection
from .realpaths import memoise_realpath, restore_realpath

log = logging.getLogger(__name__)

#: torch's module of Python meta kernels, which the engine's processes import only when something needs it
META_KERNELS_MODULE = "torch._meta_registrations"
#: modules a whole import of torch leaves as attributes of ``torch`` and that the meta kernels' module imports
META_KERNELS_ATTRIBUTES = ("_prims", "_refs", "_decomp")
#: torch modules that the engine imports after torch's own import (``torch.load``'s settings, the device context)
#: and that import none of the meta kernels' modules: importing them does not load the meta kernels (tested)
LIGHT_MODULES = frozenset({"torch.utils._device", "torch.utils.serialization", "torch.utils.serialization.config"})
#: environment variable: set to 1 to import torch whole (with its meta kernels) in the engine's processes too
FULL_IMPORT_ENV = "SAMEMBED_FULL_TORCH_IMPORT"


class _DeferredModule(types.ModuleType):
    """A placeholder of a module left out of torch's import: empty; the first attribute asked of it loads the meta
    kernels (:func:`load_meta_kernels`) and the real module, and is read from that."""

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):  # the import system's own questions: no reason to load
            raise AttributeError(attr)
        log.info("loading torch's Python meta kernels for %s.%s (left out of torch's import)", self.__name__, attr)
        load_meta_kernels()
        return getattr(importlib.import_module(self.__name__), attr)


class _MetaKernelsFirst(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import hook, once torch is loaded without its meta kernels: the first import of a torch module that is not
    loaded yet (but :data:`LIGHT_MODULES`) loads the meta kernels before it, in torch's own order. Done once, then
    the hook is gone."""

    def __init__(self) -> None:
        self._real_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, name: str, path=None, target=None):
        if not name.startswith("torch.") or name in LIGHT_MODULES or _torch_loading():
            return None
        if name == META_KERNELS_MODULE:  # the meta kernels themselves, imported directly: torch's order already
            _remove_hook()
            return None
        real = importlib.machinery.PathFinder.find_spec(name, path)
        if real is None:  # no such module (a probe by importlib.util.find_spec gets None, as without the hook)
            return None
        # this loader: the meta kernels first (create_module); what a probe reads of the spec, as the real one says
        spec = importlib.machinery.ModuleSpec(name, self, origin=real.origin,
                                              is_package=real.submodule_search_locations is not None)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        log.info("loading torch's Python meta kernels for %s (left out of torch's import)", spec.name)
        load_meta_kernels()  # which may import the module asked for on the way
        module = importlib.import_module(spec.name)  # the real module (the hook is gone)
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # executed by the import above; the import system set this loader's spec on it: its own back
        module.__spec__ = self._real_specs.pop(module.__name__, module.__spec__)


_hook: _MetaKernelsFirst | None = None


def _torch_loading() -> bool:
    """torch is not imported, or its own import is still running."""
    torch = sys.modules.get("torch")
    return torch is None or bool(getattr(getattr(torch, "__spec__", None), "_initializing", False))


def _remove_hook() -> None:
    global _hook
    if _hook is not None:
        if _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        _hook = None


def _unbind(name: str) -> None:
    """Take a placeholder of module ``name`` away from ``sys.modules`` and from its package's namespace."""
    if isinstance(sys.modules.get(name), _DeferredModule):
        del sys.modules[name]
    package, _, attr = name.rpartition(".")
    parent = sys.modules.get(package)
    if parent is not None and isinstance(getattr(parent, "__dict__", {}).get(attr), _DeferredModule):
        delattr(parent, attr)


def before_torch_import() -> bool:
    """In a process of the engine's own, before torch is imported: pause the garbage collector
    (:func:`samembed.collector.pause_collection`), resolve each folder once in ``os.path.realpath`` until
    :func:`after_torch_import` (:func:`samembed.realpaths.memoise_realpath`), and have torch's import leave its
    Python meta kernels out until something needs them (see the module docstring), unless :data:`FULL_IMPORT_ENV` is
    set to 1. Returns whether the meta kernels are left out (False when torch, or the meta kernels' module, is
    already imported)."""
    global _hook
    pause_collection()
    if "torch" not in sys.modules:
        memoise_realpath()  # each folder resolved once while torch's import maps modules to files (samembed.realpaths)
    if os.environ.get(FULL_IMPORT_ENV, "").strip() == "1" or "torch" in sys.modules or META_KERNELS_MODULE in sys.modules:
        return False
    sys.modules[META_KERNELS_MODULE] = _DeferredModule(META_KERNELS_MODULE)
    if _hook is None:
        _hook = _MetaKernelsFirst()
        sys.meta_path.insert(0, _hook)
    return True


def after_torch_import() -> int:
    """Right after torch's import and the engine's modules, before the engine is made: take the placeholder of
    torch's meta kernels away (a later import of any new torch module loads them first), put the placeholders of
    :data:`META_KERNELS_ATTRIBUTES` on ``torch``, and leave the objects made so far out of the garbage collector's
    scans (:func:`samembed.collector.freeze_imported`, which does something only when :func:`before_torch_import`
    paused it), and put back Python's own ``os.path.realpath`` (:mod:`samembed.realpaths`). Returns about how many
    objects torch's import made, which the collector leaves out (0 when it did nothing; see
    :func:`~samembed.collector.freeze_imported`)."""
    restore_realpath()
    if isinstance(sys.modules.get(META_KERNELS_MODULE), _DeferredModule):
        _unbind(META_KERNELS_MODULE)
        torch = sys.modules.get("torch")
        for attr in META_KERNELS_ATTRIBUTES:
            name = f"torch.{attr}"
            if torch is not None and name not in sys.modules and not hasattr(torch, attr):
                setattr(torch, attr, _DeferredModule(name))
    return freeze_imported()


def load_meta_kernels() -> None:
    """Import torch's Python meta kernels now, if this process left them out (and with them ``torch._prims``,
    ``torch._refs`` and ``torch._decomp``); nothing otherwise. Safe to call at any time after torch's import."""
    _remove_hook()
    for name in (META_KERNELS_MODULE, *(f"torch.{a}" for a in META_KERNELS_ATTRIBUTES)):
        _unbind(name)
    if "torch" in sys.modules and not _torch_loading():
        importlib.import_module(META_KERNELS_MODULE)


def meta_kernels_skipped() -> bool:
    """Whether torch is imported and its Python meta kernels are not (this process left them out and nothing has
    needed them since)."""
    module = sys.modules.get(META_KERNELS_MODULE)
    return "torch" in sys.modules and (module is None or isinstance(module, _DeferredModule))
