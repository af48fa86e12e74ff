"""The teacher (served once, tapped) and the student (trained, paired with the teacher's layers).

A job has one ``teacher:`` or several named ``teachers:`` (:class:`NamedTeacherSpec`); see docs/multi-teacher.md.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from kdcore.errors import Problem
from kdcore.spec.base import Spec, raise_problems
from kdcore.spec.models import ModelSource, Precision
from kdcore.spec.projector import PairSpec


class AutoscalingSpec(Spec):
    """Serve autoscaling of teacher replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(default=2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="Requests per replica the autoscaler aims at.")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingSpec":
        if self.max_replicas < self.min_replicas:
            raise_problems([Problem("max_replicas", f"must be >= min_replicas ({self.min_replicas})",
                                    self.max_replicas, f"set it to at least {self.min_replicas}")])
        return self


class HTTPSpec(Spec):
    """The teacher's HTTP ingress for clients outside Ray."""

    host: str = Field(default="127.0.0.1", description="Bind address; 127.0.0.1 unless you mean to expose it.")
    port: int = Field(default=8000, gt=0, lt=65536, description="HTTP port.")
    token_env: str | None = Field(default=None, description="Env var holding a bearer token; requests without it get 401.")
    token_file: str | None = Field(default=None, description="File holding a bearer token (alternative to token_env).")
    max_batch: int = Field(default=1024, gt=0, description="Largest batch one request may carry (422 above).")
    max_body_mb: float = Field(default=64.0, gt=0, description="Largest request body in MB (413 above).")
    body_read_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds a request body may take to arrive in full; a slower (or stalled) "
        "client gets 408 and its connection is closed.")
    max_inflight_bodies: int = Field(
        default=64, gt=0, description="Request bodies a replica holds at once (being received or computed); "
        "requests above it get 503 with Retry-After at once, so held connections cannot take every request slot.")


class ServeSpec(Spec):
    """How the teacher deployment runs on Ray Serve."""

    replicas: int = Field(default=1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSpec | None = Field(default=None, description="Autoscale replicas instead of a fixed count.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (0 on CPU-only clusters).")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per replica.")
    max_batch_size: int = Field(default=256, gt=0, description="Largest dynamic batch (@serve.batch).")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="How long a batch waits to fill.")
    max_ongoing_requests: int | None = Field(
        default=None, gt=0, description="Requests a replica accepts at once; default and minimum: max_batch_size."
    )
    torch_threads: int | None = Field(default=None, gt=0, description="torch threads per replica (default: num_cpus).")
    http: HTTPSpec = Field(default_factory=HTTPSpec, description="HTTP ingress options (`kd serve`).")

    @model_validator(mode="after")
    def _batch_fills(self) -> "ServeSpec":
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise_problems([Problem("max_ongoing_requests", f"below max_batch_size ({self.max_batch_size}) starves "
                                    "dynamic batching", self.max_ongoing_requests,
                                    f"raise it to at least {self.max_batch_size}, or remove it")])
        return self


class TeacherSpec(Spec):
    """The large model whose features are distilled."""

    model: ModelSource = Field(description="Where the teacher comes from.")
    checkpoint: str | None = Field(
        default=None, description="Weights: a .safetensors file or a torch file (loaded with weights_only=True)."
    )
    taps: list[str] = Field(default_factory=list, description="Teacher module paths whose outputs are served/cached.")
    precision: Precision = Field(default="fp32", description="Inference precision (fp16/bf16 autocast on GPU).")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Serve deployment options.")


SINGLE_TEACHER = "teacher"  # the name of a single-teacher job's teacher (JobSpec.teacher_list)
MEAN_TEACHER = "mean"  # losses.N.teacher: the teachers' weight-normalised average of logits
TEACHER_NAME = r"^[A-Za-z_][\w\-]*$"  # like pair names: no '/', which joins teacher and layer in feature keys


class NamedTeacherSpec(TeacherSpec):
    """One teacher of a multi-teacher job (``teachers:``): a teacher plus its name, logit weight and cache."""

    name: str = Field(pattern=TEACHER_NAME, description="Name of this teacher: pairs (student.pairs[].teacher_model) "
                      "and logit losses (losses[].teacher) refer to it; its features are keyed '<name>/<layer>'.")
    weight: float = Field(default=1.0, ge=0.0, description="Weight of this teacher's logits in the average that "
                          "logit losses with teacher: mean use (normalised over the teachers; >= 0).")
    cache_uri: str | None = Field(default=None, description="This teacher's feature cache (cache mode); default "
                                  "<features.cache.uri>/<name>.")

    def single(self) -> TeacherSpec:
        """The same teacher as a plain :class:`TeacherSpec` (what a single-teacher job holds)."""
        return TeacherSpec.model_validate(self.model_dump(exclude={"name", "weight", "cache_uri"}))


class StudentSpec(Spec):
    """The small model being trained; projection heads exist only during training."""

    model: ModelSource = Field(description="Where the student comes from.")
    checkpoint: str | None = Field(default=None, description="Optional initial weights (.safetensors or torch file).")
    taps: list[str] = Field(default_factory=list, description="Extra student module paths to tap (pairs are added).")
    pairs: list[PairSpec] = Field(default_factory=list, description="Student layer <-> teacher layer pairs.")

    def tapped_layers(self) -> list[str]:
        """Every student layer tapped: explicit taps plus the student side of each pair, in order, unique."""
        seen: dict[str, None] = dict.fromkeys(self.taps)
        for p in self.pairs:
            seen.setdefault(p.student)
        return list(seen)
