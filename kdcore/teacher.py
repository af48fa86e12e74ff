"""Running a teacher: eval mode, no grad, tapped layers + logits, optional autocast.

The same runner serves the online mode (in a training worker), the Serve replicas and cache builds,
so every path computes identical features.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdcore.taps import FeatureTaps

LOGITS = "logits"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TeacherRunner:
    """Call with a batch of inputs; returns ``{tap: tensor, "logits": tensor}`` in float32 on CPU."""

    def __init__(self, model: nn.Module, taps: list[str], precision: str = "fp32", device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.taps = list(dict.fromkeys(t for t in taps if t != LOGITS))
        self.precision = precision
        self.forwards = 0  # teacher forward passes run (tests count them)
        self.rows = 0
        # validates tap names eagerly (raises LayerNotFoundError with the closest names)
        self._taps = FeatureTaps(self.model, self.taps, detach=True)

    def _autocast(self):
        if self.precision == "fp32" or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=_DTYPES[self.precision])

    def shapes(self, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of every tap and the logits, from one forward on ``sample`` (a probe: it is not
        counted in ``forwards``/``rows``)."""
        forwards, rows = self.forwards, self.rows
        out = self(sample)
        self.forwards, self.rows = forwards, rows
        return {k: tuple(int(d) for d in v.shape[1:]) for k, v in out.items()}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        with self._taps as taps, self._autocast():
            logits = self.model(x)
            feats = dict(taps.features)
        self.forwards += 1
        self.rows += len(x)
        out = {name: t.float().cpu() for name, t in feats.items()}
        out[LOGITS] = logits.float().cpu()
        return out
