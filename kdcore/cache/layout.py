"""The cache layout: array names, storage dtypes, rows, chunks and views.

Rows are ``sample x view``, flattened sample-major: row ``r`` holds sample ``r // V``, view ``r % V``
(V = ``manifest.views``), so the V views of a sample are adjacent and one chunk holds whole samples
when ``chunk_rows`` is a multiple of V. Every per-row array is 2-D or more, ``(n_rows, *row_shape)``,
chunked ``(chunk_rows, *row_shape)``: one chunk is one contiguous block of rows, the unit of writing,
checksums and reads.

Arrays of the zarr group (paths relative to the cache root):

- ``layers/<name>``  per tapped layer, ``(n_rows, *layer_shape)``, storage dtype
- ``logits``         ``(n_rows, num_classes)`` (full logits), or with ``logits_topk = k``:
  ``logits_topk_idx`` ``(n_rows, k)`` int32 (class indices, by descending logit) and
  ``logits_topk_val`` ``(n_rows, k)`` storage dtype
- ``aug``            ``(n_rows, P)`` float32 augmentation parameters of each row (absent when P = 0)
- ``sample_ids``     ``(n_samples,)`` int64, the dataset ids, written once at creation
- ``kd_done/``       a group whose objects ``NNNNNNNN.json`` are the per-chunk done markers
- ``kd_lease/``      plain objects ``NNNNNNNN.json`` (not zarr): leases of builders computing chunks
  (see ``lease``), and ``create.json`` while a builder creates the cache

Chunk objects use zarr's default chunk key encoding with a "." separator (``layers/x/c.12.0``): one
object per chunk directly in the array's directory, no directory per chunk.

Storage dtypes: fp16 -> float16, fp32 -> float32, bf16 -> uint16 holding the bf16 bit pattern
(zarr has no bfloat16; ``torch.from_numpy(a).view(torch.bfloat16)`` reinterprets it for free).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcore.errors import UserError

if TYPE_CHECKING:
    from kdcore.cache.manifest import Manifest

STORAGE_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "bf16": np.dtype(np.uint16),
}

LOGITS = "logits"
TOPK_IDX = "logits_topk_idx"
TOPK_VAL = "logits_topk_val"
AUG = "aug"
SAMPLE_IDS = "sample_ids"
DONE_GROUP = "kd_done"
LEASE_GROUP = "kd_lease"

_LAYER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def layer_array(name: str) -> str:
    """The zarr path of a tapped layer's array."""
    if not _LAYER_NAME.match(name) or name.startswith("__"):
        raise UserError(
            f"layer name {name!r} cannot name a cache array: use letters, digits, '_', '.', '-' "
            "(module paths such as 'backbone.layer4' are fine)"
        )
    return f"layers/{name}"


def output_key(path: str) -> str:
    """The compute_fn / batch key of an array path (``layers/x`` -> ``x``)."""
    return path[len("layers/"):] if path.startswith("layers/") else path


def array_specs(m: "Manifest") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row arrays of a cache: zarr path -> (row shape, storage dtype). Keys of compute_fn outputs are
    layer names, "logits" (or the two top-k arrays) and "aug"; see ``output_key``."""
    dt = storage_dtype(m.dtype)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name, shape in m.layers.items():
        specs[layer_array(name)] = (tuple(shape), dt)
    if m.num_classes is not None:
        if m.logits_topk is None:
            specs[LOGITS] = ((m.num_classes,), dt)
        else:
            specs[TOPK_IDX] = ((m.logits_topk,), np.dtype(np.int32))
            specs[TOPK_VAL] = ((m.logits_topk,), dt)
    if m.aug_params > 0:
        specs[AUG] = ((m.aug_params,), np.dtype(np.float32))
    return specs


def logical_dtype(path: str, dtype: str) -> str:
    """What an array's values are (``fp16``/``fp32``/``bf16`` for features and logits, the numpy name of
    the fixed-dtype arrays)."""
    return {TOPK_IDX: "int32", AUG: "float32"}.get(path, dtype)


def storage_dtype(dtype: str) -> np.dtype:
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise UserError(f"cache dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}") from None


def n_chunks(n_rows: int, chunk_rows: int) -> int:
    return max(0, -(-n_rows // chunk_rows))


def chunk_bounds(i: int, n_rows: int, chunk_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk ``i``."""
    if not 0 <= i < n_chunks(n_rows, chunk_rows):
        raise IndexError(f"chunk {i} out of range (cache has {n_chunks(n_rows, chunk_rows)} chunks)")
    start = i * chunk_rows
    return start, min(start + chunk_rows, n_rows)


def chunk_assignment(n_chunks: int, writer: int, n_writers: int) -> range:
    """The contiguous range of chunks writer ``writer`` of ``n_writers`` owns.

    The ranges of all writers partition ``range(n_chunks)``; sizes differ by at most one."""
    if n_writers < 1 or not 0 <= writer < n_writers:
        raise UserError(f"writer {writer} of {n_writers}: need 0 <= writer < n_writers")
    return range(writer * n_chunks // n_writers, (writer + 1) * n_chunks // n_writers)


def rows_to_samples(row_start: int, row_stop: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, view index) of each row in ``[row_start, row_stop)``."""
    rows = np.arange(row_start, row_stop, dtype=np.int64)
    return rows // views, rows % views


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_numpy(value: Any) -> np.ndarray:
    """A compute_fn output as numpy. torch tensors are accepted; bf16 tensors become uint16 bit patterns."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        import torch  # only when the caller already hands us tensors

        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    return np.asarray(value)


def to_storage(value: Any, dtype: str) -> np.ndarray:
    """Convert features/logits to the storage dtype of ``dtype`` (fp16/fp32/bf16)."""
    arr = to_numpy(value)
    target = storage_dtype(dtype)
    if dtype == "bf16":
        if arr.dtype == np.uint16:  # already bf16 bits
            return arr
        return float_to_bf16_bits(arr)
    if arr.dtype == target:
        return arr
    if arr.dtype.kind not in "fiu":
        raise UserError(f"cannot store an array of dtype {arr.dtype} as {dtype}")
    return arr.astype(target)


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32) and values of the k largest logits per row, by descending value; among equal
    values the lower class index comes first (also at the cut-off). O(classes) per row."""
    x = np.asarray(logits, dtype=np.float32)
    rows, classes = x.shape
    kth = np.partition(x, classes - k, axis=1)[:, classes - k][:, None]  # k-th largest value per row
    above = x > kth
    tied = x == kth
    room = k - above.sum(axis=1, keepdims=True)  # how many tied values still fit
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    idx = np.nonzero(chosen)[1].reshape(rows, k)  # ascending class index within each row
    vals = np.take_along_axis(x, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties keep ascending index
    idx = np.take_along_axis(idx, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(vals, order, axis=1)
