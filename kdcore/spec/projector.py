"""Projection heads and student/teacher layer pairs."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from kdcore.errors import Problem
from kdcore.spec.base import Spec, raise_problems

Activation = Literal["relu", "leaky_relu", "gelu", "silu", "none"]


class ProjectorSpec(Spec):
    """A projection head mapping features into the space where a loss compares them (training only)."""

    kind: Literal["linear", "mlp", "conv", "lowrank", "identity"] = Field(
        default="linear",
        description="linear: FitNets regressor z=Wh+b; mlp: Linear-BN-act-Linear; conv: 1x1 conv or FitNets ConvReg "
        "for feature maps; lowrank: d_in->r->d_out; identity: no head.",
    )
    out_dim: int | None = Field(
        default=None,
        gt=0,
        description="Output dimension d_p. Default: the teacher's feature size when only the student has a head "
        "(FitNets), else 128.",
    )
    hidden_dim: int | None = Field(default=None, gt=0, description="Hidden width of an mlp head (default max(d_in, d_out)).")
    rank: int | None = Field(default=None, gt=0, description="Inner rank r of a lowrank head (default min(d_in, d_out)//4, at least 8).")
    activation: Activation = Field(default="relu", description="Activation inside mlp/conv heads.")
    batchnorm: bool = Field(default=True, description="BatchNorm inside mlp/conv heads (skipped for a one-sample batch).")
    l2_normalize: bool = Field(default=False, description="L2-normalise the head's output, z/||z||.")
    weight_norm: bool = Field(default=False, description="Apply weight normalisation to the head's linear/conv layers.")
    ensemble: int = Field(
        default=1, ge=1, le=16,
        description="Number of independently initialised heads whose outputs are averaged (projector ensemble, "
        "Chen et al. 2022); 1: a single head.",
    )
    sides: Literal["student", "both"] = Field(
        default="student",
        description="Which side gets a head: student only (FitNets, maps into the teacher's space) or both "
        "(asymmetric heads g_s, g_t into a shared d_p space, as CRD).",
    )

    @model_validator(mode="after")
    def _check(self) -> "ProjectorSpec":
        if self.kind == "identity" and self.sides == "both" and self.out_dim is not None:
            raise_problems([Problem("out_dim", "an identity head has no out_dim", self.out_dim,
                                    "remove out_dim or pick kind linear/mlp")])
        if self.kind == "identity" and self.ensemble > 1:
            raise_problems([Problem("ensemble", "an identity head has no parameters to ensemble", self.ensemble,
                                    "remove ensemble or pick kind linear/mlp/conv/lowrank")])
        return self

    def resolved_out_dim(self, teacher_dim: int) -> int:
        """d_p: the explicit out_dim, else the teacher's size (student-only heads) or 128 (both sides)."""
        if self.out_dim is not None:
            return self.out_dim
        return teacher_dim if self.sides == "student" else 128


_NAME = re.compile(r"^[A-Za-z_][\w\-]*$")


class PairSpec(Spec):
    """One student layer paired with one teacher layer; losses refer to pairs by name."""

    name: str = Field(description="Name the losses use to refer to this pair, e.g. 'feat'.", pattern=_NAME.pattern)
    student: str = Field(description="Student module path to tap, e.g. 'layer3.1.conv2' (see `kd layers`).", min_length=1)
    teacher: str = Field(description="Teacher module path to tap; must be listed in teacher.taps (or in the taps "
                         "of the teacher named by teacher_model).", min_length=1)
    teacher_model: str | None = Field(
        default=None, description="Multi-teacher jobs: the name of the teacher (teachers[].name) whose layer "
        "`teacher` is; default the first teacher. Single-teacher jobs: leave it unset.")
    projector: ProjectorSpec = Field(default_factory=ProjectorSpec, description="Projection head(s) for this pair.")
