"""The cache manifest: what a cache holds and what it was computed from.

It is stored as the ``kd_cache`` attribute of the cache's zarr group. Its *identity* fields (teacher,
dataset, samples, layers, logits, views, augmentation, dtype) decide whether a cache can serve a job;
its *layout* fields (chunk_rows, compression) only matter when resuming a build. ``teacher_name`` (which
teacher of a multi-teacher job the cache is for; None for a single teacher's, and in manifests written before
it existed) is informative: the teacher fingerprint is what decides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping

from kdcore.cache.fingerprint import canonical_json
from kdcore.cache.layout import STORAGE_DTYPES, array_specs, logical_dtype, n_chunks
from kdcore.errors import CacheError, CacheMismatchError, UserError

if TYPE_CHECKING:
    from kdcore.spec.features import CacheSpec

FORMAT_VERSION = 1
ATTR_KEY = "kd_cache"
COMPRESSIONS = ("none", "zstd", "blosc")

# (field, what it means) in the order mismatches are reported.
IDENTITY_FIELDS: tuple[tuple[str, str], ...] = (
    ("teacher", "teacher fingerprint"),
    ("dataset", "dataset fingerprint"),
    ("n_samples", "number of samples"),
    ("layers", "tapped layers"),
    ("num_classes", "number of logit classes"),
    ("logits_topk", "logits top-k"),
    ("views", "views per sample"),
    ("augmentation", "augmentation spec"),
    ("aug_seed", "augmentation seed"),
    ("aug_params", "augmentation parameters per row"),
    ("dtype", "storage dtype"),
)
LAYOUT_FIELDS: tuple[tuple[str, str], ...] = (
    ("chunk_rows", "rows per chunk"),
    ("compression", "compression"),
)


def tool_version() -> str:
    import kdcore

    return str(getattr(kdcore, "__version__", "0.1.0"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """JSON round trip: tuples -> lists, numpy scalars -> numbers, so equal specs compare equal."""
    return json.loads(canonical_json(value))


@dataclass(frozen=True)
class Manifest:
    """What a cache holds. ``layers`` maps layer name -> per-row feature shape."""

    teacher: str
    dataset: str
    n_samples: int
    layers: dict[str, list[int]]
    num_classes: int | None = None
    logits_topk: int | None = None
    views: int = 1
    augmentation: dict = field(default_factory=dict)
    aug_seed: int = 0
    aug_params: int = 0
    dtype: str = "fp16"
    chunk_rows: int = 1024
    compression: str = "none"
    checksum: str = "crc32c"
    format_version: int = FORMAT_VERSION
    tool_version: str = field(default_factory=tool_version)
    created_at: str = field(default_factory=_now)
    complete: bool = False
    completed_at: str | None = None
    teacher_name: str | None = None  # teachers[].name of a multi-teacher job; informative, not an identity field

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", {str(k): [int(d) for d in v] for k, v in dict(self.layers).items()})
        object.__setattr__(self, "augmentation", _plain(self.augmentation or {}))
        problems = []
        if self.n_samples < 1:
            problems.append(f"n_samples must be >= 1 (got {self.n_samples})")
        if self.views < 1:
            problems.append(f"views must be >= 1 (got {self.views})")
        if not self.layers and self.num_classes is None:
            problems.append("a cache needs at least one layer or logits (num_classes)")
        for name, shape in self.layers.items():
            if any(d < 1 for d in shape):
                problems.append(f"layer {name!r} has an empty dimension in shape {shape}")
        if self.num_classes is not None and self.num_classes < 1:
            problems.append(f"num_classes must be >= 1 (got {self.num_classes})")
        if self.logits_topk is not None:
            if self.num_classes is None:
                problems.append("logits_topk needs num_classes")
            elif not 1 <= self.logits_topk <= self.num_classes:
                problems.append(f"logits_topk must be in 1..{self.num_classes} (got {self.logits_topk})")
        if self.aug_params < 0:
            problems.append(f"aug_params must be >= 0 (got {self.aug_params})")
        if self.dtype not in STORAGE_DTYPES:
            problems.append(f"dtype must be one of {sorted(STORAGE_DTYPES)} (got {self.dtype!r})")
        if self.chunk_rows < 1:
            problems.append(f"chunk_rows must be >= 1 (got {self.chunk_rows})")
        if self.compression not in COMPRESSIONS:
            problems.append(f"compression must be one of {COMPRESSIONS} (got {self.compression!r})")
        if problems:
            raise UserError("invalid cache manifest: " + "; ".join(problems), problems=problems)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self.n_samples * self.views

    @property
    def n_chunks(self) -> int:
        return n_chunks(self.n_rows, self.chunk_rows)

    def identity(self) -> dict:
        return {name: getattr(self, name) for name, _ in IDENTITY_FIELDS}

    def key(self) -> str:
        """A short stable name derived from the identity: the default directory of this cache under a root."""
        return "kd-" + hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        """The manifest as stored; ``arrays`` (derived, informative) lists every per-row array with its
        shape and dtypes."""
        d = _plain(asdict(self))
        arrays = {path: {"shape": [self.n_rows, *shape], "dtype": logical_dtype(path, self.dtype),
                         "stored_as": dtype.name} for path, (shape, dtype) in array_specs(self).items()}
        d["arrays"] = arrays
        d["n_rows"] = self.n_rows
        d["n_chunks"] = self.n_chunks
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(
                f"cache format version {version!r} is not supported by this kd (reads version {FORMAT_VERSION}); "
                "rebuild the cache with this kd or use the kd that wrote it"
            )
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise CacheError(f"cache manifest is malformed: {err}") from None

    @classmethod
    def from_group_meta(cls, raw: bytes, *, uri: str) -> "Manifest | None":
        """The manifest in a cache's root ``zarr.json``; None when the group has none (not, or not yet, a
        kd cache)."""
        try:
            meta = json.loads(raw)
        except ValueError:
            raise CacheError(f"{uri}/zarr.json is not valid JSON; the cache is damaged, remove it and rebuild")
        attrs = (meta.get("attributes") or {}).get(ATTR_KEY)
        return None if attrs is None else cls.from_dict(attrs)

    def with_updates(self, **changes: Any) -> "Manifest":
        return replace(self, **changes)


def make_manifest(
    *,
    teacher: str,
    dataset: str,
    n_samples: int,
    layers: Mapping[str, tuple[int, ...] | list[int]],
    num_classes: int | None = None,
    views: int = 1,
    augmentation: Mapping[str, Any] | None = None,
    aug_seed: int = 0,
    aug_params: int = 0,
    spec: "CacheSpec | None" = None,
    teacher_name: str | None = None,
    **storage: Any,
) -> Manifest:
    """The manifest a job expects. Storage options (dtype, chunk_rows, compression, logits_topk) come from
    ``spec`` (a ``CacheSpec``) and may be overridden by keyword; ``teacher_name``: the teacher's name in a
    multi-teacher job."""
    opts: dict[str, Any] = {}
    if spec is not None:
        opts.update(dtype=spec.dtype, chunk_rows=spec.chunk_rows, compression=spec.compression,
                    logits_topk=spec.logits_topk)
    opts.update(storage)
    return Manifest(
        teacher=teacher, dataset=dataset, n_samples=int(n_samples), layers={k: list(v) for k, v in layers.items()},
        num_classes=num_classes, views=int(views), augmentation=dict(augmentation or {}), aug_seed=int(aug_seed),
        aug_params=int(aug_params), teacher_name=teacher_name, **opts,
    )


def _short(value: Any) -> str:
    text = canonical_json(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."


def differences(expected: Manifest, found: Manifest, *, layout: bool = False) -> list[tuple[str, Any, Any]]:
    """(field, expected, found) for every identity field (and layout field) that differs."""
    fields = IDENTITY_FIELDS + (LAYOUT_FIELDS if layout else ())
    out = []
    for name, _ in fields:
        e, f = getattr(expected, name), getattr(found, name)
        if _plain(e) != _plain(f):
            out.append((name, e, f))
    return out


def check_manifest(expected: Manifest, found: Manifest, *, uri: str, layout: bool = False) -> None:
    """Raise ``CacheMismatchError`` naming every field that differs (expected vs found)."""
    diffs = differences(expected, found, layout=layout)
    if not diffs:
        return
    what = dict(IDENTITY_FIELDS + LAYOUT_FIELDS)
    parts = [f"{name} ({what[name]}): expected {_short(e)}, found {_short(f)}" for name, e, f in diffs]
    hint = (
        "point features.cache.uri at another location, or rebuild it (`kd cache rm` then `kd cache build JOB.yaml`)"
        if not any(name in dict(LAYOUT_FIELDS) for name, _, _ in diffs)
        else "resume with the chunk_rows/compression it was started with, or remove it and rebuild"
    )
    name, e, f = diffs[0]
    raise CacheMismatchError(
        f"cache at {uri} was built for a different job: " + "; ".join(parts) + f". Fix: {hint}",
        field=name, expected=e, found=f, fields=[d[0] for d in diffs], uri=uri,
    )
