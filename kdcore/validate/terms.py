"""Every loss term, set up and run as training would: ``kdcore.distiller.Distiller`` on meta tensors.

One Distiller per term (so one bad term does not hide the next), built with the student's and the
teacher's per-sample shapes, then one forward on a meta batch with meta teacher features. Whatever the
Distiller and the losses check (pair shapes against projector kinds and out_dim, the tensor ranks a loss
needs, logits against logits) is checked here without restating it, so new loss kinds are covered as they
are added. CRD gets a meta memory bank; ``ce`` is left to the
class-count checks (its label mask is data-dependent).
"""

from __future__ import annotations

import math
import re

import torch

from kdcore.spec.job import JobSpec
from kdcore.validate.meta import MetaBank, is_meta_limitation, meta_shortcuts, meta_tensor, on_meta, where_stopped
from kdcore.validate.models import Probe
from kdcore.validate.report import Report, first_line, short

_FIX = {
    "kd": "teacher and student must output the same number of logits (set num_classes alike)",
    "at": "AT compares spatial maps: pair layers that output B x C x H x W on both sides (e.g. a block or "
          "layerN, not a pooled vector)",
    "crd": "CRD flattens both features into vectors; pair layers with a fixed per-sample size",
    "hint": "give the pair a projector that maps the student into the teacher's shape (kind linear or mlp for "
            "vectors, conv for maps), or pair layers of equal shape",
}
_DEFAULT_FIX = ("pair layers whose shapes suit this loss (`kd layers SPEC` lists them), or change the pair's "
                "projector (kind, out_dim)")
_NO_META_CHECK = {"ce"}  # F.cross_entropy on the labeled rows needs the mask's values


def check_terms(job: JobSpec, student: torch.nn.Module, s_probe: Probe, t_probe: Probe, n_train: int | None,
                report: Report) -> None:
    """Set up and run each of ``job.losses``; problems at ``losses.{i}`` or ``student.pairs.{j}.projector``."""
    from kdcore.distiller import Distiller
    from kdcore.spec.roles import MEAN_TEACHER
    from kdcore.teacher import feature_key

    s_shapes, t_shapes = s_probe.shapes(), t_probe.shapes()
    pairs = {p.name: (j, p) for j, p in enumerate(job.student.pairs)}
    multi = job.multi_teacher  # several teachers: t_probe's features are keyed "<teacher>/<layer>"

    def t_key(pair) -> str:
        return feature_key(job.pair_teacher(pair) if multi else None, pair.teacher)

    def logit_keys(loss) -> list[str]:
        if not multi:
            return ["logits"]
        source = job.loss_teacher(loss)
        names = [n for n, w in job.teacher_weights().items() if w > 0] if source == MEAN_TEACHER else [source]
        return [feature_key(n, "logits") for n in names]

    usable = [p for p in job.student.pairs if p.student in s_shapes and t_key(p) in t_shapes]
    teacher = dict(t_probe.features)
    if t_probe.logits is not None:
        teacher["logits"] = t_probe.logits
    weights = job.teacher_weights() if multi else None
    batch = int(s_probe.x.shape[0])
    for i, loss in enumerate(job.losses):
        if loss.kind in _NO_META_CHECK:
            continue
        names = _pair_names(loss)
        if any(n not in pairs or pairs[n][1] not in usable for n in names):
            continue  # the pair or one of its layers is already reported
        if not names and (any(k not in teacher for k in logit_keys(loss)) or s_probe.logits is None):
            continue
        j, pair = pairs[names[0]] if names else (None, None)
        where = "; ".join(
            f"pair {pairs[n][1].name!r}: student {pairs[n][1].student} {_shape(s_shapes[pairs[n][1].student])}, "
            f"teacher {t_key(pairs[n][1])} {_shape(t_shapes[t_key(pairs[n][1])])}" for n in names) or \
            f"logits: student {_shape(s_shapes.get('logits'))}, teacher " + \
            ", ".join(f"{k} {_shape(t_shapes.get(k))}" if multi else _shape(t_shapes.get(k)) for k in logit_keys(loss))
        try:
            with on_meta():
                d = Distiller(student, usable, [loss], s_shapes, t_shapes, n_data=max(1, n_train or batch),
                              bank_factory=lambda n, dim, momentum, dtype: MetaBank(n, dim), seed=job.train.seed,
                              teachers=weights)
        except Exception as e:  # noqa: BLE001 - heads and losses raise UserError/ValueError/TypeError
            if is_meta_limitation(e):
                report.note(f"losses.{i} ({loss.kind}): not checked on the meta device ({first_line(e)})")
                continue
            about_head = pair is not None and re.search(r"projector|head", short(e), re.IGNORECASE)
            path = f"student.pairs.{j}.projector" if about_head else f"losses.{i}"
            report.add(path, f"the {loss.kind} term cannot be set up ({where}): {short(e)}", None,
                       _FIX.get(loss.kind, _DEFAULT_FIX))
            continue
        _prime(d)
        try:
            d.train()
            y = meta_tensor((batch,), torch.int64)
            labeled = meta_tensor((batch,), torch.bool)
            idx = meta_tensor((batch,), torch.int64)
            with meta_shortcuts():
                d(s_probe.x, teacher, y, labeled, idx)
        except Exception as e:  # noqa: BLE001
            if is_meta_limitation(e):
                report.note(f"losses.{i} ({loss.kind}): checked up to {where_stopped(e)}, where the meta device "
                            f"stops ({first_line(e, 120)})")
                continue
            path, fix = f"losses.{i}", _FIX.get(loss.kind, _DEFAULT_FIX)
            out_dim = getattr(getattr(pair, "projector", None), "out_dim", None)
            if pair is not None and out_dim is not None and pair.projector.sides == "student":
                t = t_shapes[t_key(pair)]
                want = t[0] if pair.projector.kind == "conv" and len(t) == 3 else math.prod(t)
                if out_dim != want:
                    path = f"student.pairs.{j}.projector.out_dim"
                    fix = (f"remove out_dim (a student-only head maps into the teacher's {want}), or set "
                           "sides: both to compare in a shared space")
            report.add(path, f"the {loss.kind} term fails on the job's tensors ({where}): {short(e)}", None, fix)


def _pair_names(loss) -> list[str]:
    """The pairs a term compares (one for most, several for multi-layer terms, none for logit terms)."""
    try:
        from kdcore.losses.registry import pair_names
    except ImportError:
        pair = getattr(loss, "pair", None)
        return [pair] if pair else []
    return list(pair_names(loss))


def _prime(d: torch.nn.Module) -> None:
    """CRD fixes its normalisation constants from the first batch's values (an ``.item()``, which a meta tensor
    does not have): give them a placeholder so the rest of the term runs."""
    for m in d.modules():
        for attr in ("log_z_s", "log_z_t"):
            if hasattr(m, attr) and getattr(m, attr) is None:
                setattr(m, attr, 0.0)


def _shape(shape) -> str:
    return "?" if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"
