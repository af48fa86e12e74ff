"""Where the student's teacher features come from: computed online, streamed, or read from a cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdcore.spec.base import Spec

FeatureDtype = Literal["fp32", "fp16", "bf16"]


class StreamSpec(Spec):
    """Streaming teacher features from the teacher deployment."""

    payload: Literal["raw", "projected"] = Field(
        default="raw", description="raw: tapped features + logits; projected: features through the teacher-side "
        "projection to d_p (smaller, not for losses that need raw features)."
    )
    projected_dim: int = Field(default=128, gt=0, description="d_p of the server-side projection (projected payload).")
    prefetch: int = Field(default=4, ge=1, description="Batches requested ahead of the training step.")
    dtype: FeatureDtype = Field(default="fp16", description="Dtype features travel in.")


class CacheSpec(Spec):
    """A Zarr feature cache of the teacher's tapped features and logits."""

    uri: str | None = Field(
        default=None, description="Cache location: a local directory, s3://bucket/prefix or memory://name."
    )
    chunk_rows: int = Field(default=1024, gt=0, description="Rows per chunk: the unit of writing, checksums and reads.")
    dtype: FeatureDtype = Field(default="fp16", description="Storage dtype of features.")
    compression: Literal["none", "zstd", "blosc"] = Field(
        default="none", description="Chunk compression (features compress only 1.1-1.7x; none reads fastest)."
    )
    logits_topk: int | None = Field(
        default=None, gt=0, description="Store only the top-k logits (indices + values) for large class counts."
    )
    reuse: bool = Field(default=True, description="Reuse a complete cache with the same fingerprints instead of rebuilding.")
    s3_endpoint: str | None = Field(default=None, description="S3-compatible endpoint URL (default: AWS or $AWS_ENDPOINT_URL).")
    shuffle_window: int = Field(default=8, ge=1, description="Chunks mixed together when shuffling rows.")
    prefetch: int = Field(default=4, ge=1, description="Chunk reads in flight in background threads.")
    loader: Literal["auto", "ray_data", "threads"] = Field(
        default="auto", description="How Ray Train workers read the cache: ray_data (the job's Ray Data pipeline: "
        "chunks joined with their input rows, decoded by Ray tasks, split across workers), threads (each worker "
        "reads its chunks in background threads, inputs from its own reader), auto (ray_data for datasets read "
        "from files: parquet, imagefolder, npy_dir, hf_disk; threads for in-memory ones, where a pipeline per "
        "epoch costs more than it saves). The cache build follows it: ray_data decodes its inputs in Ray Data "
        "tasks, threads has the teacher replicas read them.")
    decode_workers: int | None = Field(default=None, ge=1, description="Ray jobs: concurrent Ray Data tasks that "
                                       "read cache chunks and decode and augment their input rows for the training "
                                       "workers (loader ray_data; default 2).")
    input_store_mb: int = Field(default=256, ge=32, description="Ray jobs: object-store memory (MB) the training "
                                "input pipeline may hold in decoded blocks ahead of the workers (Ray Data's budget; "
                                "loader ray_data). The shared memory the input touches stays within it, however big "
                                "the dataset; the rest of the store is left to other work.")


class FeaturesSpec(Spec):
    """How the student gets the teacher's features."""

    mode: Literal["online", "stream", "cache"] = Field(
        default="online",
        description="online: teacher runs in each worker (baseline); stream: from the teacher deployment; cache: "
        "from the Zarr feature cache.",
    )
    stream: StreamSpec = Field(default_factory=StreamSpec, description="Options of the stream mode.")
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Options of the cache mode (and of `kd cache build`).")
