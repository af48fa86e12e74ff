"""FitNets hint regression.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
"""

from __future__ import annotations

import torch

from kdcore.losses._checks import common_float, same_shape


def hint_mse(student: torch.Tensor, teacher: torch.Tensor, half: bool = False) -> torch.Tensor:
    """Squared error between (projected) student features and teacher features.

    ``half=False`` (RepDistiller's ``HintLoss``, ``nn.MSELoss()``): mean of ``(s - t)^2`` over
    every element, i.e. ``sum((s - t)^2) / numel``.

    ``half=True`` (the paper's ``1/2 ||u_h - r(v_g)||^2`` per sample, averaged over the batch):
    ``0.5 * sum((s - t)^2) / B``. Scales with the feature size, so weights differ from the
    default by a factor ``numel / (2 B)``.

    Args:
        student: B x ... (already mapped to the teacher's shape by a projector).
        teacher: same shape as ``student``.

    Returns:
        0-d tensor.
    """
    same_shape("hint", student, teacher)
    if student.dim() < 1:
        raise ValueError("hint: inputs need a batch dimension, got scalars")
    s, t = common_float("hint", student, teacher)
    sq = (s - t).pow(2)
    if half:
        return 0.5 * sq.sum() / s.shape[0]
    return sq.mean()


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``): projected student vs teacher features."""
    return hint_mse(inp.student, inp.teacher, half=inp.params.half)
