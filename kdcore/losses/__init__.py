"""Distillation losses: tensor in, 0-d tensor out; conventions of RepDistiller (Tian et al.) and of each
method's authors (see each module).

One module per method; every public name is re-exported here explicitly. The names are imported on
first use (PEP 562), so ``kdcore.losses.registry``, the loss table the spec layer reads, can be
imported without torch.

``pkt`` and ``rkd`` are both a module and the function it defines; the package keeps the function
under that name whichever is imported first (the import system binds each submodule on its package).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "attention_map": "at", "attention_transfer": "at",
    "info_nce": "contrastive",
    "cosine_distance": "cosine",
    "CRDLoss": "crd", "Embed": "crd", "nce_loss": "crd",
    "hint_mse": "hint",
    "kd_kl": "kd", "standardize_logits": "_logits", "target_classes": "_logits",
    "task_ce": "ce",
    "pkt": "pkt",
    "rkd": "rkd",
    "similarity_preserving": "sp",
    "dkd_loss": "dkd",
    "dist_loss": "dist",
    "nkd_loss": "nkd",
    "mgd_loss": "mgd", "MGDGenerator": "mgd",
    "srd_loss": "srd", "SRDMap": "srd",
    "hcl_loss": "reviewkd", "ReviewFusion": "reviewkd",
    "LossEntry": "registry", "register_loss": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdcore.losses' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kdcore.losses.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)  # kdcore.losses.pkt is the function pkt, not its module
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
