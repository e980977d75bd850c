"""Model registry and checkpoint loading.

A model is a network plus the preprocessing it was trained with. It comes from:

* a name in ``Resources/Models/models.json`` (``default``, ``sam-lite-ct`` ...);
* a SAMEmbedding checkpoint (``samembed train`` writes them: architecture, preprocessing and training
  config travel with the weights, so nothing else is needed);
* an official SAM/SAMv2 mmcv checkpoint (``SAM.pth``, ``SAMv2_iter_20000.pth``), loaded without mmcv;
* ``random:<arch>``: seeded random weights, for tests and smoke runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, InputError, ModelNotAvailableError
from .networks import EmbeddingNet, build_network
from .preprocess import PreprocessConfig
from .registry import find_entry, models_dir, registry, unknown_model  # noqa: F401 - re-exported

log = logging.getLogger(__name__)
KNOWN_OFFICIAL_SHA256 = {
    "8dfedc38f587b1411fe295ae671b481ba8c92b768ae234ade982f959b70d4874": "SAM.pth (official SAM, ModelScope v1.0.0)",
    "a094d5eef867504defdc4c8e1d950835c4eb8aaa19de2027bb1a194781e423e3": "SAMv2_iter_20000.pth (official SAMv2 / UAE-S)",
}
CHECKPOINT_FORMAT = "samembed-checkpoint-v1"
OFFICIAL_PREPROCESS = PreprocessConfig(spacing_mm=2.0, fill="zero")


@dataclass
class LoadedModel:
    """A ready network with its preprocessing and identity.

    Attributes:
        net: the network, in eval mode.
        preprocess: how images become its input.
        model_id: a stable id for caches ("<name>@<sha256 prefix>").
        sha256: checkpoint file hash (None for random weights).
        info: free-form facts (source file, known official name, training config).
        int8: the int8 form's activation scales (map name -> (scale, zero point)) when the weights have a
            calibration beside them (``samembed quantize``), else None.
    """

    net: EmbeddingNet
    preprocess: PreprocessConfig
    model_id: str
    sha256: str | None = None
    info: dict = field(default_factory=dict)
    int8: dict | None = None

    @property
    def spec(self):
        """The network's :class:`~samembed.networks.NetSpec`."""
        return self.net.spec


def model_dim(entry: dict) -> int:
    """Image dimension (2 or 3) a registered model embeds (its ``dim``, else from its architecture)."""
    return int(entry.get("dim") or (2 if str(entry.get("architecture", "")).endswith("-2d") else 3))


def default_model_for(dim: int) -> str | None:
    """Name of the registered model that ``"default"`` means for ``dim``-D images (``default_for_dim``)."""
    for m in registry().get("models", []):
        if m.get("default_for_dim") == dim:
            return m["name"]
    return None


def models_for(dim: int) -> list[str]:
    """Names of the registered models, with weights on this machine, that embed ``dim``-D images."""
    return [m["name"] for m in registry().get("models", [])
            if model_dim(m) == dim and m.get("file") and (models_dir() / m["file"]).is_file()]


def verify_state_dict(net: torch.nn.Module, state: dict, source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys, if any."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source}: checkpoint does not fit architecture '{net.spec.arch}'"]
    for title, keys, fmt in (
        ("missing keys", missing, lambda k: k),
        ("unexpected keys", unexpected, lambda k: k),
        ("shape mismatches", shapes, lambda k: f"{k}: checkpoint {list(got[k])}, expected {list(expected[k])}"),
    ):
        if keys:
            lines.append(f"  {len(keys)} {title}: " + "; ".join(fmt(k) for k in keys[:8]) + (" ..." if len(keys) > 8 else ""))
    lines.append("  Use a checkpoint made for this architecture (see `samembed info`).")
    raise CheckpointError("\n".join(lines))


def _assign_state(net: torch.nn.Module, state: dict, source: str) -> None:
    """Give ``net``, built on the meta device (shapes only, no memory, no random initialisation: about 0.1 s of a
    cold start), the checkpoint's tensors, each in the dtype the network declares."""
    declared = net.state_dict()
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{source}: checkpoint entries that are not tensors: {', '.join(odd[:5])}")
    state = {k: v.to(declared[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if left:  # a tensor the checkpoint does not carry (a non-persistent buffer): the network must not use it
        raise CheckpointError(f"{source}: the network kept tensors without values: {', '.join(left[:5])}")


def _refuse_non_finite(net: torch.nn.Module, path: Path) -> None:
    """Raise :class:`CheckpointError` naming the tensors of ``net`` (its checkpoint's, as loaded) that hold NaN or
    infinite values: a diverged or damaged run's weights gave every score NaN, yet the matches were called confident.
    One norm per tensor in one call (about 1 ms for the default model, against 8 ms tensor by tensor), the names
    only when one is not finite."""
    tensors = [(k, v) for k, v in net.state_dict().items() if v.is_floating_point() and v.numel()]
    if not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm([v.float() for _, v in tensors]))).all()):
        return
    bad = [k for k, v in tensors if not bool(torch.isfinite(v).all())]
    raise CheckpointError(f"{path}: weights that are not finite (NaN or infinite) in {', '.join(bad[:5])}"
                          f"{' ...' if len(bad) > 5 else ''}; the run that made them diverged or the file is damaged: "
                          "use another checkpoint")


