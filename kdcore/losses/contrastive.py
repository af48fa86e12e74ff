"""In-batch contrastive loss (InfoNCE / NT-Xent).

van den Oord, Li & Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018;
Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR), ICML 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, flat, positive, same_shape


def info_nce(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 0.07, normalize: bool = True) -> torch.Tensor:
    """Student anchors, teacher positives, the other teacher rows of the batch as negatives.

    ``logits = z_s @ z_t^T / T`` (B x B), ``loss = cross_entropy(logits, arange(B))`` (mean),
    i.e. ``mean_i -log(exp(<s_i, t_i>/T) / sum_j exp(<s_i, t_j>/T))``. With ``normalize=True``
    both sides are L2-normalised first (cosine similarities).

    Args:
        z_s: B x d (or B x ..., flattened), projected student features.
        z_t: same shape as ``z_s``.
        temperature: T > 0.
        normalize: L2-normalise rows first.

    Returns:
        0-d tensor.
    """
    same_shape("infonce", z_s, z_t)
    if z_s.dim() < 2:
        raise ValueError(f"infonce: inputs must be B x d, got student {tuple(z_s.shape)} and teacher {tuple(z_t.shape)}")
    t = positive("infonce temperature", temperature)
    s, te = common_float("infonce", flat(z_s), flat(z_t))
    if normalize:
        s = F.normalize(s, dim=1)
        te = F.normalize(te, dim=1)
    logits = s @ te.t() / t
    targets = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits, targets)


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``)."""
    return info_nce(inp.student, inp.teacher, temperature=inp.params.temperature, normalize=inp.params.normalize)
