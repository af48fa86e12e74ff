"""Where a model comes from: a factory function, torchvision or timm, plus an optional checkpoint."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from kdcore.spec.base import Spec

_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class FactoryModel(Spec):
    """A model built by calling a Python function: ``target: "package.module:function"``."""

    kind: Literal["factory"] = Field(description="Model source kind: a Python factory function.")
    target: str = Field(
        description='Import path of the factory, "package.module:function"; it is called with `kwargs`.',
        examples=["kdcore.zoo:digits_teacher"],
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the factory.")

    @field_validator("target")
    @classmethod
    def _target_form(cls, v: str) -> str:
        if not _TARGET.match(v):
            raise ValueError(f'target must look like "package.module:function", got {v!r}')
        return v


class TorchvisionModel(Spec):
    """A torchvision model by name (needs torchvision installed)."""

    kind: Literal["torchvision"] = Field(description="Model source kind: torchvision.models by name.")
    name: str = Field(description='torchvision.models builder name, e.g. "resnet18".')
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the builder, e.g. num_classes.")


class TimmModel(Spec):
    """A timm model by name (needs timm installed; pretrained weights need a hub, so prefer a checkpoint)."""

    kind: Literal["timm"] = Field(description="Model source kind: timm.create_model by name.")
    name: str = Field(description='timm model name, e.g. "resnet50".')
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for timm.create_model.")


ModelSource = Annotated[Union[FactoryModel, TorchvisionModel, TimmModel], Field(discriminator="kind")]

Precision = Literal["fp32", "fp16", "bf16"]
