"""The teacher and the student, built on the meta device and run once on a meta batch of the data's shape.

Checks: the model source resolves (factory target and kwargs, torchvision/timm names), the model builds,
every tapped layer exists (closest names on a typo) and runs in the forward, tapped outputs are tensors,
the output is a (batch, classes) tensor whose class count is the data's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from torch import nn

from kdcore.errors import LayerNotFoundError
from kdcore.spec.models import FactoryModel, TimmModel, TorchvisionModel
from kdcore.taps import FeatureTaps, validate_layers
from kdcore.teacher import LOGITS
from kdcore.validate.data import DataInfo
from kdcore.validate.factories import check_kwargs, resolve
from kdcore.validate.meta import is_meta_limitation, meta_shortcuts, meta_tensor, on_meta
from kdcore.validate.report import Report, first_line, short


@dataclass
class Probe:
    """One meta forward: the input, the output logits and the tapped features (batch first, meta tensors)."""

    x: torch.Tensor
    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the features and the logits (``"logits"``)."""
        out = {k: tuple(int(d) for d in v.shape[1:]) for k, v in self.features.items()}
        if self.logits is not None:
            out[LOGITS] = tuple(int(d) for d in self.logits.shape[1:])
        return out


def build(role: str, source, report: Report) -> nn.Module | None:
    """Build ``source`` (a ModelSource) on the meta device; problems at ``{role}.model...``."""
    path = f"{role}.model"
    if isinstance(source, FactoryModel):
        fn = resolve(source.target, f"{path}.target", report)
        if fn is None or not check_kwargs(fn, source.kwargs, path, report, source.target):
            return None
        return _construct(lambda: fn(**source.kwargs), path, source.target, report)
    if isinstance(source, TorchvisionModel):
        return _torchvision(source, path, report)
    if isinstance(source, TimmModel):
        return _timm(source, path, report)
    report.note(f"{path}: kind {getattr(source, 'kind', '?')!r} is not checked by kd validate")
    return None


def _construct(make, path: str, label: str, report: Report) -> nn.Module | None:
    try:
        with on_meta():
            model = make()
    except TypeError as e:
        report.add(f"{path}.kwargs", f"{label} rejects its kwargs: {short(e)}", None,
                   "check the kwargs against the function's parameters")
        return None
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        if is_meta_limitation(e):
            report.note(f"{path}: {label} cannot be built on the meta device ({first_line(e)}); its layers and "
                        "shapes are not checked")
            return None
        report.add(path, f"building {label} fails: {first_line(e)}", None, "fix the model's kwargs (or the factory)")
        return None
    if not isinstance(model, nn.Module):
        report.add(path, f"{label} returned a {type(model).__name__}, not a torch.nn.Module", label,
                   "return the model (an nn.Module) from the factory")
        return None
    return model


_ZOO_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")  # kdcore.zoo_imagenet


def _torchvision(source: TorchvisionModel, path: str, report: Report) -> nn.Module | None:
    try:
        import torchvision.models as tvm  # type: ignore[import-not-found]
    except ImportError:
        fix = "pip install torchvision (its CPU wheel is enough to validate), or use kind: factory"
        if source.name in _ZOO_RESNETS:
            fix += (f" with target kdcore.zoo_imagenet:{source.name} (torchvision's {source.name} in plain torch: "
                    "the same layer names and checkpoint keys)")
        report.add(f"{path}.kind", "model kind 'torchvision' needs torchvision, which is not installed here",
                   "torchvision", fix)
        return None
    except Exception as e:  # noqa: BLE001 - installed but broken (e.g. built for another torch)
        report.add(f"{path}.kind", f"torchvision is installed but does not import: {first_line(e)}", "torchvision",
                   f"install the torchvision build made for this torch ({torch.__version__})")
        return None
    names = list(tvm.list_models())
    if source.name not in names:
        close = difflib.get_close_matches(source.name, names, n=3)
        report.add(f"{path}.name", "torchvision has no model of this name", source.name,
                   f"did you mean {', '.join(map(repr, close))}?" if close else "see torchvision.models.list_models()")
        return None
    kwargs = dict(source.kwargs)
    if kwargs.pop("weights", None) is not None:
        report.note(f"{path}.kwargs.weights: pretrained weights are neither downloaded nor checked by kd validate")
    builder = tvm.get_model_builder(source.name)
    if not check_kwargs(builder, kwargs, path, report, f"torchvision {source.name}"):
        return None
    return _construct(lambda: builder(weights=None, **kwargs), path, f"torchvision {source.name}", report)


