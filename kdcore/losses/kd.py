"""Hinton knowledge distillation on logits.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, positive, same_shape
from kdcore.losses._logits import maybe_standardize


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target KL divergence, scaled by T^2 (RepDistiller's ``DistillKL``).

    ``loss = T^2 / B * sum_b sum_c p_t[b, c] * (log p_t[b, c] - log p_s[b, c])`` with
    ``p = softmax(logits / T)`` over classes: KL(teacher || student) summed over classes and
    samples, divided by the batch size. The T^2 factor keeps gradient magnitudes comparable
    across temperatures (Hinton et al. 2015, section 2).

    Args:
        student_logits: B x C.
        teacher_logits: B x C (gradients flow into it too if it requires grad; detach a
            frozen teacher yourself).
        temperature: T > 0.

    Returns:
        0-d tensor in the common floating dtype of the inputs.
    """
    same_shape("kd", student_logits, teacher_logits)
    if student_logits.dim() != 2:
        raise ValueError(f"kd: logits must be B x C, got student {tuple(student_logits.shape)} "
                         f"and teacher {tuple(teacher_logits.shape)}")
    t = positive("kd temperature", temperature)
    s, te = common_float("kd", student_logits, teacher_logits)
    log_p_s = F.log_softmax(s / t, dim=1)
    log_p_t = F.log_softmax(te / t, dim=1)
    # log_target=True: identical to kl_div(log p_s, p_t) but exact where p_t underflows.
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * (t * t) / s.shape[0]


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``); ``logit_stand`` z-scores both sides first."""
    s, t = maybe_standardize(inp.student, inp.teacher, inp.params.logit_stand)
    return kd_kl(s, t, inp.params.temperature)
