"""Probabilistic knowledge transfer.

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018. Conventions of RepDistiller's ``PKT`` (the authors' cosine-kernel variant).
"""

from __future__ import annotations

import torch

from kdcore.losses._checks import common_float, flat, same_batch


def _conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    k = (x @ x.t() + 1.0) / 2.0  # cosine kernel rescaled from [-1, 1] to [0, 1]
    return k / k.sum(dim=1, keepdim=True)


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL between the teacher's and the student's sample-similarity distributions.

    For each side: flatten to B x d, divide each row by ``(||x_b|| + eps)``, kernel
    ``K = (x x^T + 1) / 2``, rows normalised to probabilities ``P[i, j] = K[i, j] / sum_j K[i, j]``.
    ``loss = mean_{i,j} P_t[i, j] * log((P_t[i, j] + eps) / (P_s[i, j] + eps))`` (mean over the
    B^2 entries, as the reference; the diagonal is included).

    The reference also zeroes NaNs after normalisation; that only happens for NaN/inf inputs,
    which this function lets propagate instead of hiding.

    Args:
        student: B x ... (feature sizes of the two sides may differ).
        teacher: B x ... .
        eps: numerical floor.

    Returns:
        0-d tensor.
    """
    same_batch("pkt", student, teacher, min_dim=2)
    s, t = common_float("pkt", flat(student), flat(teacher))
    p_s = _conditional(s, eps)
    p_t = _conditional(t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``)."""
    return pkt(inp.student, inp.teacher, eps=inp.params.eps)