def _timm(source: TimmModel, path: str, report: Report) -> nn.Module | None:
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        report.add(f"{path}.kind", "model kind 'timm' needs timm, which is not installed here", "timm",
                   "pip install timm, or use kind: factory")
        return None
    except Exception as e:  # noqa: BLE001
        report.add(f"{path}.kind", f"timm is installed but does not import: {first_line(e)}", "timm",
                   f"install a timm that works with this torch ({torch.__version__})")
        return None
    if not timm.is_model(source.name):
        close = difflib.get_close_matches(source.name, timm.list_models(), n=3)
        report.add(f"{path}.name", "timm has no model of this name", source.name,
                   f"did you mean {', '.join(map(repr, close))}?" if close else "see timm.list_models()")
        return None
    kwargs = dict(source.kwargs)
    if kwargs.pop("pretrained", False):
        report.note(f"{path}.kwargs.pretrained: pretrained weights are neither downloaded nor checked by kd validate")
    return _construct(lambda: timm.create_model(source.name, pretrained=False, **kwargs), path,
                      f"timm {source.name}", report)


def check_layers(model: nn.Module, role: str, names: list[tuple[str, str]], report: Report) -> list[str]:
    """``names``: (layer, field path) pairs. Problems for layers that do not exist; returns those that do."""
    found: list[str] = []
    for name, path in names:
        if name in found:
            continue
        try:
            validate_layers(model, [name])  # "logits" (the output) always exists
        except LayerNotFoundError as e:
            hint = f"`kd layers SPEC --side {role}` lists every layer"
            fix = f"did you mean {', '.join(repr(c) for c in e.candidates[:3])}? ({hint})" if e.candidates else hint
            report.add(path, f"no layer of this name in the {role} ({type(model).__name__})", name, fix)
            continue
        found.append(name)
    return found


def probe(model: nn.Module, role: str, layers: list[str], info: DataInfo, batch: int, train: bool,
          report: Report, paths: dict[str, str]) -> Probe | None:
    """One forward of a meta batch (``batch`` x data shape) with ``layers`` tapped; None when it cannot run."""
    x = meta_tensor((batch, *info.shape))
    model.train(train)
    try:
        with FeatureTaps(model, layers, detach=True) as taps, torch.no_grad(), meta_shortcuts():
            out = model(x)
            feats = dict(taps.features)
            missing = taps.missing()
    except Exception as e:  # noqa: BLE001 - the model's own forward
        if is_meta_limitation(e):
            report.note(f"{role}.model: the forward cannot run on the meta device ({first_line(e)}); shapes, "
                        "pairs and losses are not checked")
            return None
        if "more than 1 value per channel" in str(e):
            report.add("data.batch_size", f"the {role}'s batch norm needs more than one sample per batch in training",
                       batch, "use data.batch_size >= 2")
            return None
        report.add(f"{role}.model", f"a forward pass on a batch of the data's shape {tuple(info.shape)} fails: "
                   f"{first_line(e)}", None,
                   "the model does not fit the data: check its kwargs (input channels, image size) or data.source")
        return None
    for name in missing:
        report.add(paths.get(name, f"{role}.taps"), "this layer does not run in the model's forward, so it has no "
                   "output to tap", name, f"tap a layer the forward uses (`kd layers SPEC --side {role}`)")
    good: dict[str, torch.Tensor] = {}
    for name, value in feats.items():
        if isinstance(value, torch.Tensor):
            good[name] = value
        else:
            report.add(paths.get(name, f"{role}.taps"), f"this layer outputs a {type(value).__name__}, not a tensor",
                       name, "tap a module that returns one tensor (e.g. one of its sub-modules)")
    logits = out if isinstance(out, torch.Tensor) else None
    if logits is None or logits.dim() != 2:
        what = type(out).__name__ if logits is None else f"a tensor of shape {tuple(out.shape)}"
        report.add(f"{role}.model", f"the model's output is {what}, not (batch, classes) logits", None,
                   "return the logits (B x C) from forward")
        logits = None
    return Probe(x, logits, good)


def check_classes(role: str, source, out: Probe | None, info: DataInfo, report: Report) -> None:
    """The logits' class count against the data's labels and class count."""
    if out is None or out.logits is None or info.num_classes is None:
        return
    c = int(out.logits.shape[1])
    n = info.num_classes
    kwargs = getattr(source, "kwargs", {}) or {}
    path = f"{role}.model.kwargs.num_classes" if "num_classes" in kwargs else f"{role}.model"
    fix = f"set {role}.model.kwargs.num_classes: {n}" if hasattr(source, "kwargs") else f"make the model output {n}"
    if info.label_max is not None and info.label_max >= c:
        report.add(path, f"the model outputs {c} logits but the data's labels go up to {info.label_max}",
                   kwargs.get("num_classes"), fix)
    elif c != n and info.declared_classes is not None:
        report.add(path, f"the model outputs {c} logits but the data has {n} classes", kwargs.get("num_classes"), fix)
    elif c != n:
        report.note(f"{role}.model: outputs {c} logits; the data's labels span {n} classes (0..{info.label_max})")
