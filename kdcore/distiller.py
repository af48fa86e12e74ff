"""The distiller: a student, its training-only projection heads and the weighted loss terms.

``Distiller(student, pairs, losses, ...)`` computes ``(total, parts)`` from a batch and the teacher's
features, wherever those came from (an in-process teacher, the teacher deployment's stream, the Zarr
cache). ``total = sum(weight * term)``; the task cross-entropy only counts the batch's labeled rows.
Heads live here, not on the student, so the exported student carries none.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdcore import losses as L
from kdcore.projectors import build_projector
from kdcore.spec.losses import LossSpec
from kdcore.spec.projector import PairSpec
from kdcore.taps import FeatureTaps
from kdcore.teacher import LOGITS

# Terms computed on features after the pair's heads (the rest take raw features or logits).
HEADED = {"hint", "cosine", "pkt", "sp", "rkd", "infonce"}

_FEATURE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "hint": lambda s, t, p: L.hint_mse(s, t, half=p.half),
    "cosine": lambda s, t, p: L.cosine_distance(s, t),
    "pkt": lambda s, t, p: L.pkt(s, t, eps=p.eps),
    "sp": lambda s, t, p: L.similarity_preserving(s, t),
    "rkd": lambda s, t, p: L.rkd(s, t, distance_weight=p.distance_weight, angle_weight=p.angle_weight),
    "infonce": lambda s, t, p: L.info_nce(s, t, temperature=p.temperature, normalize=p.normalize),
    "at": lambda s, t, p: L.attention_transfer(s, t, p=p.p),
}


def term_name(loss: LossSpec) -> str:
    pair = getattr(loss, "pair", None)
    return f"{loss.kind}/{pair}" if pair else loss.kind


def _flat(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


class Distiller(nn.Module):
    """Student + heads + loss terms.

    Args:
        student: the model being trained.
        pairs: student <-> teacher layer pairs (``student.pairs`` of the spec).
        losses: loss terms (``losses`` of the spec).
        student_shapes / teacher_shapes: per-sample feature shapes by layer name (no batch dim), used to
            size the heads; get them with :func:`probe_shapes`.
        n_data: training rows (CRD's memory bank size).
        bank_factory: optional ``(n, dim, momentum, dtype) -> bank`` for CRD (e.g. a Ray actor proxy).
        seed: seed of CRD's bank initialisation.
    """

    def __init__(self, student: nn.Module, pairs: list[PairSpec], losses: list[LossSpec],
                 student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]],
                 n_data: int, bank_factory: Callable | None = None, seed: int = 0) -> None:
        super().__init__()
        self.student = student
        self.pairs = {p.name: p for p in pairs}
        self.losses = list(losses)
        self.student_layers = list(dict.fromkeys(p.student for p in pairs))
        self._taps = FeatureTaps(student, self.student_layers)  # validated once, entered per forward
        self.heads_s = nn.ModuleDict()
        self.heads_t = nn.ModuleDict()
        self.crd = nn.ModuleDict()
        for loss in self.losses:
            pair_name = getattr(loss, "pair", None)
            if pair_name is None:
                continue
            pair = self.pairs[pair_name]
            s_shape, t_shape = tuple(student_shapes[pair.student]), tuple(teacher_shapes[pair.teacher])
            if loss.kind == "crd":
                prm = loss.params
                bank = None
                if bank_factory is not None:
                    bank = bank_factory(n_data, prm.feat_dim, prm.momentum, prm.bank_dtype)
                self.crd[pair_name] = L.CRDLoss(
                    _flat(s_shape), _flat(t_shape), feat_dim=prm.feat_dim, n_data=None if bank else n_data,
                    nce_k=prm.nce_k, temperature=prm.temperature, momentum=prm.momentum, objective=prm.objective,
                    negatives=prm.negatives, bank=bank, bank_dtype=torch.float16 if prm.bank_dtype == "fp16"
                    else torch.float32, seed=seed)
            elif loss.kind in HEADED and pair_name not in self.heads_s:
                self._build_heads(pair, s_shape, t_shape)

    def _build_heads(self, pair: PairSpec, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        spec = pair.projector
        if spec.kind == "conv":
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ValueError(f"pair {pair.name!r}: a conv head needs feature maps (C, H, W) on both sides, got "
                                 f"student {s_shape} and teacher {t_shape}; use kind linear or mlp")
            out = spec.out_dim or t_shape[0] if spec.sides == "student" else spec.out_dim or 128
            self.heads_s[pair.name] = build_projector(spec, s_shape[0], out, in_hw=s_shape[1:], out_hw=t_shape[1:])
            if spec.sides == "both":
                self.heads_t[pair.name] = build_projector(spec, t_shape[0], out, in_hw=t_shape[1:], out_hw=t_shape[1:])
            return
        d_s, d_t = _flat(s_shape), _flat(t_shape)
        out = spec.resolved_out_dim(d_t)
        self.heads_s[pair.name] = build_projector(spec, d_s, out)
        if spec.sides == "both":
            self.heads_t[pair.name] = build_projector(spec, d_t, out)

    def head_parameters(self):
        """Parameters of the training-only parts (heads, CRD embeddings), excluding the student."""
        for module in (self.heads_s, self.heads_t, self.crd):
            yield from module.parameters()

    def forward(self, x: torch.Tensor, teacher: dict[str, torch.Tensor], y: torch.Tensor | None = None,
                labeled: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                crd_inputs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
                update_bank: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One batch.

        Args:
            x: (B, ...) student inputs. teacher: ``{layer: (B, ...), "logits": (B, C)}``.
            y: (B,) int64 labels; labeled: (B,) bool, rows whose label the task loss may use.
            idx: (B,) int64 training-row indices (CRD's bank rows).
            crd_inputs: per CRD pair, bank rows fetched ahead by a remote bank: ``{"negatives": (neg_s, neg_t),
                "positives": (pos_s, pos_t)}`` (K x d and B x d).
            update_bank: apply CRD's bank update now; when False, collect it with :meth:`crd_updates`.
        Returns:
            (total 0-d, {term: detached 0-d value}, student logits (B, C)).
        """
        with self._taps as taps:
            logits = self.student(x)
            feats = dict(taps.features)
        total = logits.sum() * 0.0  # every student output takes part in the graph (DDP needs no unused params)
        parts: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            value = self._term(loss, logits, feats, teacher, y, labeled, idx, crd_inputs, update_bank)
            if value is None:
                continue
            parts[term_name(loss)] = value.detach()
            total = total + loss.weight * value
        return total, parts, logits

    def crd_updates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The ``(idx, v_s, v_t)`` bank update of each CRD pair from the last ``update_bank=False`` forward."""
        out = {}
        for name, crd in self.crd.items():
            u = crd.pending_update()
            if u is not None:
                out[name] = u
        return out

    def _term(self, loss, logits, feats, teacher, y, labeled, idx, crd_inputs, update_bank):
        kind = loss.kind
        if kind == "ce":
            if y is None:
                return None
            mask = labeled if labeled is not None else torch.ones_like(y, dtype=torch.bool)
            if not bool(mask.any()):
                return None  # a batch with no labels has no task term
            return F.cross_entropy(logits[mask], y[mask], label_smoothing=loss.params.label_smoothing)
        if kind == "kd":
            return L.kd_kl(logits, teacher[LOGITS].to(logits.dtype), loss.params.temperature)
        pair = self.pairs[loss.pair]
        f_s, f_t = feats[pair.student], teacher[pair.teacher].to(logits.dtype)
        if kind == "crd":
            if idx is None:
                raise ValueError("crd needs the batch's training-row indices (idx)")
            given = (crd_inputs or {}).get(loss.pair, {})
            return self.crd[loss.pair](f_s.flatten(1), f_t.flatten(1), idx, negatives=given.get("negatives"),
                                       positives=given.get("positives"), update_bank=update_bank)
        if kind == "at":
            return _FEATURE_LOSSES["at"](f_s, f_t, loss.params)
        z_s = self.heads_s[loss.pair](f_s)
        z_t = self.heads_t[loss.pair](f_t) if loss.pair in self.heads_t else f_t
        if z_s.dim() > 2 and z_s.shape != z_t.shape:
            raise ValueError(f"pair {loss.pair!r}: projected student {tuple(z_s.shape)} vs teacher {tuple(z_t.shape)}")
        if z_s.dim() != z_t.dim():
            z_s, z_t = z_s.flatten(1), z_t.flatten(1)
        return _FEATURE_LOSSES[kind](z_s, z_t, loss.params)


@torch.no_grad()
def probe_shapes(model: nn.Module, layers: list[str], sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes of ``layers`` (and ``"logits"``) from one forward on ``sample`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, [n for n in layers if n != LOGITS], detach=True) as taps:
            out = model(sample)
            shapes = {k: tuple(v.shape[1:]) for k, v in taps.features.items()}
    finally:
        model.train(was_training)
    shapes[LOGITS] = tuple(out.shape[1:])
    return shapes
