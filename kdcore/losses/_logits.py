"""Helpers shared by the losses on logits: logit standardisation and the target class of each row."""

from __future__ import annotations

import torch

STAND_EPS = 1e-7


def standardize_logits(logits: torch.Tensor, eps: float = STAND_EPS) -> torch.Tensor:
    """Z-score each sample's logits: ``(z - mean_c z) / (std_c z + eps)``, B x C -> B x C.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024: applied to student and
    teacher logits before the temperature. ``std`` is the unbiased (C - 1) standard deviation over
    classes, as in the authors' code; eps is added to the deviation, not the variance.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def maybe_standardize(student: torch.Tensor, teacher: torch.Tensor, on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides standardised when ``on`` (the ``logit_stand`` option), else unchanged."""
    if not on:
        return student, teacher
    return standardize_logits(student), standardize_logits(teacher)


def target_classes(teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                   labeled: torch.Tensor | None, source: str = "label") -> torch.Tensor:
    """The target class of each row for losses that split target / non-target classes (DKD, NKD).

    ``source="label"``: the row's label where it is labeled (all rows when ``labeled`` is None), the
    teacher's arg-max elsewhere (a transfer set's unlabeled rows, or a batch without labels);
    ``source="teacher"``: always the teacher's arg-max. Returns (B,) int64.
    """
    top = teacher_logits.argmax(dim=1)
    if source == "teacher" or labels is None:
        return top
    labels = labels.to(top.device, torch.long)
    if labeled is None:
        return labels
    return torch.where(labeled.to(top.device), labels, top)


def target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) bool, True at each row's target class."""
    index = target.reshape(-1, 1).to(device=logits.device, dtype=torch.long)
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, index, True)


def at_target(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B,): each row's value at its target class."""
    return x.gather(1, target.reshape(-1, 1).to(device=x.device, dtype=torch.long)).squeeze(1)


def non_target(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C - 1): each row without its target column, the other classes in order."""
    b, c = x.shape
    cols = torch.arange(c - 1, device=x.device).expand(b, c - 1)
    cols = cols + (cols >= target.reshape(-1, 1).to(device=x.device, dtype=torch.long)).long()
    return x.gather(1, cols)
