"""What a teacher replica is built with, typed and frozen: the server options and the batch limits.

``ServerOptions`` travels from ``build_teacher_app`` (in the driver) to every replica's constructor; it is a
frozen dataclass (pickled by Ray as it is). ``BatchLimits`` is the one place the batching limits are derived
from ``teacher.serve``: the ``@serve.batch`` queue size and wait, how many batches may be formed at once, and
the replica's ``max_ongoing_requests`` (Serve's default of 5 would starve a batch of 256 rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from services.teacher.projection import FIXED_KINDS

# batches formed at once: one computes while the next one fills (a literal of the @serve.batch decorator, which
# has no setter for it; BatchLimits reports it)
MAX_CONCURRENT_BATCHES = 2


@dataclass(frozen=True)
class ServerOptions:
    """Replica options that are not in the job spec (they are decided by whoever builds the app)."""

    fingerprint: str  # names the projector registry: teacher + data + projection settings
    namespace: str  # Ray namespace of the projector registry
    projection: str = "pca"  # the fixed version-0 projection: pca | random
    projection_seed: int = 0
    pca_rows: int = 2048  # training rows the version-0 PCA is fitted on
    poll_s: float = 1.0  # how often replicas poll the projector registry
    token_sha256: str | None = None  # sha256 (hex) of the bearer token; None: resolve from the spec in the replica

    def __post_init__(self) -> None:
        if self.projection not in FIXED_KINDS:
            raise ValueError(f"unknown projection {self.projection!r}; use one of {', '.join(FIXED_KINDS)}")
        if self.poll_s <= 0 or self.pca_rows <= 0:
            raise ValueError(f"poll_s and pca_rows must be > 0, got {self.poll_s}, {self.pca_rows}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchLimits:
    """Dynamic batching limits of a replica, from ``teacher.serve`` (see ``batch_limits``)."""

    max_batch_size: int  # rows per forward; requests are cut into pieces of at most this many rows
    batch_wait_timeout_s: float  # how long a batch waits to fill
    max_ongoing_requests: int  # requests a replica accepts at once (>= max_batch_size, else batching starves)
    max_concurrent_batches: int = MAX_CONCURRENT_BATCHES


def batch_limits(serve_spec) -> BatchLimits:
    """The batching limits of a ``ServeSpec``: what the deployment options and the replica's batch queue use."""
    return BatchLimits(max_batch_size=int(serve_spec.max_batch_size),
                       batch_wait_timeout_s=float(serve_spec.batch_wait_timeout_s),
                       # at least a batch of requests in the replica; twice that lets the next batch fill while one
                       # computes (the spec refuses max_ongoing_requests < max_batch_size)
                       max_ongoing_requests=int(serve_spec.max_ongoing_requests or 2 * serve_spec.max_batch_size))
