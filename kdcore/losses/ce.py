"""The task cross-entropy, on the labeled rows of the batch only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_ce(logits: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor | None = None,
            label_smoothing: float = 0.0) -> torch.Tensor | None:
    """Mean cross-entropy over the rows with ``labeled`` True (all rows when None).

    Args:
        logits: B x C student logits. labels: (B,) int64. labeled: (B,) bool or None.
        label_smoothing: in [0, 1).

    Returns:
        0-d tensor, or None when no row is labeled (the batch has no task term).
    """
    mask = labeled if labeled is not None else torch.ones_like(labels, dtype=torch.bool)
    if not bool(mask.any()):
        return None
    return F.cross_entropy(logits[mask], labels[mask], label_smoothing=label_smoothing)


def term(inp) -> torch.Tensor | None:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``); no labels: no term."""
    if inp.labels is None:
        return None
    return task_ce(inp.student, inp.labels, inp.labeled, inp.params.label_smoothing)
