"""Embedding networks behind one interface (:class:`EmbeddingNet`): ``sam-lite`` and ``sam-official``."""

from __future__ import annotations

from .base import EmbeddingNet, NetSpec
from .lite import SamLite
from .official import SamOfficial

ARCHITECTURES = ("sam-lite", "sam-lite-2d", "sam-official")


def build_network(arch: str, config: dict | None = None) -> EmbeddingNet:
    """Build an untrained network by architecture name, with optional constructor arguments."""
    from ..errors import InputError

    config = dict(config or {})
    if arch == "sam-lite":
        config.setdefault("ndim", 3)
        return SamLite(**config)
    if arch == "sam-lite-2d":
        config["ndim"] = 2
        return SamLite(**config)
    if arch == "sam-official":
        return SamOfficial(**config)
    raise InputError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")


__all__ = ["ARCHITECTURES", "EmbeddingNet", "NetSpec", "SamLite", "SamOfficial", "build_network"]
