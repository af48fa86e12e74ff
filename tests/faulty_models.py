"""Models that misbehave on purpose, for fault tests (importable as ``tests.faulty_models:...``)."""

from __future__ import annotations

import torch

from kdcore.zoo import DigitsCNN


class NaNAfter(DigitsCNN):
    """A digits CNN whose training-mode forward returns NaN logits from its ``after``-th call on."""

    def __init__(self, width: int = 4, after: int = 10) -> None:
        super().__init__(width)
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def nan_after(width: int = 4, after: int = 10) -> NaNAfter:
    return NaNAfter(width, after)
