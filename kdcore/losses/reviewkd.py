"""Knowledge review: attention-based fusion (ABF) of the student's stages and the hierarchical context loss.

Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (reference: mdistiller
``ReviewKD``). The fusion blocks are a training-only module held by the distiller. Stages are given
shallow to deep (the spec's ``pairs``); the deepest student stage is fused first and each shallower
stage is fused with the (resized) result of the one below it. Batch norms inside the blocks use batch
statistics in training mode. The warm-up (``min(epoch / 20, 1)`` in mdistiller) is the distiller's
``params.warmup_epochs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = (4, 2, 1)


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over stages.

    Per stage (B x C x H x W on both sides): ``(mse(s, t) + sum_k w_k mse(pool_k(s), pool_k(t))) / (1 + sum_k w_k)``
    over the pooled sizes k in (4, 2, 1) smaller than H, ``w = 1/2, 1/4, 1/8`` in that order (skipped
    sizes take no weight); ``mse`` is the element mean, ``pool_k`` adaptive average pooling to k x k.

    Returns:
        0-d tensor.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"reviewkd: {len(student)} student and {len(teacher)} teacher stages")
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"reviewkd: fused student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        loss, weight, w = F.mse_loss(s, t), 1.0, 1.0
        for k in LEVELS:
            if k >= s.shape[2]:
                continue
            w /= 2.0
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(s, k), F.adaptive_avg_pool2d(t, k))
            weight += w
        total = total + loss / weight
    return total


class ABF(nn.Module):
    """One fusion block: 1x1 conv + BN to ``mid`` channels; with a deeper input, a 2-channel sigmoid
    attention mixes the two; resize to the teacher's size (nearest); 3x3 conv + BN to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.out = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None, out_hw: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: B x C_in x H x W; deeper: the previous block's mid-channel map (any size) or None.
        Returns (B x C_out x out_hw, the mid-channel map at out_hw passed to the next block)."""
        x = self.reduce(x)
        if self.att is not None:
            if deeper is None:
                raise ValueError("reviewkd: a fusing block needs the deeper stage's map")
            deeper = F.interpolate(deeper, tuple(x.shape[2:]), mode="nearest")
            a = self.att(torch.cat([x, deeper], dim=1))
            x = x * a[:, :1] + deeper * a[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_hw):
            x = F.interpolate(x, tuple(out_hw), mode="nearest")
        return self.out(x), x


class ReviewFusion(nn.Module):
    """The ABF blocks of every stage (``blocks[i]`` for stage i, shallow to deep)."""

    def __init__(self, student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]],
                 mid_channels: int = 512) -> None:
        super().__init__()
        for s, t in zip(student_shapes, teacher_shapes):
            if len(s) != 3 or len(t) != 3:
                raise ValueError(f"reviewkd: every stage needs (C, H, W) maps, got student {s} and teacher {t}")
        mid = min(int(mid_channels), int(student_shapes[-1][0]))
        n = len(student_shapes)
        self.out_hw = [tuple(int(v) for v in t[1:]) for t in teacher_shapes]
        self.blocks = nn.ModuleList(ABF(s[0], mid, t[0], i < n - 1)
                                    for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student stages shallow to deep -> fused maps shaped as the teacher's stages, shallow to deep."""
        out: list[torch.Tensor] = [None] * len(feats)  # type: ignore[list-item]
        deeper = None
        for i in reversed(range(len(feats))):
            out[i], deeper = self.blocks[i](feats[i], deeper, self.out_hw[i])
        return out


def build(ctx) -> ReviewFusion:
    """Distiller adapter (``kdcore.losses.registry.BuildContext``)."""
    return ReviewFusion([tuple(s) for s in ctx.student_shape], [tuple(t) for t in ctx.teacher_shape],
                        ctx.spec.params.mid_channels)


def term(inp) -> torch.Tensor:
    """Distiller adapter: fuse the student's stages, HCL against the teacher's raw maps."""
    return hcl_loss(inp.module(inp.student), inp.teacher)
