"""Decoupled knowledge distillation.

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (reference: mdistiller
``DKD``). The warm-up (``min(epoch / 20, 1)`` in the authors' recipe) is not part of the loss: the
distiller applies ``params.warmup_epochs`` (see :func:`kdcore.losses.registry.warmup_factor`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, positive, same_shape
from kdcore.losses._logits import at_target, maybe_standardize, non_target, target_classes, target_mask


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD``, each a KL(teacher || student) summed over rows, times T^2 / B.

    With ``p = softmax(z / T)`` over all C classes and ``g`` the target class of a row:

    * TCKD: KL between the binary distributions ``(p_g, 1 - p_g)`` of teacher and student;
    * NCKD: KL between ``softmax`` over the C - 1 non-target classes only (target column removed).

    Args:
        student_logits: B x C.
        teacher_logits: B x C (not detached here: pass a frozen teacher's logits, as the distiller does).
        target: (B,) int64, the class treated as the target of each row.
        alpha, beta: term weights (>= 0). temperature: T > 0.

    Returns:
        0-d tensor; gradients reach both logit tensors where they require grad.
    """
    same_shape("dkd", student_logits, teacher_logits)
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"dkd: logits must be B x C with C >= 2, got {tuple(student_logits.shape)}")
    t = positive("dkd temperature", temperature)
    s, te = common_float("dkd", student_logits, teacher_logits)
    b = s.shape[0]
    gt = target_mask(s, target)
    log_s, log_t = F.log_softmax(s / t, dim=1), F.log_softmax(te / t, dim=1)
    # binary (target, rest) log-probabilities, in log space
    bin_s = torch.stack([at_target(log_s, target), torch.logsumexp(log_s.masked_fill(gt, float("-inf")), 1)], 1)
    bin_t = torch.stack([at_target(log_t, target), torch.logsumexp(log_t.masked_fill(gt, float("-inf")), 1)], 1)
    tckd = F.kl_div(bin_s, bin_t, reduction="sum", log_target=True)
    # the non-target classes alone: drop the target column, renormalise
    rest_s = F.log_softmax(non_target(s / t, target), dim=1)
    rest_t = F.log_softmax(non_target(te / t, target), dim=1)
    nckd = F.kl_div(rest_s, rest_t, reduction="sum", log_target=True)
    return (alpha * tckd + beta * nckd) * (t * t) / b


def term(inp) -> torch.Tensor:
    """Distiller adapter: targets from the labels (teacher arg-max on unlabeled rows), optional logit_stand."""
    p = inp.params
    target = target_classes(inp.teacher, inp.labels, inp.labeled, p.target)
    s, t = maybe_standardize(inp.student, inp.teacher, p.logit_stand)
    return dkd_loss(s, t, target, p.alpha, p.beta, p.temperature)
