"""What travels: feature dtypes, and the binary HTTP bodies (``.npy`` in, Arrow IPC out; never pickle).

A response (from a handle or decoded from HTTP) is a dict::

    {"features": {layer: array}, "logits": array, "mode": "raw"|"projected", "dtype": "fp32"|"fp16"|"bf16",
     "projector_version": int | None, "ids": int64 array (id requests), "views": int64 array (id requests)}

``bf16`` arrays travel as uint16 bit patterns (numpy has no bfloat16); ``to_float32`` undoes any dtype.
Over HTTP the response is one Arrow IPC stream holding one record batch: a ``FixedSizeList`` column per
array (``feature:<layer>``, ``logits``, ``ids``, ``views``) and the shapes, mode, dtype and version in the
schema metadata (``kd.*`` keys); ``decode_arrow`` turns it back into the dict above.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from kdcore.cache.layout import bf16_bits_to_float32

DTYPES = ("fp32", "fp16", "bf16")
MODES = ("raw", "projected")
NPY_TYPES = ("application/x-npy", "application/octet-stream")
ARROW_TYPE = "application/vnd.apache.arrow.stream"
_FEATURE = "feature:"


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 features -> the travel dtype (bf16: uint16 bit patterns, round to nearest even). Converted by
    torch, ~20x faster than numpy's float16 / bf16 conversions."""
    import torch

    if dtype == "fp32":
        return np.ascontiguousarray(a, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if dtype == "fp16":
        return t.half().numpy()
    if dtype == "bf16":
        return t.bfloat16().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"unknown dtype {dtype!r}")


def to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A travelled array back to a new, writable float32 array."""
    if dtype == "bf16":
        return bf16_bits_to_float32(a)
    return np.array(a, dtype=np.float32, copy=True)


def to_tensor(a: np.ndarray, dtype: str):
    """A travelled array as a new float32 torch tensor (arrays from Ray are read-only: never aliased, always
    converted or cloned; torch converts fp16/bf16 several times faster than numpy)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        if dtype == "bf16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.float() if t.dtype != torch.float32 else t.clone()


def _all_finite(flat: np.ndarray, dtype: str) -> bool:
    """Whether every value is finite, fast: numpy for fp32; for fp16 / bf16 a float32 sum by torch (NaN and inf
    propagate; a bf16 sum that overflows float32 reads as not finite, and the exact pass below decides)."""
    if dtype != "bf16" and flat.dtype == np.float32:
        return bool(np.isfinite(flat).all())
    import warnings

    import torch

    with warnings.catch_warnings():  # arrays from Ray are read-only; they are only read here
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(flat.view(np.int16)).view(torch.bfloat16) if dtype == "bf16" else torch.from_numpy(flat)
    return bool(torch.isfinite(t.sum(dtype=torch.float32)))


def nonfinite_rows(arrays, dtype: str = "fp32") -> np.ndarray:
    """Indices of the rows (axis 0) where any of ``arrays`` (travel dtype ``dtype``; bf16 as uint16 bit patterns)
    holds NaN or inf; empty when all are finite. A fast all-finite pass first (~0.1 ms per MB); rows are found only
    when something is not finite."""
    bad = None
    for a in arrays:
        if a is None or not len(a):
            continue
        flat = np.ascontiguousarray(a).reshape(len(a), -1)
        if _all_finite(flat, dtype):
            continue
        if dtype == "bf16":  # exponent bits all ones: inf or NaN
            rows = ((flat.view(np.int16) & 0x7F80) == 0x7F80).any(1)
        else:
            rows = ~np.isfinite(flat).all(1)
        bad = rows if bad is None else bad | rows
    return np.zeros(0, np.int64) if bad is None else np.flatnonzero(bad)


def payload_nbytes(response: dict[str, Any]) -> int:
    """Bytes of the feature and logit arrays of a response (what scales with the batch)."""
    return sum(a.nbytes for a in response["features"].values()) + response["logits"].nbytes


# -- HTTP bodies -------------------------------------------------------------------------------------
def decode_npy(body: bytes) -> np.ndarray:
    """Parse a ``.npy`` body; object arrays (which would need pickle) are refused. Raises ValueError."""
    if not body:
        raise ValueError("the request body is empty; send a .npy array (numpy.save) of shape (batch, ...)")
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the body's fault
        if "allow_pickle" in str(e):
            raise ValueError("the .npy holds Python objects (it would need pickle, which is never loaded); send a "
                             "numeric array") from None
        raise ValueError(f"the body is not a valid .npy file ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(x, np.ndarray):  # an .npz archive
        raise ValueError("the body is an .npz archive; send one .npy array (numpy.save)")
    return x


def encode_npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def _column(a: np.ndarray):
    import pyarrow as pa

    n = len(a)
    flat = np.ascontiguousarray(a).reshape(-1)
    width = flat.size // n if n else int(np.prod(a.shape[1:], dtype=np.int64))
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def encode_arrow(response: dict[str, Any]) -> bytes:
    """A response dict as an Arrow IPC stream (see the module docstring)."""
    import pyarrow as pa

    arrays = {f"{_FEATURE}{k}": v for k, v in response["features"].items()}
    arrays["logits"] = response["logits"]
    for key in ("ids", "views"):
        if response.get(key) is not None:
            arrays[key] = np.asarray(response[key], dtype=np.int64).reshape(-1, 1)
    meta = {
        "kd.shapes": json.dumps({k: list(v.shape[1:]) for k, v in arrays.items()}),
        "kd.mode": response["mode"],
        "kd.dtype": response["dtype"],
        "kd.projector_version": json.dumps(response.get("projector_version")),
    }
    table = pa.table({k: _column(v) for k, v in arrays.items()})
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_arrow(body: bytes) -> dict[str, Any]:
    """An Arrow IPC response body back to the response dict."""
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.BufferReader(body)).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    shapes = json.loads(meta["kd.shapes"])
    out: dict[str, Any] = {"features": {}, "mode": meta["kd.mode"], "dtype": meta["kd.dtype"],
                           "projector_version": json.loads(meta["kd.projector_version"])}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        arr = flat.reshape(len(col), *shapes[name])
        if name.startswith(_FEATURE):
            out["features"][name[len(_FEATURE):]] = arr
        elif name in ("ids", "views"):
            out[name] = arr.reshape(-1)
        else:
            out[name] = arr
    return out
