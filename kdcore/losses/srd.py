"""SRD-style feature distillation: a linear map and non-affine batch norm on both sides.

Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024
(reference: roymiles/Simple-Recipe-Distillation, ``imagenet/torchdistill/losses/single.py``,
the ImageNet loss). The linear map is a training-only module held by the distiller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.losses._checks import common_float, positive, same_batch


def pooled(f: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x C (spatial mean, as the authors pool the last stage); B x d unchanged; else flattened."""
    if f.dim() == 4:
        return f.mean(dim=(2, 3))
    return f.reshape(f.shape[0], -1)


def srd_loss(student: torch.Tensor, teacher: torch.Tensor, power: float = 4.0, bn_eps: float = 1e-4) -> torch.Tensor:
    """``log(sum_{b,d} |bn(s)[b, d] - bn(t)[b, d]|^p)``: a soft maximum of the normalised differences.

    ``bn`` is a non-affine batch norm with batch statistics (biased variance, ``bn_eps`` added to it),
    applied to each side independently; ``student`` is already mapped into the teacher's space.

    Args:
        student: B x d (the linear map's output). teacher: B x d (pass it detached). B >= 2.
        power: p > 0. bn_eps: > 0.

    Returns:
        0-d tensor (no batch mean: the log of a sum over the batch and features).
    """
    same_batch("srd", student, teacher, min_dim=2)
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"srd: needs B x d on both sides, got student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] < 2:
        raise ValueError("srd: batch norm needs at least 2 rows")
    p, eps = positive("srd power", power), positive("srd bn_eps", bn_eps)
    s, t = common_float("srd", student, teacher)
    s = F.batch_norm(s, None, None, training=True, eps=eps)
    t = F.batch_norm(t, None, None, training=True, eps=eps)
    return torch.log((s - t).abs().pow(p).sum())


class SRDMap(nn.Module):
    """``W pooled(f_s) + b``: the student (d_s) -> teacher (d_t) linear map."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled(f))


def _dim(shape: tuple[int, ...]) -> int:
    if len(shape) == 3:
        return int(shape[0])
    n = 1
    for v in shape:
        n *= int(v)
    return n


def build(ctx) -> SRDMap:
    """Distiller adapter (``kdcore.losses.registry.BuildContext``)."""
    return SRDMap(_dim(tuple(ctx.student_shape)), _dim(tuple(ctx.teacher_shape)))


def term(inp) -> torch.Tensor:
    """Distiller adapter: maps are averaged over space on both sides, the student goes through the map."""
    p = inp.params
    return srd_loss(inp.module(inp.student), pooled(inp.teacher), p.power, p.bn_eps)
