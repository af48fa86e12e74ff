"""DIST: knowledge distillation from a stronger teacher.

Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(reference: hunto/image_classification_sota ``lib/models/losses/dist_kd.py``).
"""

from __future__ import annotations

import torch

from kdcore.losses._checks import common_float, positive, same_shape
from kdcore.losses._logits import maybe_standardize

EPS = 1e-8


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: (N, M) x (N, M) -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * (beta * (1 - mean_b rho(y_s[b], y_t[b])) + gamma * (1 - mean_c rho(y_s[:, c], y_t[:, c])))``.

    ``y = softmax(z / tau)`` over classes; ``rho`` is the Pearson correlation (eps 1e-8 added to the
    product of norms). The first (inter-class) term correlates each sample's class distribution; the
    second (intra-class) correlates each class's column over the batch.

    Args:
        student_logits: B x C. teacher_logits: B x C (pass them detached).
        beta, gamma: term weights. tau: temperature > 0.

    Returns:
        0-d tensor (a mean over rows / columns: no further batch reduction).
    """
    same_shape("dist", student_logits, teacher_logits)
    if student_logits.dim() != 2:
        raise ValueError(f"dist: logits must be B x C, got {tuple(student_logits.shape)}")
    tau = positive("dist tau", tau)
    s, t = common_float("dist", student_logits, teacher_logits)
    y_s, y_t = (s / tau).softmax(dim=1), (t / tau).softmax(dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return tau * tau * (beta * inter + gamma * intra)


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``); ``logit_stand`` z-scores both sides first."""
    p = inp.params
    s, t = maybe_standardize(inp.student, inp.teacher, p.logit_stand)
    return dist_loss(s, t, p.beta, p.gamma, p.tau)
