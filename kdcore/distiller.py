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
from torch import nn

from kdcore.losses import registry
from kdcore.losses.registry import BuildContext, TermInputs, logit_teacher, pair_names, term_name, warmup_factor
from kdcore.projectors import build_projector
from kdcore.spec.losses import LossSpec
from kdcore.spec.projector import PairSpec
from kdcore.taps import FeatureTaps
from kdcore.spec.roles import MEAN_TEACHER
from kdcore.teacher import LOGITS, feature_key, mean_logits

__all__ = ["Distiller", "probe_shapes", "term_name"]


def _flat(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def _module_key(loss: LossSpec) -> str:
    return term_name(loss).replace("/", "__").replace("+", "_")


class Distiller(nn.Module):
    """Student + heads + loss terms; what each term needs comes from the loss table
    (:mod:`kdcore.losses.registry`).

    Args:
        student: the model being trained.
        pairs: student <-> teacher layer pairs (``student.pairs`` of the spec).
        losses: loss terms (``losses`` of the spec).
        student_shapes / teacher_shapes: per-sample feature shapes by layer name (no batch dim), used to
            size the heads; get them with :func:`probe_shapes`.
        n_data: training rows (CRD's memory bank size).
        bank_factory: optional ``(n, dim, momentum, dtype) -> bank`` for CRD (e.g. a Ray actor proxy).
        seed: seed of CRD's bank initialisation.
        teachers: a multi-teacher job's teachers, ``{name: weight}`` in order (``JobSpec.teacher_weights()``);
            None for a single teacher. With several, teacher features and shapes are keyed ``"<teacher>/<layer>"``
            and ``"<teacher>/logits"``: a pair reads its ``teacher_model`` (default the first teacher), a logit
            term the logits of its ``teacher`` or, for ``mean`` (the default), the weight-normalised average.

    Training-only modules: ``heads_s`` / ``heads_t`` (projection heads, by pair), ``crd`` (memory-bank
    terms, by pair) and ``aux`` (every other term's own module, e.g. MGD's generator, by term).
    A term whose ``params.warmup_epochs`` > 0 (DKD, ReviewKD) is scaled by
    ``min((epoch + 1) / warmup_epochs, 1)``: the training loop calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, student: nn.Module, pairs: list[PairSpec], losses: list[LossSpec],
                 student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]],
                 n_data: int, bank_factory: Callable | None = None, seed: int = 0,
                 teachers: dict[str, float] | None = None) -> None:
        super().__init__()
        self.student = student
        self.teachers = None if teachers is None else {str(k): float(v) for k, v in teachers.items()}
        self.pairs = {p.name: p for p in pairs}
        self.losses = list(losses)
        self.entries = [registry.get(loss.kind) for loss in self.losses]
        self.epoch: int | None = None
        self.student_layers = list(dict.fromkeys(p.student for p in pairs))
        self._taps = FeatureTaps(student, self.student_layers)  # validated once, entered per forward
        self.heads_s = nn.ModuleDict()
        self.heads_t = nn.ModuleDict()
        self.crd = nn.ModuleDict()
        self.aux = nn.ModuleDict()
        for loss, entry in zip(self.losses, self.entries):
            names = pair_names(loss)
            if entry.needs == "logits" and self.teachers is not None:
                self._logits_shape(loss, teacher_shapes)  # the named teacher's logits exist; averaged ones agree
            s_shapes, t_shapes = [], []
            for name in names:
                pair = self.pairs[name]
                s_shape, t_shape = tuple(student_shapes[pair.student]), tuple(teacher_shapes[self._pair_key(pair)])
                where = f"loss {term_name(loss)}, pair {name!r}"
                registry.check_ranks(entry, "student", s_shape, where)
                registry.check_ranks(entry, "teacher", t_shape, where)
                s_shapes.append(s_shape)
                t_shapes.append(t_shape)
                if entry.headed and name not in self.heads_s:
                    self._build_heads(pair, s_shape, t_shape)
            if entry.build is None:
                continue
            if entry.needs == "pairs":
                s_arg, t_arg = s_shapes, t_shapes
            elif names:
                s_arg, t_arg = s_shapes[0], t_shapes[0]
            else:
                s_arg, t_arg = tuple(student_shapes[LOGITS]), self._logits_shape(loss, teacher_shapes)
            module = entry.make_module(BuildContext(loss, s_arg, t_arg, n_data, bank_factory, seed))
            if entry.needs == "bank":
                self.crd[names[0]] = module
            else:
                self.aux[_module_key(loss)] = module

    # -- which teacher feeds what (the one place for every pair and every logit term) -----------------
    def _pair_key(self, pair: PairSpec) -> str:
        """The key of a pair's teacher layer in the teacher features."""
        if self.teachers is None:
            return pair.teacher
        return feature_key(pair.teacher_model or next(iter(self.teachers)), pair.teacher)

    def _logit_source(self, loss: LossSpec) -> str | None:
        """A logit term's teacher: None (single teacher), a teacher's name, or ``mean``."""
        if self.teachers is None:
            return None
        return logit_teacher(loss) or MEAN_TEACHER

    def _logits_shape(self, loss: LossSpec, teacher_shapes: dict) -> tuple[int, ...]:
        source = self._logit_source(loss)
        if source is None:
            return tuple(teacher_shapes[LOGITS])
        if source != MEAN_TEACHER:
            return tuple(teacher_shapes[feature_key(source, LOGITS)])
        shapes = {n: tuple(teacher_shapes[feature_key(n, LOGITS)]) for n, w in self.teachers.items() if w > 0}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"loss {term_name(loss)}: averaged logits need one class count, but the teachers' "
                             f"logits are {shapes}; name one teacher (teacher: NAME)")
        return next(iter(shapes.values()))

    def _teacher_logits(self, loss: LossSpec, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        """What every logit term compares with: the (single, named or averaged) teacher logits (B, C)."""
        source = self._logit_source(loss)
        if source is None:
            return teacher[LOGITS]
        if source != MEAN_TEACHER:
            return teacher[feature_key(source, LOGITS)]
        return mean_logits(teacher, self.teachers)

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

    def set_epoch(self, epoch: int) -> None:
        """The 0-based index of the epoch about to run (= epochs completed); read by warm-ups."""
        self.epoch = int(epoch)

    def head_parameters(self):
        """Parameters of the training-only parts (heads, CRD embeddings, terms' modules), excluding the student."""
        for module in (self.heads_s, self.heads_t, self.crd, self.aux):
            yield from module.parameters()

    def forward(self, x: torch.Tensor, teacher: dict[str, torch.Tensor], y: torch.Tensor | None = None,
                labeled: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                crd_inputs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
                update_bank: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One batch.

        Args:
            x: (B, ...) student inputs. teacher: ``{layer: (B, ...), "logits": (B, C)}`` (several teachers:
                ``{"<teacher>/<layer>": ..., "<teacher>/logits": ...}``).
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
        for loss, entry in zip(self.losses, self.entries):
            inputs = TermInputs(loss, labels=y, labeled=labeled, epoch=self.epoch, idx=idx, update_bank=update_bank)
            value = self._term(loss, entry, inputs, logits, feats, teacher, crd_inputs)
            if value is None:
                continue
            warmup = getattr(getattr(loss, "params", None), "warmup_epochs", 0) or 0
            if warmup:
                if self.epoch is None:
                    raise RuntimeError(f"{term_name(loss)} has warmup_epochs: {warmup}, but the training loop never "
                                       "called Distiller.set_epoch(epoch)")
                value = value * warmup_factor(self.epoch, warmup)
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

    def _term(self, loss, entry, inputs, logits, feats, teacher, crd_inputs):
        names = pair_names(loss)
        if entry.needs in ("labels", "logits"):
            inputs.student = logits
            inputs.teacher = self._teacher_logits(loss, teacher).to(logits.dtype) if entry.needs == "logits" else None
            inputs.module = self.aux[_module_key(loss)] if entry.build is not None else None
            return entry.run(inputs)
        sides = [(feats[self.pairs[n].student], teacher[self._pair_key(self.pairs[n])].to(logits.dtype))
                 for n in names]
        if entry.needs == "pairs":
            inputs.student, inputs.teacher = [s for s, _ in sides], [t for _, t in sides]
        else:
            inputs.student, inputs.teacher = sides[0]
        if entry.needs == "bank":
            inputs.module = self.crd[names[0]]
            inputs.bank_inputs = (crd_inputs or {}).get(names[0], {})
        elif entry.build is not None:
            inputs.module = self.aux[_module_key(loss)]
        if entry.headed:
            inputs.student, inputs.teacher = self._project(names[0], *sides[0])
        return entry.run(inputs)

    def _project(self, pair: str, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_s = self.heads_s[pair](f_s)
        z_t = self.heads_t[pair](f_t) if pair in self.heads_t else f_t
        if z_s.dim() > 2 and z_s.shape != z_t.shape:
            raise ValueError(f"pair {pair!r}: projected student {tuple(z_s.shape)} vs teacher {tuple(z_t.shape)}")
        if z_s.dim() != z_t.dim():
            z_s, z_t = z_s.flatten(1), z_t.flatten(1)
        return z_s, z_t


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
