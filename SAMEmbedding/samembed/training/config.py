"""Training configuration: a dataclass, loaded from YAML or TOML, with ``key=value`` overrides."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import InputError
from ..options import MODALITIES

#: the training objectives (``--objective``), one line each; combine with ``+`` and weight with ``:w``
OBJECTIVE_HELP: dict[str, str] = {
    "sam": "SAM: local InfoNCE with hard negatives + global InfoNCE on two views of one scan (the default)",
    "isimed": "ISImed: distances between embeddings regress the points' physical distances",
    "adam": "Adam/Eve: anatomy decomposer parts contrasted coarse to fine, with a purposive pruner",
    "sal": "alignment learning: neighbouring slices aligned in a window, a positional loss and a variance term",
    "semantic": "cross-patient positives from organ label maps (semantic_labels): point-level on local, organ-level on global",
    "distill": "learn a trained model's embeddings (distill_teacher) voxel by voxel: a narrower, faster network",
}


@dataclass
class TrainConfig:
    """Every training setting, with SAM's defaults where the paper gives one.

    Distances are mm in the preprocessed volume's frame; sizes are voxels of the view.
    """

    name: str = "sam-lite-ct"
    arch: str = "sam-lite"
    net_config: dict = field(default_factory=dict)
    objective: str = "sam"
    # data
    data: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    cache_dir: str = "cache/train"
    modality: str = "auto"
    spacing_mm: float = 2.0
    pixel_spacing_mm: float | None = None  # assumed for 2D files that carry no spacing (PNG/JPEG), mm
    fill: str = "air"
    # optimisation
    iterations: int = 2000
    batch_volumes: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    seed: int = 0
    threads: int = 0
    time_limit_min: float = 0.0
    schedule_by_time: bool = False
    time_clock: str = "wall"  # "wall" or "cpu" (process CPU time: equal compute when runs share a machine)
    # two-view sampling
    local_size: int = 64
    global_size: int = 48
    scale_range: tuple = (0.8, 1.2)
    overlap_p: float = 0.8
    centre_jitter_mm: float = 24.0
    global_jitter_mm: float = 64.0
    noise_std: float = 2.0
    blur_p: float = 0.3
    blur_sigma: tuple = (0.5, 1.0)
    contrast: float = 0.0
    gamma: float = 0.0
    rotation_deg: float = 0.0
    # SAM loss
    tau: float = 0.5
    anchors: int = 128
    local_ignore_mm: float = 8.0
    num_hard: int = 256
    num_negatives: int = 128
    global_positive_mm: float = 16.0
    global_candidates: int = 256
    global_cross_volume: bool = True
    global_weight: float = 1.0
    pruner_threshold: float | None = None
    # ISImed / Adam / SAL options (see samembed.training.objectives)
    isimed_crops: int = 32
    isimed_scale_mm: float = 100.0
    adam_bank_size: int = 4096
    adam_levels: int = 3
    sal_window: int = 2
    sal_var_weight: float = 1.0
    # semantic objective: organ label maps give positives across patients (see samembed.training.semantic)
    semantic_labels: list = field(default_factory=list)  # rules {images: regex, labels: path template, names: {value: name}}
    semantic_pairs: int = 1
    semantic_anchors: int = 128
    semantic_candidates: int = 512
    semantic_background: int = 128
    semantic_positive_mm: float = 6.0
    semantic_ignore_mm: float = 16.0
    semantic_global_weight: float = 0.5
    # distill objective: a trained model's embeddings as targets (see samembed.training.distill)
    distill_teacher: str = "default"
    distill_global_weight: float = 1.0
    distill_relational_weight: float = 0.0
    distill_tau: float = 0.05
    distill_anchors: int = 256
    # outputs
    out_dir: str = "runs/sam-lite-ct"
    checkpoint_every: int = 250
    #: keep a weights-only copy ``snapshots/it_NNNNNN.pt`` every this many iterations (0: none), so that a
    #: curve of error against training time can be measured afterwards (``benchmarks/training_curve.py``)
    snapshot_every: int = 0
    #: start from these weights (a checkpoint path, or a model name such as ``default``) when the run does
    #: not resume: a lost run folder restarts from the shipped model, not from scratch
    init_from: str | None = None
    #: the global branch's weights from this model instead (a checkpoint path or a model name; ``sam-lite`` only):
    #: a light local branch (from ``init_from``) under a trained full-width global branch (``global_fpn_channels``)
    init_global_from: str | None = None
    #: the global branch keeps the weights it starts with (``init_global_from`` or ``init_from``) and its batch-norm
    #: statistics; only the local branch learns (the distill objective's global terms are then left out)
    freeze_global: bool = False
    half_weights: bool = True

    def to_dict(self) -> dict:
        """JSON-friendly form (stored in checkpoints)."""
        return json.loads(json.dumps(asdict(self)))

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply ``key=value`` strings; values are parsed as JSON when possible."""
        names = {f.name: f for f in fields(self)}
        for item in overrides:
            if "=" not in item:
                raise InputError(f"override '{item}' must look like key=value")
            key, raw = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in names:
                raise InputError(f"unknown training setting '{key}'; known: {', '.join(sorted(names))}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                # a list as a shell leaves it from exclude=['*_seg_*'] ([*_seg_*]) or exclude=[a, b]: its items (as
                # one text it was a character class of fnmatch, which excluded nothing)
                inner = raw.strip()
                value = ([v.strip().strip("'\"") for v in inner[1:-1].split(",") if v.strip()]
                         if inner.startswith("[") and inner.endswith("]") else raw)
            setattr(self, key, value)


#: settings that must be at least 1, at least 0, or greater than 0
AT_LEAST_ONE = ("iterations", "batch_volumes", "local_size", "global_size", "checkpoint_every", "anchors", "num_hard",
                "num_negatives", "global_candidates", "isimed_crops", "adam_bank_size", "adam_levels", "sal_window",
                "semantic_pairs", "semantic_anchors", "semantic_candidates", "distill_anchors")
AT_LEAST_ZERO = ("lr", "warmup", "threads", "time_limit_min", "snapshot_every", "weight_decay", "noise_std", "blur_p",
                 "contrast", "gamma", "rotation_deg", "overlap_p", "centre_jitter_mm", "global_jitter_mm",
                 "semantic_background", "local_ignore_mm", "semantic_ignore_mm", "global_weight", "sal_var_weight",
                 "semantic_global_weight", "distill_global_weight", "distill_relational_weight")
ABOVE_ZERO = ("spacing_mm", "tau", "distill_tau", "global_positive_mm", "isimed_scale_mm", "semantic_positive_mm")
#: the list settings whose entries are paths or patterns: texts (``exclude: [0001]`` failed later as a TypeError)
TEXT_LISTS = ("data", "exclude")
#: the choices of the settings that take one of a few words
CHOICES = {"time_clock": ("wall", "cpu"), "fill": ("zero", "air"), "modality": MODALITIES}


def _typed(name: str, kind: str, value, where: str):
    """``value`` of setting ``name`` as its field's type ``kind`` (the annotation's text), or :class:`InputError`
    naming the setting and ``where`` (the config file). A single string where a list is wanted is a list of it:
    ``exclude: pt_103_ct.nii.gz`` excludes that file (it was read as its characters, and excluded nothing)."""
    optional = kind.endswith("| None")
    kind = kind.removesuffix("| None").strip()
    if value is None and optional:
        return None
    if value is None and kind in ("list", "dict"):  # a YAML key with no value (every entry commented out): empty
        return [] if kind == "list" else {}

    def refuse(what: str):
        return InputError(f"{where}: {name} must be {what}, not {value!r}")

    if kind == "list":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise refuse("a list (or one string)")
        if name in TEXT_LISTS and not all(isinstance(v, str) for v in value):
            raise refuse("a list of texts (or one text; quote a name that reads as a number: '0001')")
        return value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse("a whole number")
        return value
    if kind == "float":
        if isinstance(value, str):  # YAML reads 1e-3 (no decimal point) as a string
            try:
                value = float(value)
            except ValueError:
                raise refuse("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise refuse("a number")
        if not math.isfinite(value):  # (json reads Infinity: an infinite lr diverged, its weights saved)
            raise refuse("a finite number")
        return float(value)
    if kind == "tuple":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise refuse("a list of numbers")
        return tuple(float(v) for v in value)
    plain = {"bool": (bool, "true or false"), "dict": (dict, "a mapping of names to values"), "str": (str, "a text")}
    if kind in plain and not isinstance(value, plain[kind][0]):
        raise refuse(plain[kind][1])
    return value


#: the largest learning rate a config may give: far beyond any that trains, well within float32
MAX_LR = 1e6


def validate_config(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """Check and normalise every setting of ``cfg`` in place (types, ranges, choices): a bad value is an
    :class:`InputError` naming it and ``where``, before any data are prepared, instead of an internal error
    minutes later or a silently wrong run. Returns ``cfg``."""
    for f in fields(cfg):
        setattr(cfg, f.name, _typed(f.name, str(f.type), getattr(cfg, f.name), where))
    for names, allowed, what in ((AT_LEAST_ONE, lambda v: v >= 1, "at least 1"),
                                 (AT_LEAST_ZERO, lambda v: v >= 0, "0 or more"),
                                 (ABOVE_ZERO, lambda v: v > 0, "greater than 0")):  # (NaN is no number: _typed)
        for name in names:
            if not allowed(getattr(cfg, name)):
                raise InputError(f"{where}: {name} must be {what}, not {getattr(cfg, name)}")
    for name in ("overlap_p", "blur_p"):
        if getattr(cfg, name) > 1:
            raise InputError(f"{where}: {name} is a probability, at most 1, not {getattr(cfg, name)}")
    if cfg.lr > MAX_LR:  # (1e38 ended in "internal error: value cannot be converted to type float without overflow")
        raise InputError(f"{where}: lr {cfg.lr:g} is beyond any rate that trains (at most {MAX_LR:g}; the configs "
                         "here use 1e-4 to 1e-3)")
    if not cfg.name or cfg.name.strip() != cfg.name or any(c in cfg.name for c in "/\\") or cfg.name in (".", ".."):
        # (the final model is out_dir/NAME.pt: "sub/model" failed after the whole run, "../x" wrote outside it)
        raise InputError(f"{where}: name must be a plain file name (the final model is out_dir/NAME.pt), "
                         f"not {cfg.name!r}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise InputError(f"{where}: {name} must be one of {', '.join(choices)}, not {getattr(cfg, name)!r}")
    if len(cfg.scale_range) != 2 or not 0 < cfg.scale_range[0] <= cfg.scale_range[1]:
        raise InputError(f"{where}: scale_range must be two numbers 0 < low <= high, not {list(cfg.scale_range)}")
    if len(cfg.blur_sigma) != 2 or not 0 <= cfg.blur_sigma[0] <= cfg.blur_sigma[1]:
        raise InputError(f"{where}: blur_sigma must be two numbers 0 <= low <= high, not {list(cfg.blur_sigma)}")
    if cfg.pixel_spacing_mm is not None and not cfg.pixel_spacing_mm > 0:
        raise InputError(f"{where}: pixel_spacing_mm must be greater than 0, not {cfg.pixel_spacing_mm}")
    from .labels import LabelRule

    for rule in cfg.semantic_labels:  # (their mistakes were found after every volume was preprocessed)
        if not isinstance(rule, dict):
            raise InputError(f"{where}: semantic_labels: each entry is a mapping of images, labels and names, not "
                             f"{rule!r}")
        try:
            LabelRule.from_dict(rule)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return cfg


def _yaml_without_repeated_keys(text: str):
    """``yaml.safe_load`` of ``text``, refusing a key given twice in one mapping (``lr:`` twice: the last won, without
    a word) with the parser's own kind of error (which the caller reports with the file)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into :class:`TrainConfig`, apply overrides and
    check every setting (:func:`validate_config`)."""
    cfg = TrainConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".toml":
                import tomllib

                raw = tomllib.loads(text)
            else:  # YAML, of which JSON is a part
                raw = _yaml_without_repeated_keys(text) or {}
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason}); save the config as UTF-8") from None
        except Exception as e:  # noqa: BLE001 - yaml.YAMLError, tomllib.TOMLDecodeError: the parser's own words
            raise InputError(f"{path}: not a valid {'TOML' if path.suffix == '.toml' else 'YAML'} file: "
                             f"{' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: a training config is a mapping of settings (name: value), not "
                             f"{type(raw).__name__} {raw!r:.60}")
        known = {f.name for f in fields(cfg)}
        unknown = sorted(set(raw) - known)
        if unknown:
            import difflib

            hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(u, known, 1)) else u
                     for u in map(str, unknown)]
            raise InputError(f"{path}: unknown settings {', '.join(hints)}")
        for k, v in raw.items():
            setattr(cfg, k, v)
    cfg.apply_overrides(overrides or [])
    validate_config(cfg, str(path or "config"))
    if cfg.time_clock not in ("wall", "cpu"):
        raise InputError(f"{path or 'config'}: time_clock must be 'wall' or 'cpu', not {cfg.time_clock!r}")
    if cfg.freeze_global and not (cfg.init_from or cfg.init_global_from):
        raise InputError(f"{path or 'config'}: freeze_global keeps the global branch's starting weights, but none are "
                         "given: set init_global_from (or init_from) to a trained model")
    if cfg.init_global_from and not cfg.init_from:
        raise InputError(f"{path or 'config'}: init_global_from gives the global branch only; set init_from for the "
                         "local branch (a model name or checkpoint)")
    return cfg
