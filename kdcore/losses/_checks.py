"""Shape checks shared by the loss functions (private)."""

from __future__ import annotations

import torch


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def same_shape(loss: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise ValueError unless both tensors have exactly the same shape."""
    require_tensor("student", student)
    require_tensor("teacher", teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss}: student and teacher must have the same shape, got student {_shape(student)} "
            f"and teacher {_shape(teacher)}; add a projector so the student matches the teacher"
        )


def same_batch(loss: str, student: torch.Tensor, teacher: torch.Tensor, min_dim: int = 1) -> None:
    """Raise ValueError unless both tensors have at least ``min_dim`` dims and the same batch size."""
    require_tensor("student", student)
    require_tensor("teacher", teacher)
    for side, t in (("student", student), ("teacher", teacher)):
        if t.dim() < min_dim:
            raise ValueError(
                f"{loss}: {side} needs at least {min_dim} dimension(s) (batch first), got student "
                f"{_shape(student)} and teacher {_shape(teacher)}"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{loss}: student and teacher must have the same batch size, got student {_shape(student)} "
            f"and teacher {_shape(teacher)}"
        )


def common_float(loss: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors in their common floating dtype (e.g. fp16 teacher cache + fp32 student -> fp32).

    Raises ValueError when either is not floating point (integer logits, boolean masks...).
    """
    for side, t in (("student", student), ("teacher", teacher)):
        if not t.is_floating_point():
            raise ValueError(
                f"{loss}: {side} must be a floating-point tensor, got student {student.dtype} and teacher {teacher.dtype}"
            )
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    return student.to(dtype), teacher.to(dtype)


def flat(t: torch.Tensor) -> torch.Tensor:
    """B x ... -> B x d."""
    return t.reshape(t.shape[0], -1)


def positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value