def _is_torch_file(data: bytes) -> bool:
    """``data`` is in one of ``torch.save``'s formats: a zip archive, or (the legacy format) a pickle of protocol 2
    or later."""
    import zipfile

    return zipfile.is_zipfile(io.BytesIO(data)) or data[:1] == b"\x80"


def _torch_load(path: Path, data: bytes, sha: str):
    """The checkpoint ``data`` (the bytes of ``path``, read once: their SHA-256 ``sha`` names these weights, not a
    version of the file that a training run put in its place meanwhile)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - try the full unpickler only for a known official file
        if sha in KNOWN_OFFICIAL_SHA256:
            try:
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from e
        if not _is_torch_file(data):
            raise CheckpointError(f"{path}: cannot read checkpoint: not a PyTorch file (corrupt, cut short or another "
                                  "kind of file); give a .pt or .pth file written by torch.save") from first
        if "weights only load failed" in str(first).lower():
            # torch's own message advises weights_only=False, which would run whatever code the file carries
            raise CheckpointError(
                f"{path}: cannot read checkpoint: it holds Python objects besides tensors and plain values, and "
                "unpickling those can run code from the file, so samembed reads such files only when they are a known "
                "official SAM release (by SHA-256). If you trust the file, save its weights alone, "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt'), and pass that") from first
        lines = [line for line in str(first).strip().splitlines() if line.strip()]
        raise CheckpointError(f"{path}: cannot read checkpoint (corrupt or not a PyTorch file): "
                              f"{lines[-1] if lines else type(first).__name__}") from first


def load_checkpoint(path: str | os.PathLike, arch: str | None = None) -> LoadedModel:
    """Load a SAMEmbedding or official SAM/SAMv2 checkpoint file, verifying keys and shapes.

    Args:
        path: the ``.pt`` / ``.pth`` file.
        arch: expected architecture; a checkpoint of another one raises :class:`CheckpointError`.
    """
    path = Path(path)
    if path.is_dir():
        runs = sorted(p.name for p in path.glob("*.pt"))
        raise CheckpointError(f"{path}: is a folder; give a checkpoint file in it" + (
            f" ({', '.join(runs[:4])}: a training run's final weights are <name>.pt, its last state last.pt)"
            if runs else ""))
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from None
    sha = hashlib.sha256(data).hexdigest()
    obj = _torch_load(path, data, sha)
    del data
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(obj).__name__}, expected a dict)")
    info: dict = {"file": str(path)}
    if obj.get("format") == CHECKPOINT_FORMAT:
        ck_arch = obj.get("arch")
        if arch is not None and arch != ck_arch:
            raise CheckpointError(f"{path}: checkpoint holds architecture '{ck_arch}', but '{arch}' was requested")
        try:
            with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
                net = build_network(ck_arch, obj.get("net_config"))
            prep = PreprocessConfig.from_dict(obj.get("preprocess", {}))
        except (InputError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: a checkpoint this samembed cannot build ({e}); made by another version "
                                  "of samembed? Use that version, or a checkpoint made by this one") from None
        state = obj["state_dict"]
        info.update(train_config=obj.get("train_config"), iteration=obj.get("iteration"))
        name = obj.get("name", path.stem)
    else:
        state = obj.get("state_dict", obj)
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
        if any(k.startswith(("l_stem.", "g_stem.", "l_down1.", "g_down1.")) for k in state):
            raise CheckpointError(f"{path}: holds sam-lite weights alone, without the architecture and preprocessing "
                                  "a samembed checkpoint carries; give the training run's own checkpoint (samembed "
                                  "train's <name>.pt), or write one with samembed.models.save_checkpoint")
        ck_arch = "sam-official"
        if arch is not None and arch != ck_arch:
            raise CheckpointError(f"{path}: looks like an official SAM checkpoint, but '{arch}' was requested")
        semantic = any(k.startswith("semantic_head.") for k in state)
        with torch.device("meta"):
            net = build_network("sam-official", {"semantic": semantic})
        prep = OFFICIAL_PREPROCESS
        name = "sam-official-v2" if semantic else "sam-official"
        if sha in KNOWN_OFFICIAL_SHA256:
            info["official"] = KNOWN_OFFICIAL_SHA256[sha]
            log.info("%s: SHA-256 %s matches the released %s", path, sha, KNOWN_OFFICIAL_SHA256[sha])
        else:
            log.info("%s: official SAM layout, SHA-256 %s (not one of the released files)", path, sha)
    verify_state_dict(net, state, str(path))
    _assign_state(net, state, str(path))
    _refuse_non_finite(net, path)
    net.eval()
    needed = ()
    if ck_arch == "sam-lite":  # the int8 form's maps of this network (3D sam-lite only runs in int8)
        from .networks.int8 import local_points

        needed = local_points(net)
    return LoadedModel(net, prep, f"{name}@{sha[:12]}", sha, info, read_int8_calibration(path, sha, needed))


def read_int8_calibration(weights: str | os.PathLike, sha: str | None, needed: tuple[str, ...] = ()) -> dict | None:
    """The int8 calibration beside ``weights`` (``<stem>.int8.json``) when it was made for the weights of SHA-256
    ``sha`` and holds a usable scale (finite, above 0) and zero point (0..255) for every map, ``needed`` ones among
    them: map name -> (scale, zero point); else None (a missing file silently, a damaged or foreign one with a
    warning that says what to do)."""
    from .quantize import qparams_path

    path = qparams_path(weights)
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d.get("qparams"), dict):
            raise TypeError("its qparams are not a map name -> [scale, zero point] object")
        qp = {str(k): (float(v[0]), int(v[1])) for k, v in d["qparams"].items()}
        bad = [k for k, (scale, zero) in qp.items() if not (math.isfinite(scale) and scale > 0 and 0 <= zero <= 255)]
        if bad:
            raise ValueError(f"scales or zero points out of range for {', '.join(bad[:5])}")
        missing = [k for k in needed if k not in qp]
        if missing:
            raise ValueError(f"no scales for the maps {', '.join(missing)}")
        made_for = d.get("meta", {}).get("sha256")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        log.warning("%s: unusable int8 calibration (%s); embedding in float32. Run `samembed quantize` again", path, exc)
        return None
    if made_for != sha:
        log.warning("%s: int8 calibration made for other weights (SHA-256 %s); embedding in float32. "
                    "Run `samembed quantize` for these weights", path, str(made_for)[:12])
        return None
    return qp


def random_model(arch: str = "sam-lite", seed: int = 0, config: dict | None = None) -> LoadedModel:
    """A network with seeded random weights (for tests and smoke runs; matching is only geometric)."""
    torch.manual_seed(seed)
    net = build_network(arch, config)
    net.eval()
    prep = OFFICIAL_PREPROCESS if arch == "sam-official" else PreprocessConfig(spacing_mm=2.0, fill="air")
    if arch == "sam-lite-2d":
        prep = PreprocessConfig(spacing_mm=1.0, fill="air")
    return LoadedModel(net, prep, f"random-{arch}-{seed}", None, {"random": True})


def load_model(model: str | os.PathLike | LoadedModel = "default") -> LoadedModel:
    """Resolve a model name (``models.json``), a checkpoint path, or ``random:<arch>``.

    Raises:
        ModelNotAvailableError: a registered model whose file is missing (the message says what to do).
        CheckpointError: an unreadable or mismatched checkpoint.
    """
    if isinstance(model, LoadedModel):
        return model
    text = str(model)
    if text.startswith("random:"):
        return random_model(text.split(":", 1)[1] or "sam-lite")
    entry = find_entry(text)
    if entry is not None:
        if not entry.get("file"):
            raise ModelNotAvailableError(
                f"model '{text}' has no weights on this machine ({entry.get('note', 'not shipped')}); "
                "pass --model PATH to a checkpoint (e.g. an official SAM.pth) or train one with `samembed train`"
            )
        path = models_dir() / entry["file"]
        if not path.is_file():
            raise ModelNotAvailableError(f"model '{text}': weights file {path} is missing; reinstall or pass --model PATH")
        loaded = load_checkpoint(path, entry.get("architecture"))
        if entry.get("sha256") and loaded.sha256 != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 {loaded.sha256} differs from models.json ({entry['sha256']}): the file is damaged, or models.json names other weights; reinstall")
        loaded.info["registry"] = entry
        return loaded
    path = Path(text)
    if path.exists() or path.suffix.lower() in (".pt", ".pth"):
        return load_checkpoint(path)
    raise InputError(unknown_model(text) or f"unknown model '{text}'")


def save_checkpoint(path: str | os.PathLike, net: EmbeddingNet, preprocess: PreprocessConfig, *, name: str,
                    train_config: dict | None = None, iteration: int | None = None, extra: dict | None = None,
                    half: bool = False) -> Path:
    """Write a self-describing SAMEmbedding checkpoint atomically (weights fp16 when ``half``)."""
    from .io import atomic_path

    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone() for k, v in net.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "name": name,
        "arch": net.spec.arch,
        "net_config": net.spec.config,
        "preprocess": preprocess.to_dict(),
        "train_config": train_config or {},
        "iteration": iteration,
        "state_dict": state,
    }
    if extra:
        obj.update(extra)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
