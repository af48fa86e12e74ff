"""Similarity-preserving knowledge distillation.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (RepDistiller ``Similarity``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, flat, same_batch


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of row-normalised batch Gram matrices, over B^2.

    ``G = f f^T`` (B x B, f flattened to B x d), each row divided by its L2 norm
    (``F.normalize``, eps 1e-12); ``loss = ||G_t - G_s||_F^2 / B^2``.

    Args:
        student: B x ... (feature sizes of the two sides may differ).
        teacher: B x ... .

    Returns:
        0-d tensor.
    """
    same_batch("sp", student, teacher, min_dim=2)
    s, t = common_float("sp", flat(student), flat(teacher))
    g_s = F.normalize(s @ s.t(), p=2, dim=1)
    g_t = F.normalize(t @ t.t(), p=2, dim=1)
    b = s.shape[0]
    return (g_t - g_s).pow(2).sum() / (b * b)


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``)."""
    return similarity_preserving(inp.student, inp.teacher)
