"""Masked generative distillation (MGD).

Yang, Li, Shao, Zeng, Yuan & Yuan, "Masked Generative Distillation", ECCV 2022 (reference: yzd-v/MGD
and yzd-v/cls_KD ``MGDLoss``, the classification variant: a random *channel* mask per sample).
The generator (and the 1x1 alignment conv when channel counts differ) is a training-only module held
by the distiller, like a projection head; it is never part of the exported student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.losses._checks import common_float, same_batch


class MGDGenerator(nn.Module):
    """``align`` (1x1 conv C_s -> C_t, or none when C_s == C_t) then ``block``: conv3x3 - ReLU - conv3x3 on C_t."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                      if student_channels != teacher_channels else None)
        self.block = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1))

    def forward(self, student_map: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.align(student_map) if self.align is not None else student_map
        return self.block(x * keep)


def random_keep(student_map: torch.Tensor, channels: int, lambda_mgd: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, channels, 1, 1) mask: 0 with probability ``lambda_mgd``, else 1 (one draw per sample and channel)."""
    u = torch.rand((student_map.shape[0], channels, 1, 1), generator=generator, device=student_map.device)
    return (u >= lambda_mgd).to(student_map.dtype)


def mgd_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, generator: MGDGenerator,
             lambda_mgd: float = 0.15, alpha_mgd: float = 7e-5, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha_mgd * sum((G(align(s) * keep) - t)^2) / B``.

    Args:
        student_map: B x C_s x H x W. teacher_map: B x C_t x H x W (same H, W; pass it detached).
        generator: the :class:`MGDGenerator` for (C_s, C_t).
        lambda_mgd: mask ratio in [0, 1); ignored when ``keep`` is given.
        alpha_mgd: the authors' coefficient.
        keep: optional (B, C_t, 1, 1) 0/1 mask; default a fresh :func:`random_keep` draw (torch's global RNG).

    Returns:
        0-d tensor: a sum over channels and positions, a mean over the batch.
    """
    same_batch("mgd", student_map, teacher_map, min_dim=4)
    if student_map.dim() != 4 or teacher_map.dim() != 4 or student_map.shape[2:] != teacher_map.shape[2:]:
        raise ValueError(f"mgd: needs B x C x H x W maps of the same H, W; got student {tuple(student_map.shape)} "
                         f"and teacher {tuple(teacher_map.shape)}")
    s, t = common_float("mgd", student_map, teacher_map)
    if keep is None:
        keep = random_keep(s, t.shape[1], lambda_mgd)
    rebuilt = generator(s, keep.to(s.dtype))
    return alpha_mgd * F.mse_loss(rebuilt, t, reduction="sum") / s.shape[0]


def build(ctx) -> MGDGenerator:
    """Distiller adapter (``kdcore.losses.registry.BuildContext``): the pair's generator."""
    (c_s, *hw_s), (c_t, *hw_t) = ctx.student_shape, ctx.teacher_shape
    if hw_s != hw_t:
        raise ValueError(f"mgd: student map {tuple(ctx.student_shape)} and teacher map {tuple(ctx.teacher_shape)} "
                         "need the same spatial size; pair layers of equal resolution")
    return MGDGenerator(c_s, c_t)


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``)."""
    p = inp.params
    return mgd_loss(inp.student, inp.teacher, inp.module, p.lambda_mgd, p.alpha_mgd)
