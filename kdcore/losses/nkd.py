"""Normalised knowledge distillation (NKD).

Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge Distillation: A
Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023 (reference:
yzd-v/cls_KD ``mmcls/models/dis_losses/nkd.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, positive, same_shape
from kdcore.losses._logits import at_target, maybe_standardize, non_target, target_classes


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             temperature: float = 1.0, gamma: float = 1.5) -> torch.Tensor:
    """``-mean_b(q_t[b, g] * log p_s[b, g]) - gamma * T^2 * mean_b sum_{c != g} q^T_t[b, c] log q^T_s[b, c]``.

    ``p = softmax(z)`` at temperature 1 for the target term, whose teacher probability ``q_t[b, g]``
    is detached; ``q^T = softmax(z / T)`` over the C - 1 non-target classes only (the normalised
    non-target distributions). Both terms are means over the B rows.

    Args:
        student_logits: B x C. teacher_logits: B x C (pass them detached).
        target: (B,) int64 target class of each row. temperature: T > 0. gamma: non-target weight.

    Returns:
        0-d tensor.
    """
    same_shape("nkd", student_logits, teacher_logits)
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"nkd: logits must be B x C with C >= 2, got {tuple(student_logits.shape)}")
    t = positive("nkd temperature", temperature)
    s, te = common_float("nkd", student_logits, teacher_logits)
    target_term = -(at_target(F.softmax(te, dim=1), target).detach() * at_target(F.log_softmax(s, dim=1), target)).mean()
    rest_s = F.log_softmax(non_target(s, target) / t, dim=1)
    rest_t = F.softmax(non_target(te, target) / t, dim=1)
    rest = (rest_t * rest_s).sum(dim=1).mean()
    return target_term - gamma * t * t * rest


def term(inp) -> torch.Tensor:
    """Distiller adapter: targets from the labels (teacher arg-max on unlabeled rows), optional logit_stand."""
    p = inp.params
    target = target_classes(inp.teacher, inp.labels, inp.labeled, p.target)
    s, t = maybe_standardize(inp.student, inp.teacher, p.logit_stand)
    return nkd_loss(s, t, target, p.temperature, p.gamma)
