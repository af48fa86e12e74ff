"""Distillation loss terms: ``{kind, weight, pair, params}``, one model per kind."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from kdcore.spec.base import Spec


def _weight(default: float = 1.0):
    return Field(default=default, ge=0.0, description="Weight of this term in the total loss (>= 0).")


def _pair():
    return Field(description="Name of the layer pair (student.pairs[].name) this term compares.")


class _NoParams(Spec):
    """This loss takes no parameters."""


class CEParams(Spec):
    """Task cross-entropy parameters."""

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Label smoothing in [0, 1).")


class CELoss(Spec):
    """Task cross-entropy on the labeled rows of the batch only (no labels in a batch: no term)."""

    kind: Literal["ce"] = Field(description="Loss kind: task cross-entropy.")
    weight: float = _weight()
    params: CEParams = Field(default_factory=CEParams, description="Cross-entropy parameters.")


class KDParams(Spec):
    """Hinton KD parameters."""

    temperature: float = Field(default=4.0, gt=0.0, description="Softmax temperature T (> 0).")


class KDLoss(Spec):
    """Hinton et al. 2015: KL between softened teacher and student logits, times T^2."""

    kind: Literal["kd"] = Field(description="Loss kind: Hinton knowledge distillation on logits.")
    weight: float = _weight(0.9)
    params: KDParams = Field(default_factory=KDParams, description="KD parameters.")


class HintParams(Spec):
    """FitNets hint parameters."""

    half: bool = Field(default=False, description="Use 1/2 ||.||^2 per sample instead of the element mean.")


class HintLoss(Spec):
    """Romero et al. 2015 (FitNets): MSE between projected student and raw teacher features."""

    kind: Literal["hint"] = Field(description="Loss kind: FitNets hint regression.")
    weight: float = _weight(100.0)
    pair: str = _pair()
    params: HintParams = Field(default_factory=HintParams, description="Hint parameters.")


class CosineLoss(Spec):
    """1 - mean cosine similarity between projected student and teacher features."""

    kind: Literal["cosine"] = Field(description="Loss kind: cosine distance.")
    weight: float = _weight()
    pair: str = _pair()
    params: _NoParams = Field(default_factory=_NoParams, description="No parameters.")


class PKTParams(Spec):
    """PKT parameters."""

    eps: float = Field(default=1e-7, gt=0.0, description="Numerical floor inside the KL.")


class PKTLoss(Spec):
    """Passalis & Tefas 2018: probabilistic knowledge transfer."""

    kind: Literal["pkt"] = Field(description="Loss kind: probabilistic knowledge transfer.")
    weight: float = _weight(30000.0)
    pair: str = _pair()
    params: PKTParams = Field(default_factory=PKTParams, description="PKT parameters (eps).")


class SPLoss(Spec):
    """Tung & Mori 2019: similarity-preserving KD on batch Gram matrices."""

    kind: Literal["sp"] = Field(description="Loss kind: similarity preserving.")
    weight: float = _weight(3000.0)
    pair: str = _pair()
    params: _NoParams = Field(default_factory=_NoParams, description="No parameters.")


class RKDParams(Spec):
    """RKD parameters."""

    distance_weight: float = Field(default=25.0, ge=0.0, description="Weight of the distance term.")
    angle_weight: float = Field(default=50.0, ge=0.0, description="Weight of the angle term.")


class RKDLoss(Spec):
    """Park et al. 2019: relational KD (distance and angle)."""

    kind: Literal["rkd"] = Field(description="Loss kind: relational knowledge distillation.")
    weight: float = _weight()
    pair: str = _pair()
    params: RKDParams = Field(default_factory=RKDParams, description="RKD parameters (term weights).")


class ATParams(Spec):
    """Attention transfer parameters."""

    p: float = Field(default=2.0, gt=0.0, description="Power applied to activations before channel averaging.")


class ATLoss(Spec):
    """Zagoruyko & Komodakis 2017: attention transfer on feature maps (needs raw teacher maps)."""

    kind: Literal["at"] = Field(description="Loss kind: attention transfer.")
    weight: float = _weight(1000.0)
    pair: str = _pair()
    params: ATParams = Field(default_factory=ATParams, description="AT parameters.")


class InfoNCEParams(Spec):
    """In-batch InfoNCE parameters."""

    temperature: float = Field(default=0.07, gt=0.0, description="Softmax temperature (> 0).")
    normalize: bool = Field(default=True, description="L2-normalise both embeddings first.")


class InfoNCELoss(Spec):
    """van den Oord et al. 2018 / NT-Xent: in-batch contrastive loss between projected features."""

    kind: Literal["infonce"] = Field(description="Loss kind: in-batch InfoNCE.")
    weight: float = _weight()
    pair: str = _pair()
    params: InfoNCEParams = Field(default_factory=InfoNCEParams, description="InfoNCE parameters.")


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


class CRDLoss(Spec):
    """Tian et al. 2020: contrastive representation distillation with a memory bank of negatives."""

    kind: Literal["crd"] = Field(description="Loss kind: contrastive representation distillation.")
    weight: float = _weight(0.8)
    pair: str = _pair()
    params: CRDParams = Field(default_factory=CRDParams, description="CRD parameters.")


LossSpec = Annotated[
    Union[CELoss, KDLoss, HintLoss, CosineLoss, PKTLoss, SPLoss, RKDLoss, ATLoss, InfoNCELoss, CRDLoss],
    Field(discriminator="kind"),
]

LOSS_KINDS = ("ce", "kd", "hint", "cosine", "pkt", "sp", "rkd", "at", "infonce", "crd")
# Terms that compare against the teacher's raw tapped features and cannot use a fixed projection of them.
NEEDS_RAW_TEACHER = {"crd": "CRD trains its own teacher-side head", "at": "AT needs the teacher's spatial maps"}
