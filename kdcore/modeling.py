"""Building models from a spec's model source and loading their checkpoints."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdcore.errors import ModelLoadError
from kdcore.spec.models import FactoryModel, TimmModel, TorchvisionModel


def resolve_target(target: str, what: str = "factory") -> Callable[..., Any]:
    """Import ``"package.module:attr.attr"``; raise ModelLoadError naming what is missing."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"{what} target {target!r}: cannot import module {module_name!r} ({e}); check the "
                             "module path and that its package is installed where the job runs") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            options = [n for n in dir(obj) if not n.startswith("_")][:12]
            raise ModelLoadError(f"{what} target {target!r}: {module_name!r} has no attribute {part!r}; "
                                 f"available: {', '.join(options)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{what} target {target!r} is not callable")
    return obj


def build_model(source: FactoryModel | TorchvisionModel | TimmModel) -> nn.Module:
    """Instantiate the model a spec names (weights are loaded separately by ``load_checkpoint``)."""
    if isinstance(source, FactoryModel):
        fn = resolve_target(source.target)
        try:
            model = fn(**source.kwargs)
        except TypeError as e:
            raise ModelLoadError(f"factory {source.target!r} rejected kwargs {source.kwargs}: {e}") from None
    elif isinstance(source, TorchvisionModel):
        try:
            import torchvision.models as tvm  # type: ignore[import-not-found]
        except ImportError:
            raise ModelLoadError("model kind 'torchvision' needs torchvision installed; install it or use a factory "
                                 "model") from None
        try:
            model = tvm.get_model(source.name, **source.kwargs)
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"torchvision has no model {source.name!r}: {e}") from None
    elif isinstance(source, TimmModel):
        try:
            import timm  # type: ignore[import-not-found]
        except ImportError:
            raise ModelLoadError("model kind 'timm' needs timm installed; install it or use a factory model") from None
        try:
            model = timm.create_model(source.name, **source.kwargs)
        except RuntimeError as e:
            raise ModelLoadError(f"timm cannot create {source.name!r}: {e}") from None
    else:  # pragma: no cover - the spec union is closed
        raise ModelLoadError(f"unknown model source {source!r}")
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model source {source} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from a .safetensors file or a torch file (``weights_only=True``, never arbitrary pickle)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"checkpoint not found: {p}; check the path (relative paths are resolved from the "
                             "directory the job runs in)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is the file's fault
        raise ModelLoadError(f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {p} does not hold a state dict of tensors")
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint strictly; a mismatch names the missing and unexpected keys."""
    state = read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"checkpoint {path} does not fit the model: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}; is it for another architecture or width?"
        )
    return model


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write a model's state dict as safetensors (tensors made contiguous, shared storage cloned)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(p)
    return p


def model_from_spec(source, checkpoint: str | None) -> nn.Module:
    """Build a model and load its checkpoint when one is given."""
    model = build_model(source)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model
