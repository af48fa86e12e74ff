"""Cosine distance between student and teacher features.

The feature-direction matching term used e.g. in Sanh et al., "DistilBERT", 2019 (cosine
embedding loss on hidden states).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, flat, same_shape


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b cos(s_b, t_b)`` with each sample flattened to a vector.

    ``cos(u, v) = <u, v> / (max(||u||, 1e-8) * max(||v||, 1e-8))`` (``F.cosine_similarity``),
    so a zero vector has similarity 0. The result lies in [0, 2].

    Args:
        student: B x ... .
        teacher: same shape as ``student``.

    Returns:
        0-d tensor.
    """
    same_shape("cosine", student, teacher)
    if student.dim() < 1:
        raise ValueError("cosine: inputs need a batch dimension, got scalars")
    s, t = common_float("cosine", student, teacher)
    return 1.0 - F.cosine_similarity(flat(s), flat(t), dim=1, eps=1e-8).mean()


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``)."""
    return cosine_distance(inp.student, inp.teacher)
