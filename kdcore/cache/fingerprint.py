"""Fingerprints that identify what a cache was computed from: the teacher and the dataset."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported only when a teacher is fingerprinted
    import torch

_BLOCK_BYTES = 64 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text (tuples become lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: {value!r}")


def _update_array(h: "hashlib._Hash", a: np.ndarray) -> None:
    h.update(f"{a.dtype.str}|{list(a.shape)}|".encode())
    if a.ndim == 0 or a.size == 0:
        h.update(np.ascontiguousarray(a).tobytes())
        return
    rows_per_block = max(1, _BLOCK_BYTES // max(1, a[0].nbytes if a.ndim > 1 else a.itemsize))
    for start in range(0, a.shape[0], rows_per_block):
        block = np.ascontiguousarray(a[start:start + rows_per_block])
        h.update(block.reshape(-1).view(np.uint8))


def teacher_fingerprint(model: "torch.nn.Module", arch: dict) -> str:
    """``sha256:<hex>`` of the architecture description and every state_dict tensor (names, dtypes,
    shapes and bytes, in sorted name order). Same weights and arch -> same fingerprint, on any device."""
    import torch

    h = hashlib.sha256()
    h.update(b"kd-teacher-v1|")
    h.update(canonical_json(arch).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):  # extra state objects
            h.update(f"|{name}|obj|{canonical_json(repr(t))}".encode())
            continue
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def dataset_fingerprint(ids: np.ndarray, x: np.ndarray) -> str:
    """``sha256:<hex>`` of the sample ids (as int64, in order) and the content ``x`` (dtype, shape, bytes)."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    h = hashlib.sha256()
    h.update(b"kd-dataset-v1|")
    _update_array(h, ids.astype("<i8", copy=False))
    h.update(b"|x|")
    _update_array(h, np.asarray(x))
    return "sha256:" + h.hexdigest()
