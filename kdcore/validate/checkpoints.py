"""Checkpoints: the file exists and its tensor names and shapes are the model's, without loading weights.

safetensors: names and shapes from the header (``safe_open(...).keys()``, ``get_slice(name).get_shape()``).
torch files: ``torch.load(..., weights_only=True, mmap=True)`` maps the file instead of reading it, so only
the pickled metadata is read; a ``{"model": state_dict}`` wrapper is unwrapped as ``kd`` does when loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdcore.validate.report import Report, first_line, path_hint


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the tensors in a checkpoint file. Raises ValueError when it is not a state dict."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"it does not hold a state dict of tensors (found {keys})")
    return {k: tuple(int(d) for d in v.shape) for k, v in state.items()}


def check(value: str | None, model: nn.Module | None, role: str, report: Report, offline: bool = False) -> None:
    """Check ``{role}.checkpoint`` (``value``) against ``model`` (built on meta; None: the file only). With
    ``offline``, an absolute path that is not on this machine (a cluster volume) is noted, not an error."""
    field = f"{role}.checkpoint"
    teacher = role == "teacher" or role.startswith("teachers.")  # one teacher, or one of several
    if not value:
        if teacher:
            report.note(f"{field} is not set: the teacher runs with random weights (seeded by train.seed)")
        return
    if "://" in value:
        scheme = value.split("://", 1)[0]
        report.add(field, f"checkpoints are read from a local file; {scheme}:// is not supported", value,
                   "copy the file to a local or shared path and point the spec at it")
        return
    p = Path(value).expanduser()
    if not p.is_file() and offline and p.is_absolute() and not p.parent.exists():
        report.note(f"{field}: {value} is not on this machine; not checked (--offline: it is checked where the job "
                    "runs)")
        return
    if not p.is_file():
        fix = path_hint(value)
        if teacher:
            fix = "train it with `kd train-teacher SPEC` (writes this path), or " + fix
        report.add(field, "checkpoint file not found", value, fix)
        return
    try:
        found = tensor_shapes(p)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        report.add(field, f"cannot read the checkpoint: {first_line(e)}", value,
                   "use a .safetensors file or a torch state dict saved with torch.save(model.state_dict(), path)")
        return
    if model is None:
        return
    want = {k: tuple(int(d) for d in v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = [k for k in want if k not in found]
    unexpected = [k for k in found if k not in want]
    wrong = [(k, found[k], want[k]) for k in want if k in found and found[k] != want[k]]
    if missing or unexpected:
        report.add(field, f"does not fit the {role} model: {len(missing)} tensor(s) missing {_few(missing)}, "
                   f"{len(unexpected)} unexpected {_few(unexpected)}", value,
                   f"is it for another architecture? check {role}.model (target/name and kwargs) or the file")
    if wrong:
        shown = "; ".join(f"{k}: file {tuple(f)} vs model {tuple(m)}" for k, f, m in wrong[:3])
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        report.add(field, f"{len(wrong)} tensor shape(s) differ from the {role} model: {shown}{more}", value,
                   f"is it for another width or class count? check {role}.model.kwargs")


def _few(names: list[str], n: int = 4) -> str:
    if not names:
        return "[]"
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"
