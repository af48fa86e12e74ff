"""The one base class every spec model derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Base of every kd spec model: unknown keys are refused, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)


def raise_problems(problems: list) -> None:
    """Raise ``problems`` (kdcore.errors.Problem, paths relative to the model) from a model validator."""
    from pydantic_core import PydanticCustomError

    if problems:
        raise PydanticCustomError("kd_cross_field", "{count} problem(s)", {"count": len(problems), "problems": problems})
