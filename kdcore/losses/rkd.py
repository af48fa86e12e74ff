"""Relational knowledge distillation (distance and angle).

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (RepDistiller ``RKDLoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.losses._checks import common_float, flat, same_batch


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps)
    d = d2.sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distances(e)
    return d / d[d > 0].mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    # diff[i, j] = e_j - e_i ; unit vectors from anchor i; angles[i, j, k] = <u_ij, u_ik>.
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    u = F.normalize(diff, p=2, dim=2)
    return torch.bmm(u, u.transpose(1, 2)).reshape(-1)


def rkd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """``distance_weight * L_D + angle_weight * L_A``.

    Distance term: pairwise Euclidean distances (squared distances clamped at 1e-12 before the
    square root, diagonal set to 0), each matrix divided by the mean of its positive entries,
    ``L_D = smooth_l1(d_s, d_t)`` (beta 1, mean over B^2 entries).
    Angle term: for all triplets, ``cos`` of the angle at anchor i between ``e_j - e_i`` and
    ``e_k - e_i`` (B^3 values, zero vectors normalised to 0), ``L_A = smooth_l1(a_s, a_t)``.

    As in the reference, the teacher side is a constant: it is computed without gradient.
    Memory is O(B^3); keep B in the hundreds.

    Args:
        student: B x ... (feature sizes of the two sides may differ).
        teacher: B x ... .
        distance_weight: weight of L_D (paper: 25).
        angle_weight: weight of L_A (paper: 50).

    Returns:
        0-d tensor.
    """
    same_batch("rkd", student, teacher, min_dim=2)
    if student.shape[0] < 2:
        raise ValueError(f"rkd: needs at least 2 samples, got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")
    s, t = common_float("rkd", flat(student), flat(teacher))
    with torch.no_grad():
        t_d = _normalised_distances(t)
        t_a = _angles(t)
    loss_d = F.smooth_l1_loss(_normalised_distances(s), t_d)
    loss_a = F.smooth_l1_loss(_angles(s), t_a)
    return distance_weight * loss_d + angle_weight * loss_a


def term(inp) -> torch.Tensor:
    """Distiller adapter (``kdcore.losses.registry.TermInputs``)."""
    p = inp.params
    return rkd(inp.student, inp.teacher, distance_weight=p.distance_weight, angle_weight=p.angle_weight)
