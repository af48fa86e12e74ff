"""Exporting the trained student alone: safetensors weights + a small JSON of its spec. No heads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from kdcore.modeling import build_model, load_checkpoint, save_weights
from kdcore.spec.roles import StudentSpec

WEIGHTS, META = "student.safetensors", "student.json"


def export_student(student: nn.Module, spec: StudentSpec, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/student.safetensors`` and ``out_dir/student.json``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(student, out / WEIGHTS)
    meta = {"format": "kd-student/1", "model": spec.model.model_dump(mode="json"),
            "parameters": sum(p.numel() for p in student.parameters()), **(extra or {})}
    (out / META).write_text(json.dumps(meta, indent=2))
    return out


def load_student(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported student from its JSON and weights (eval mode)."""
    from pydantic import TypeAdapter

    from kdcore.spec.models import ModelSource

    out = Path(out_dir)
    meta = json.loads((out / META).read_text())
    source = TypeAdapter(ModelSource).validate_python(meta["model"])
    model = load_checkpoint(build_model(source), out / WEIGHTS)
    return model.eval(), meta

