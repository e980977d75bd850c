"""Training objectives selectable with ``--objective`` (``sam``, or weighted sums like ``sam+isimed:0.5``)."""

from __future__ import annotations

from ..errors import InputError

OBJECTIVES = ("sam",)


def parse_objective(text: str) -> list[tuple[str, float]]:
    """``"sam+isimed:0.5"`` -> ``[("sam", 1.0), ("isimed", 0.5)]``; unknown names raise InputError."""
    terms = []
    for part in text.split("+"):
        name, _, weight = part.strip().partition(":")
        if name not in OBJECTIVES:
            raise InputError(f"unknown objective '{name}'; choose from {', '.join(OBJECTIVES)}")
        terms.append((name, float(weight) if weight else 1.0))
    return terms


def combined_loss(trainer, views, loc, glob, gen, rng):
    """Weighted sum of the configured objectives; returns (loss, stats)."""
    total, stats = None, {}
    for name, weight in parse_objective(trainer.cfg.objective):
        if name == "sam":
            loss, s = trainer.sam_loss(views, loc, glob, gen, rng)
        stats.update(s)
        total = weight * loss if total is None else total + weight * loss
    return total, stats
