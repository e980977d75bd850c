"""Where the model catalogue lives and what it says (``Resources/Models/models.json``); imports no torch."""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

from .errors import InputError

#: the input size multiple and the local map's stride (x, y, z), both in input voxels, of this engine's own
#: architectures: what the prefetch needs to know of a checkpoint that ``models.json`` does not list (the networks'
#: specs say the same; tested)
ARCH_GRIDS_XYZ: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "sam-lite": ((8, 8, 8), (2, 2, 2)),
    "sam-lite-2d": ((8, 8), (2, 2)),
}


def models_dir() -> Path:
    """Folder holding ``models.json``: ``$SAMEMBED_MODELS_DIR`` or the extension's ``Resources/Models``."""
    env = os.environ.get("SAMEMBED_MODELS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "Resources" / "Models", here.parent / "Resources" / "Models"):
        if (cand / "models.json").is_file():
            return cand
    return here.parent.parent / "Resources" / "Models"


def registry() -> dict:
    """The parsed ``models.json`` (``{"models": [...]}``); empty when absent."""
    path = models_dir() / "models.json"
    if not path.is_file():
        if os.environ.get("SAMEMBED_MODELS_DIR"):  # a folder the user named: its registry is what they meant
            raise InputError(f"SAMEMBED_MODELS_DIR={os.environ['SAMEMBED_MODELS_DIR']}: no models.json in that folder; "
                             "point it at a folder holding one, or unset it to use the models shipped with samembed")
        return {"models": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: the model registry is not valid JSON ({e}); fix the file, or unset "
                         "SAMEMBED_MODELS_DIR to use the models shipped with samembed") from None
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise InputError(f"{path}: the model registry must be an object with a 'models' list")
    for i, entry in enumerate(data.get("models", [])):
        why = _entry_problem(entry)
        if why:
            raise InputError(f"{path}: model entry {i + 1} {why}; fix the file, or unset SAMEMBED_MODELS_DIR to use "
                             "the models shipped with samembed")
    return data


def _entry_problem(entry: object) -> str | None:
    """What makes a ``models.json`` entry unusable (a sentence's end), or None."""
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__}, not an object"
    if not isinstance(entry.get("name"), str) or not entry["name"]:
        return "has no 'name' (text)"
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        return f"('{entry['name']}'): 'aliases' must be a list of names, not {aliases!r}"
    for key in ("file", "sha256", "architecture"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f"('{entry['name']}'): '{key}' must be text, not {entry[key]!r}"
    return None


def find_entry(name: str) -> dict | None:
    """The ``models.json`` entry called ``name`` (its name or an alias), or None."""
    for m in registry().get("models", []):
        if m.get("name") == name or name in m.get("aliases", []):
            return m
    return None


def unknown_model(text: str) -> str | None:
    """Why ``text`` names no model (a message naming the registered ones, with the closest as a suggestion), or None
    when it may name one: a ``models.json`` name or alias, ``random:<arch>``, an existing path, or a ``.pt`` /
    ``.pth`` path (whose loading names a missing file). Reads no weights and imports no torch."""
    if text.startswith("random:") or find_entry(text) is not None:
        return None
    path = Path(text)
    if path.suffix.lower() in (".pt", ".pth") or path.exists():
        return None
    import difflib

    models = registry().get("models", [])
    known = [n for m in models for n in [m.get("name"), *m.get("aliases", [])] if n]
    close = difflib.get_close_matches(text, known, 1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    names = ", ".join(m["name"] + (f" ({', '.join(m['aliases'])})" if m.get("aliases") else "") for m in models)
    return f"unknown model '{text}'{hint}: not in models.json ({names or 'empty'}) and not a file"


class _TorchLeftOut:
    """Stands for a torch object (tensor, storage, dtype) of a checkpoint read by :func:`checkpoint_header`."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> _TorchLeftOut:
        return self


#: the most a checkpoint's pickle (its structure, not its tensors' data) may take to be read for its header, bytes
HEADER_PICKLE_LIMIT = 16 * 1024**2


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's ``data.pkl`` with no torch and no code: each torch class or function named in
    it becomes a new subclass of :class:`_TorchLeftOut` (so nothing the file does to one reaches another read),
    tensor data is not read, and any other class refuses (so nothing runs)."""

    def find_class(self, module: str, name: str) -> type:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return type("_TorchLeftOut", (_TorchLeftOut,), {})
        raise pickle.UnpicklingError(f"{module}.{name} is not read from a checkpoint's header")

    def persistent_load(self, pid: object) -> None:
        return None


def _plain(value: object) -> bool:
    """A number, text, or a list of them: what a checkpoint's preprocessing settings hold."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str)) or value is None


def checkpoint_header(path: str | os.PathLike) -> dict | None:
    """The plain facts a SAMEmbedding checkpoint (``samembed train``'s, a torch zip file) stores beside its weights:
    ``name``, ``arch``, ``net_config``, ``preprocess``..., read without importing torch (its tensors are left out).
    None for anything else: a missing or unreadable file, another format, an official checkpoint without those
    facts, a pickle over :data:`HEADER_PICKLE_LIMIT`, or one that names anything but torch's own objects."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                return None
            with z.open(pkl) as fh:
                data = fh.read(HEADER_PICKLE_LIMIT + 1)
        if len(data) > HEADER_PICKLE_LIMIT:
            return None
        obj = _HeaderUnpickler(io.BytesIO(data)).load()
        prep = obj.get("preprocess") if isinstance(obj, dict) else None
        arch = obj.get("arch") if isinstance(obj, dict) else None
        if (not isinstance(prep, dict) or not all(isinstance(k, str) and _plain(v) for k, v in prep.items())
                or not isinstance(arch, str) or arch not in ARCH_GRIDS_XYZ):
            return None
        return {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer", "rng_torch")}
    except Exception:  # noqa: BLE001 - whatever is wrong with the file, it has no header to read
        return None


@functools.lru_cache(maxsize=16)
def _checkpoint_facts(path: str, mtime_ns: int, size: int) -> dict | None:
    """:func:`model_facts` of a checkpoint file, read once per version of the file."""
    header = checkpoint_header(path)
    if header is None:
        return None
    pad, stride = ARCH_GRIDS_XYZ[header["arch"]]
    return {"preprocess": header["preprocess"], "pad_multiple_xyz": list(pad), "local_stride_xyz": list(stride)}


def model_facts(name: str | os.PathLike) -> dict | None:
    """What the prefetch needs of a model before torch loads: the ``models.json`` entry of a registered model, or,
    for a SAMEmbedding checkpoint path, its header's ``preprocess`` with its architecture's ``pad_multiple_xyz`` and
    ``local_stride_xyz``; None when neither says."""
    entry = find_entry(str(name))
    if entry is not None:
        return entry
    path = Path(name)
    if path.suffix.lower() not in (".pt", ".pth"):
        return None
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    facts = _checkpoint_facts(str(path.resolve()), st.st_mtime_ns, st.st_size)
    return None if facts is None else {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in facts.items()}


def registered_preprocess(name: str) -> dict | None:
    """The preprocessing settings a model declares without loading its weights (the engine checks them against the
    weights' own): ``models.json``'s ``preprocess`` for a registered model, a SAMEmbedding checkpoint's own
    (:func:`model_facts`); None when not declared."""
    facts = model_facts(name)
    return None if facts is None else facts.get("preprocess")


def _registered_zyx(name: str, key_xyz: str) -> tuple[int, ...] | None:
    """A per-axis fact ``key_xyz`` of a model (x, y, z, :func:`model_facts`) as (z, y, x), or None."""
    facts = model_facts(name)
    value = None if facts is None else facts.get(key_xyz)
    return None if value is None else tuple(int(m) for m in reversed(value))


def registered_pad_multiple_zyx(name: str) -> tuple[int, ...] | None:
    """The input size multiple (z, y, x) a registered model's network pads to, as ``models.json`` declares it
    (``pad_multiple_xyz``, the network spec's ``pad_multiple``), known without importing torch; None when not
    declared. A prefetched input made with another multiple is not used (:meth:`samembed.prefetch.Prefetch.take`)."""
    return _registered_zyx(name, "pad_multiple_xyz")


def registered_local_stride_zyx(name: str) -> tuple[int, ...] | None:
    """The local map's stride (z, y, x) in input voxels of a registered model, as ``models.json`` declares it
    (``local_stride_xyz``, the network spec's ``local_stride``), known without importing torch; None when not
    declared. The body mask lives on that grid (the prefetch process makes it there, :mod:`samembed.prefetch`)."""
    return _registered_zyx(name, "local_stride_xyz")
