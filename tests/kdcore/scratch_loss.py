"""A loss defined outside kdcore, registered through the one loss table (used by test_registry.py).

Everything a new loss needs is here: the math, its spec model and its one table entry.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdcore.losses.registry import LossEntry, register_loss
from kdcore.spec.base import Spec


def l1_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference, B x d and B x d -> 0-d."""
    return (student - teacher).abs().mean() * CALLS.setdefault("scale", 1.0)


CALLS: dict = {"n": 0}


def term(inp) -> torch.Tensor:
    CALLS["n"] += 1
    return l1_distance(inp.student, inp.teacher) ** inp.params.power


class ScratchParams(Spec):
    """Parameters of the scratch loss."""

    power: float = Field(default=1.0, gt=0.0, description="Exponent applied to the mean absolute difference.")


class ScratchL1LossSpec(Spec):
    """A test-only loss: L1 between projected student and teacher features."""

    kind: Literal["scratch_l1"] = Field(description="Loss kind: the test-only L1 loss.")
    weight: float = Field(default=1.0, ge=0.0, description="Weight of this term in the total loss (>= 0).")
    pair: str = Field(description="Name of the layer pair this term compares.")
    params: ScratchParams = Field(default_factory=ScratchParams, description="Scratch loss parameters.")


ENTRY = register_loss(LossEntry("scratch_l1", ScratchL1LossSpec, "pair", term, headed=True, ranks={2}),
                      replace=True)
