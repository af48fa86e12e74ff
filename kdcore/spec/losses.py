"""Distillation loss terms: ``{kind, weight, pair | pairs, params}``, one spec model per kind, and the
built-in rows of the loss table (:mod:`kdcore.losses.registry`).

A loss kind is its math in ``kdcore/losses/<name>.py`` and one :class:`LossEntry` here (its spec
model, what it needs, the paths of its ``term`` / ``build``). :data:`LossSpec` is the tagged union of
every registered spec model, rebuilt whenever a kind is registered, so the job spec, the YAML error
messages and ``kd schema`` always know every kind. Torch is not imported here.

Over 300 lines on purpose: it is the one place holding every built-in kind's spec model and table row
(about 20 lines a kind), so a reader sees all the kinds and their parameters together.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field

from kdcore.losses.registry import LossEntry, entries, on_change, register_loss
from kdcore.spec.base import Spec


def _weight(default: float = 1.0):
    return Field(default=default, ge=0.0, description="Weight of this term in the total loss (>= 0).")


def _pair():
    return Field(description="Name of the layer pair (student.pairs[].name) this term compares.")


def _teacher():
    return Field(default=None, description="Multi-teacher jobs: the teacher (teachers[].name) whose logits this term "
                 "uses, or 'mean' for the teachers' weight-normalised average of logits (the default there). "
                 "Single-teacher jobs: leave it unset (or name the one teacher, 'teacher').")


def _logit_stand():
    return Field(default=False, description="Z-score each sample's student and teacher logits before the temperature "
                 "(logit standardisation, Sun et al. 2024).")


def _target():
    return Field(default="label", description="Target class of each row: label (the label on labeled rows, the "
                 "teacher's arg-max elsewhere) or teacher (always the teacher's arg-max).")


def _warmup():
    return Field(default=0, ge=0, description="Warm-up epochs: the term is scaled by min((epoch+1)/warmup_epochs, 1), "
                 "epoch counted from 0 (the authors' recipe uses 20); 0: no warm-up.")


class _NoParams(Spec):
    """This loss takes no parameters."""


# -- task and logits -------------------------------------------------------------------------------
class CEParams(Spec):
    """Task cross-entropy parameters."""

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Label smoothing in [0, 1).")


class CELossSpec(Spec):
    """Task cross-entropy on the labeled rows of the batch only (no labels in a batch: no term)."""

    kind: Literal["ce"] = Field(description="Loss kind: task cross-entropy.")
    weight: float = _weight()
    params: CEParams = Field(default_factory=CEParams, description="Cross-entropy parameters.")


class KDParams(Spec):
    """Hinton KD parameters."""

    temperature: float = Field(default=4.0, gt=0.0, description="Softmax temperature T (> 0).")
    logit_stand: bool = _logit_stand()


class KDLossSpec(Spec):
    """Hinton et al. 2015: KL between softened teacher and student logits, times T^2."""

    kind: Literal["kd"] = Field(description="Loss kind: Hinton knowledge distillation on logits.")
    weight: float = _weight(0.9)
    teacher: str | None = _teacher()
    params: KDParams = Field(default_factory=KDParams, description="KD parameters.")


class DKDParams(Spec):
    """Decoupled KD parameters (mdistiller defaults)."""

    alpha: float = Field(default=1.0, ge=0.0, description="Weight of the target-class term (TCKD).")
    beta: float = Field(default=8.0, ge=0.0, description="Weight of the non-target-class term (NCKD).")
    temperature: float = Field(default=4.0, gt=0.0, description="Softmax temperature T (> 0).")
    warmup_epochs: int = _warmup()
    logit_stand: bool = _logit_stand()
    target: Literal["label", "teacher"] = _target()


class DKDLossSpec(Spec):
    """Zhao et al. 2022: decoupled KD, target-class and non-target-class KL terms."""

    kind: Literal["dkd"] = Field(description="Loss kind: decoupled knowledge distillation on logits.")
    weight: float = _weight()
    teacher: str | None = _teacher()
    params: DKDParams = Field(default_factory=DKDParams, description="DKD parameters.")


class DISTParams(Spec):
    """DIST parameters (the authors' defaults)."""

    beta: float = Field(default=1.0, ge=0.0, description="Weight of the inter-class relation (per sample, over classes).")
    gamma: float = Field(default=1.0, ge=0.0, description="Weight of the intra-class relation (per class, over the batch).")
    tau: float = Field(default=1.0, gt=0.0, description="Softmax temperature tau (> 0); the terms are scaled by tau^2.")
    logit_stand: bool = _logit_stand()


class DISTLossSpec(Spec):
    """Huang et al. 2022: Pearson-correlation relations between student and teacher predictions."""

    kind: Literal["dist"] = Field(description="Loss kind: DIST, inter- and intra-class correlation.")
    weight: float = _weight()
    teacher: str | None = _teacher()
    params: DISTParams = Field(default_factory=DISTParams, description="DIST parameters.")


class NKDParams(Spec):
    """Normalised KD parameters (the authors' ImageNet defaults)."""

    temperature: float = Field(default=1.0, gt=0.0, description="Temperature of the non-target term (> 0).")
    gamma: float = Field(default=1.5, ge=0.0, description="Weight of the normalised non-target term.")
    logit_stand: bool = _logit_stand()
    target: Literal["label", "teacher"] = _target()


class NKDLossSpec(Spec):
    """Yang et al. 2023: the target term plus normalised non-target KD."""

    kind: Literal["nkd"] = Field(description="Loss kind: normalised knowledge distillation on logits.")
    weight: float = _weight()
    teacher: str | None = _teacher()
    params: NKDParams = Field(default_factory=NKDParams, description="NKD parameters.")


# -- one pair through its heads --------------------------------------------------------------------
class HintParams(Spec):
    """FitNets hint parameters."""

    half: bool = Field(default=False, description="Use 1/2 ||.||^2 per sample instead of the element mean.")


class HintLossSpec(Spec):
    """Romero et al. 2015 (FitNets): MSE between projected student and raw teacher features."""

    kind: Literal["hint"] = Field(description="Loss kind: FitNets hint regression.")
    weight: float = _weight(100.0)
    pair: str = _pair()
    params: HintParams = Field(default_factory=HintParams, description="Hint parameters.")


class CosineLossSpec(Spec):
    """1 - mean cosine similarity between projected student and teacher features."""

    kind: Literal["cosine"] = Field(description="Loss kind: cosine distance.")
    weight: float = _weight()
    pair: str = _pair()
    params: _NoParams = Field(default_factory=_NoParams, description="No parameters.")


class PKTParams(Spec):
    """PKT parameters."""

    eps: float = Field(default=1e-7, gt=0.0, description="Numerical floor inside the KL.")


class PKTLossSpec(Spec):
    """Passalis & Tefas 2018: probabilistic knowledge transfer."""

    kind: Literal["pkt"] = Field(description="Loss kind: probabilistic knowledge transfer.")
    weight: float = _weight(30000.0)
    pair: str = _pair()
    params: PKTParams = Field(default_factory=PKTParams, description="PKT parameters (eps).")


class SPLossSpec(Spec):
    """Tung & Mori 2019: similarity-preserving KD on batch Gram matrices."""

    kind: Literal["sp"] = Field(description="Loss kind: similarity preserving.")
    weight: float = _weight(3000.0)
    pair: str = _pair()
    params: _NoParams = Field(default_factory=_NoParams, description="No parameters.")


class RKDParams(Spec):
    """RKD parameters."""

    distance_weight: float = Field(default=25.0, ge=0.0, description="Weight of the distance term.")
    angle_weight: float = Field(default=50.0, ge=0.0, description="Weight of the angle term.")


class RKDLossSpec(Spec):
    """Park et al. 2019: relational KD (distance and angle)."""

    kind: Literal["rkd"] = Field(description="Loss kind: relational knowledge distillation.")
    weight: float = _weight()
    pair: str = _pair()
    params: RKDParams = Field(default_factory=RKDParams, description="RKD parameters (term weights).")


class InfoNCEParams(Spec):
    """In-batch InfoNCE parameters."""

    temperature: float = Field(default=0.07, gt=0.0, description="Softmax temperature (> 0).")
    normalize: bool = Field(default=True, description="L2-normalise both embeddings first.")


class InfoNCELossSpec(Spec):
    """van den Oord et al. 2018 / NT-Xent: in-batch contrastive loss between projected features."""

    kind: Literal["infonce"] = Field(description="Loss kind: in-batch InfoNCE.")
    weight: float = _weight()
    pair: str = _pair()
    params: InfoNCEParams = Field(default_factory=InfoNCEParams, description="InfoNCE parameters.")


# -- raw teacher features, own modules --------------------------------------------------------------
class ATParams(Spec):
    """Attention transfer parameters."""

    p: float = Field(default=2.0, gt=0.0, description="Power applied to activations before channel averaging.")


class ATLossSpec(Spec):
    """Zagoruyko & Komodakis 2017: attention transfer on feature maps (needs raw teacher maps)."""

    kind: Literal["at"] = Field(description="Loss kind: attention transfer.")
    weight: float = _weight(1000.0)
    pair: str = _pair()
    params: ATParams = Field(default_factory=ATParams, description="AT parameters.")


class CRDParams(Spec):
    """Contrastive representation distillation parameters (RepDistiller conventions)."""

    nce_k: int = Field(default=4096, gt=0, description="Number of negatives K drawn from the memory bank.")
    temperature: float = Field(default=0.07, gt=0.0, description="Temperature of the contrastive scores.")
    momentum: float = Field(default=0.5, ge=0.0, lt=1.0, description="Memory-bank momentum in [0, 1).")
    objective: Literal["nce", "softmax"] = Field(
        default="nce", description="nce: the reference NCE objective; softmax: InfoNCE over bank negatives."
    )
    negatives: Literal["per_anchor", "shared"] = Field(
        default="per_anchor",
        description="per_anchor: K negatives per sample (reference); shared: one set of K for the batch (cheap, "
        "what the distributed bank uses).",
    )
    feat_dim: int = Field(default=128, gt=0, description="Embedding size of CRD's student and teacher heads.")
    bank_dtype: Literal["fp32", "fp16"] = Field(default="fp32", description="Storage dtype of the memory bank.")


class CRDLossSpec(Spec):
    """Tian et al. 2020: contrastive representation distillation with a memory bank of negatives."""

    kind: Literal["crd"] = Field(description="Loss kind: contrastive representation distillation.")
    weight: float = _weight(0.8)
    pair: str = _pair()
    params: CRDParams = Field(default_factory=CRDParams, description="CRD parameters.")


class MGDParams(Spec):
    """Masked generative distillation parameters (the authors' ImageNet ResNet-34 -> 18 values)."""

    alpha_mgd: float = Field(default=7e-5, ge=0.0, description="The authors' loss coefficient alpha_mgd (multiplies "
                             "the summed squared error per sample; applied before weight).")
    lambda_mgd: float = Field(default=0.15, ge=0.0, lt=1.0, description="Mask ratio: each sample's channels are zeroed "
                              "with this probability before the generator.")


class MGDLossSpec(Spec):
    """Yang et al. 2022: the generator rebuilds the teacher map from the randomly masked student map."""

    kind: Literal["mgd"] = Field(description="Loss kind: masked generative distillation on feature maps.")
    weight: float = _weight()
    pair: str = _pair()
    params: MGDParams = Field(default_factory=MGDParams, description="MGD parameters.")


class SRDParams(Spec):
    """SRD-style projector recipe parameters (the authors' ImageNet code)."""

    power: float = Field(default=4.0, gt=0.0, description="Exponent p of log(sum |bn(W s) - bn(t)|^p), the soft "
                         "maximum of the normalised differences.")
    bn_eps: float = Field(default=1e-4, gt=0.0, description="Epsilon of the non-affine batch norm on both sides.")


class SRDLossSpec(Spec):
    """Miles & Mikolajczyk 2024: linear student->teacher map, non-affine batch norm on both sides."""

    kind: Literal["srd"] = Field(description="Loss kind: SRD-style feature distillation (maps are averaged over space).")
    weight: float = _weight(2.0)
    pair: str = _pair()
    params: SRDParams = Field(default_factory=SRDParams, description="SRD parameters.")


class ReviewKDParams(Spec):
    """ReviewKD parameters (mdistiller defaults)."""

    mid_channels: int = Field(default=512, gt=0, description="Upper bound of the fusion width: min(mid_channels, "
                              "channels of the deepest student map).")
    warmup_epochs: int = _warmup()


class ReviewKDLossSpec(Spec):
    """Chen et al. 2021: attention-based fusion of the student's stages, hierarchical context loss."""

    kind: Literal["reviewkd"] = Field(description="Loss kind: knowledge review (ABF + HCL) over several pairs.")
    weight: float = _weight()
    pairs: list[str] = Field(min_length=1, description="Names of the layer pairs, shallow to deep; each pair's "
                             "student and teacher layers are feature maps (B, C, H, W).")
    params: ReviewKDParams = Field(default_factory=ReviewKDParams, description="ReviewKD parameters.")


_M = "kdcore.losses."
_MAPS, _ANY = frozenset({4}), None
BUILTIN = (
    LossEntry("ce", CELossSpec, "labels", _M + "ce:term"),
    LossEntry("kd", KDLossSpec, "logits", _M + "kd:term"),
    LossEntry("dkd", DKDLossSpec, "logits", _M + "dkd:term"),
    LossEntry("dist", DISTLossSpec, "logits", _M + "dist:term"),
    LossEntry("nkd", NKDLossSpec, "logits", _M + "nkd:term"),
    LossEntry("hint", HintLossSpec, "pair", _M + "hint:term", headed=True),
    LossEntry("cosine", CosineLossSpec, "pair", _M + "cosine:term", headed=True),
    LossEntry("pkt", PKTLossSpec, "pair", _M + "pkt:term", headed=True),
    LossEntry("sp", SPLossSpec, "pair", _M + "sp:term", headed=True),
    LossEntry("rkd", RKDLossSpec, "pair", _M + "rkd:term", headed=True),
    LossEntry("infonce", InfoNCELossSpec, "pair", _M + "contrastive:term", headed=True),
    LossEntry("at", ATLossSpec, "pair_raw", _M + "at:term", ranks=_MAPS, raw_reason="AT needs the teacher's spatial maps"),
    LossEntry("crd", CRDLossSpec, "bank", _M + "crd:term", build=_M + "crd:build",
              raw_reason="CRD trains its own teacher-side head"),
    LossEntry("mgd", MGDLossSpec, "pair_raw", _M + "mgd:term", ranks=_MAPS, build=_M + "mgd:build",
              raw_reason="MGD regenerates the teacher's raw feature map"),
    LossEntry("srd", SRDLossSpec, "pair_raw", _M + "srd:term", build=_M + "srd:build",
              raw_reason="SRD batch-normalises the teacher's raw features"),
    LossEntry("reviewkd", ReviewKDLossSpec, "pairs", _M + "reviewkd:term", ranks=_MAPS, build=_M + "reviewkd:build",
              raw_reason="ReviewKD compares with the teacher's raw feature maps"),
)
for _entry in BUILTIN:
    register_loss(_entry, replace=True)


def loss_union() -> Any:
    """The tagged union (on ``kind``) of every registered loss spec model."""
    specs = tuple(e.spec for e in entries())
    return Annotated[Union[specs], Field(discriminator="kind")]  # type: ignore[valid-type]


class LossSpec:
    """Annotation for a loss term: validates as the union of every registered spec model.

    Use it in model fields (``losses: list[LossSpec]``); a value is an instance of one registered
    spec model (e.g. :class:`KDLossSpec`).
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return handler.generate_schema(loss_union())


def _refers(tp: Any, model_refs: dict[type, bool]) -> bool:
    if tp is LossSpec:
        return True
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp not in model_refs:
            model_refs[tp] = False  # cycles
            model_refs[tp] = any(_refers(f.annotation, model_refs) for f in tp.model_fields.values())
        return model_refs[tp]
    return any(_refers(a, model_refs) for a in typing.get_args(tp))


def _rebuild_holders() -> None:
    """Rebuild every loaded spec model that holds loss terms, innermost first."""
    seen: list[type] = []
    stack = [Spec]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    refs: dict[type, bool] = {}
    holders = [m for m in seen if _refers(m, refs)]
    done: set[type] = set()

    def visit(m: type) -> None:
        if m in done:
            return
        done.add(m)
        for f in m.model_fields.values():
            for dep in holders:
                if dep is not m and _mentions(f.annotation, dep):
                    visit(dep)
        m.model_rebuild(force=True)

    for m in holders:
        visit(m)


def _mentions(tp: Any, model: type) -> bool:
    return tp is model or any(_mentions(a, model) for a in typing.get_args(tp))


on_change(_rebuild_holders)
