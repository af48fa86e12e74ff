"""Attention transfer.

Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (RepDistiller ``Attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, same_batch


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """B x C x H x W -> B x (H*W): ``normalize(mean_c f^p)`` (L2, eps 1e-12)."""
    return F.normalize(f.pow(p).mean(dim=1).reshape(f.shape[0], -1), p=2, dim=1)


def attention_transfer(student_map: torch.Tensor, teacher_map: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Mean squared difference of normalised spatial attention maps.

    ``loss = mean((a(s) - a(t))^2)`` over B x (H*W), ``a(f) = normalize(f.pow(p).mean(1).view(B, -1))``.
    Channel counts may differ. When spatial sizes differ, the larger map is adaptive-average-pooled
    to the smaller size (per axis; the reference pools square maps by height).

    Args:
        student_map: B x C_s x H_s x W_s.
        teacher_map: B x C_t x H_t x W_t.
        p: power applied before the channel mean (paper: 2).

    Returns:
        0-d tensor.
    """
    same_batch("at", student_map, teacher_map, min_dim=4)
    if student_map.dim() != 4 or teacher_map.dim() != 4:
        raise ValueError(f"at: feature maps must be B x C x H x W, got student {tuple(student_map.shape)} "
                         f"and teacher {tuple(teacher_map.shape)}")
    s, t = common_float("at", student_map, teacher_map)
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``): the raw student and teacher maps."""
    return attention_transfer(inp.student, inp.teacher, p=inp.params.p)
