"""A sweep: one teacher (and one cache), many students trained on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from kdcore.errors import Problem, SpecError
from kdcore.spec.base import Spec
from kdcore.spec.job import JobSpec
from kdcore.spec.losses import LossSpec
from kdcore.spec.roles import StudentSpec
from kdcore.spec.train import TrainSpec


class VariantSpec(Spec):
    """One student run of a sweep: what differs from the base job."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-_]*$", description="Variant name (a column of the comparison table).")
    student: StudentSpec | None = Field(default=None, description="Replaces the base job's student (and its pairs).")
    losses: list[LossSpec] | None = Field(default=None, description="Replaces the base job's loss terms.")
    train: TrainSpec | None = Field(default=None, description="Replaces the base job's training settings.")


class SweepSpec(Spec):
    """Train several student variants against one teacher; the teacher runs once."""

    base: str | dict[str, Any] = Field(description="The base job: a path to a job spec (relative to this file) or an "
                                       "inline job spec.")
    variants: list[VariantSpec] = Field(min_length=1, description="Student variants to train.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Seeds; each variant runs per seed.")
    parallel: int = Field(default=1, ge=1, description="Student runs trained at the same time where resources allow.")

    @model_validator(mode="after")
    def _unique(self) -> "SweepSpec":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SweepSpec":
        from kdcore.spec.loading import load_model

        sweep = load_model(cls, path)
        sweep._source = Path(path)
        return sweep

    def base_job(self) -> JobSpec:
        if isinstance(self.base, dict):
            return JobSpec.from_dict(self.base, source="base")
        root = getattr(self, "_source", None)
        path = Path(self.base) if root is None else (root.parent / self.base)
        return JobSpec.from_yaml(path)

    def jobs(self) -> list[tuple[str, int, JobSpec]]:
        """(variant, seed, job) for every run, each job re-validated as a whole."""
        base = self.base_job().model_dump(mode="json")
        out, problems = [], []
        for i, v in enumerate(self.variants):
            for seed in self.seeds:
                data = dict(base)
                data["name"] = f"{base['name']}-{v.name}-s{seed}"
                for key in ("student", "losses", "train"):
                    value = getattr(v, key)
                    if value is not None:
                        data[key] = (value.model_dump(mode="json") if hasattr(value, "model_dump")
                                     else [x.model_dump(mode="json") for x in value])
                data["train"] = {**data["train"], "seed": seed}
                try:
                    out.append((v.name, seed, JobSpec.from_dict(data)))
                except SpecError as e:
                    problems += [Problem(f"variants.{i}({v.name}): {p.path}", p.message, p.value, p.fix)
                                 for p in e.problems]
                    break
        if problems:
            raise SpecError("sweep variants have problems", problems)
        return out
