"""Calibrating a model's int8 form: the activation scales of :class:`samembed.networks.int8.SamLiteInt8`.

``samembed quantize --config TRAIN.yaml`` takes a seeded sample of the model's own training images (the config's
``data`` and ``exclude``, so evaluation images stay out), preprocesses each as the engine does, runs the float32
network on the whole volume and keeps each map's range (:func:`samembed.networks.int8.calibrate`). The result is a
small JSON file beside the weights, ``<weights stem>.int8.json``, which the engine then uses on the CPU.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .options import ProgressFn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeSettings:
    """How a model's int8 scales are calibrated.

    Attributes:
        images: how many training images to sample.
        seed: the sample's seed.
        quantile: the share of each map's values inside its range (the rest saturate).
        exclude: file-name globs left out beside the config's own (e.g. images of an evaluation).
    """

    images: int = 12
    seed: int = 0
    quantile: float = 0.99999
    exclude: tuple[str, ...] = ()


def qparams_path(weights: str | Path) -> Path:
    """Where a model's int8 calibration lives: ``<weights stem>.int8.json`` beside the weights file."""
    w = Path(weights)
    return w.with_name(w.stem + ".int8.json")


def sample_images(sources: list[str], exclude: list[str], settings: QuantizeSettings, base: Path) -> list[Path]:
    """A seeded sample of ``settings.images`` training images (``sources`` and ``exclude`` as in a training config),
    taken from the sources in turn, so that a small collection (a chest CT set beside many head-and-neck CTs) is
    represented in the activation ranges as much as a large one."""
    from .training.data import find_volumes

    rng = random.Random(settings.seed)
    pools = []
    for src in sources:
        found = find_volumes([src], list(exclude) + list(settings.exclude), base)
        rng.shuffle(found)
        if found:
            pools.append(found)
    if not pools:
        if find_volumes(list(sources), [], base):  # there are images: the exclusions left none
            raise InputError(f"every training image in {sources} is excluded (by the config's exclude "
                             f"{list(exclude)} and --exclude {list(settings.exclude)}); exclude fewer")
        raise InputError(f"no training images found in {sources}; run from the repository root with ../shared beside it")
    picked: list[Path] = []
    while len(picked) < settings.images and any(pools):
        for pool in pools:
            if pool and len(picked) < settings.images:
                picked.append(pool.pop())
    return sorted(dict.fromkeys(picked))


def calibrate_model(model, images: list[Path], settings: QuantizeSettings, out: Path,
                    progress: ProgressFn | None = None) -> Path:
    """Calibrate ``model`` (a loaded ``sam-lite`` model) on ``images`` and write its int8 scales to ``out``.

    Returns the written path. The file records the weights' SHA-256, the images and the settings.
    """
    import numpy as np
    import torch

    from .embedding import Embedder
    from .io import read_image
    from .networks.int8 import calibrate, save_qparams

    if model.spec.arch != "sam-lite":
        raise InputError(f"{model.model_id}: int8 calibration needs a sam-lite model (this one is {model.spec.arch})")
    emb = Embedder(model, "cpu", precision="fp32")

    def inputs():
        for n, path in enumerate(images):
            if progress:
                progress(n, len(images), f"calibrating on {path.name}")
            arr = emb._prepare(read_image(path))[0]
            yield torch.from_numpy(np.ascontiguousarray(arr))[None, None]

    qp = calibrate(emb.net, inputs(), settings.quantile)
    if progress:
        progress(len(images), len(images), "calibrated")
    meta = {"model_id": model.model_id, "sha256": model.sha256, "images": [p.name for p in images],
            "quantile": settings.quantile, "seed": settings.seed, "exclude": list(settings.exclude)}
    save_qparams(out, qp, meta)
    log.info("wrote %s (%d maps, %d images)", out, len(qp), len(images))
    return out
