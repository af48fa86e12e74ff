"""Forward hooks that capture the outputs of named submodules ("taps").

Names are the paths of ``model.named_modules()`` ("layer3.1.conv2"). The model's own output
can be tapped under the name ``""`` (the root module) or ``"logits"``; ``"logits"`` means the
output only when the model has no submodule called ``logits`` (otherwise it is that submodule).

    with FeatureTaps(student, ["layer3", "fc"]) as taps:
        out = student(x)
    feats = taps.features          # {"layer3": tensor, "fc": tensor}

A module called more than once in one forward keeps its last output. Outputs that are not
tensors (tuples, dicts) are stored as they are (``detach`` applies to the tensors inside).
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import torch
from torch import nn

from kdcore.errors import LayerNotFoundError

OUTPUT_NAMES = ("", "logits")
LIST_HINT = "run `kd layers` to list every layer name"


def layer_names(model: nn.Module) -> list[str]:
    """Every tappable submodule path of ``model``, in ``named_modules()`` order (root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _resolve(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    if name in modules:
        return modules[name]
    if name == "logits":
        return model
    return None


def _closest(name: str, names: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close and "." in name:
        # fall back to siblings of the deepest existing parent, e.g. "layer3.9" -> "layer3.0", "layer3.1"
        parent = name.rsplit(".", 1)[0]
        close = [c for c in names if c.startswith(parent + ".") and c.count(".") == name.count(".")][:n]
    return close


def validate_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for each name; raises LayerNotFoundError listing close names for typos.

    All names are checked; the error's ``name``/``candidates`` are those of the first missing name
    and the message lists every missing one.
    """
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    missing: list[tuple[str, list[str]]] = []
    all_names = layer_names(model)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}")
        module = _resolve(model, name, modules)
        if module is None:
            missing.append((name, _closest(name, all_names)))
        else:
            found[name] = module
    if missing:
        parts = []
        for name, cands in missing:
            did = f" (did you mean {', '.join(repr(c) for c in cands[:3])}?)" if cands else ""
            parts.append(f"no layer {name!r} in {type(model).__name__}{did}")
        message = "; ".join(parts) + f" ({LIST_HINT})"
        first, cands = missing[0]
        raise LayerNotFoundError(message, name=first, candidates=cands, missing=[m for m, _ in missing])
    return found


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_detach(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _detach(v)) for k, v in value.items())
    return value


class FeatureTaps:
    """Context manager capturing the outputs of named submodules of ``model``.

    Args:
        model: the network (student with grad, or teacher under ``torch.no_grad()``).
        names: module paths; ``""``/``"logits"`` tap the model output (see the module doc).
        detach: store detached tensors (no graph kept alive).

    Names are validated at construction (``LayerNotFoundError`` on a typo). Hooks are registered
    on ``__enter__`` and always removed on ``__exit__``, also when the body raises.
    ``features`` maps each name to its latest output; it is cleared on ``__enter__``.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.detach = bool(detach)
        self.modules = validate_layers(model, self.names)
        self.features: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.features[name] = _detach(output) if self.detach else output

        return hook

    def __enter__(self) -> "FeatureTaps":
        if self._handles:
            raise RuntimeError("FeatureTaps is already active; do not nest the same instance")
        self.features = {}
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this instance registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def missing(self) -> list[str]:
        """Names whose module did not run in the forward passes so far (e.g. a branch not taken)."""
        return [n for n in self.names if n not in self.features]
