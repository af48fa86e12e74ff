"""The replica's work, without Serve: the teacher, the job's training split, and turning requests into features.

``TeacherCore`` is what each Serve replica holds; it is plain Python, so a cache writer (or a test) can use it
in-process too: ``features_for_rows(start, stop, views)`` returns ``{layer: fp32, "logits": fp32, "aug": ...}``
numpy arrays for rows of the cache layout (row ``r`` = training row ``r // views``, view ``r % views``), i.e. a
ready ``compute_fn`` for ``kdcore.cache.build``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from kdcore.data.rows import RowMapper
from kdcore.data.splits import DataSplit
from kdcore.errors import TeacherError, UserError
from kdcore.loop import build_teacher, load_split
from kdcore.spec.job import JobSpec
from kdcore.teacher import LOGITS
from services.teacher.projection import Projection
from services.teacher.wire import DTYPES, MODES, cast, nonfinite_rows


class RequestError(UserError):
    """A request the teacher refuses. ``status`` is the HTTP status it maps to (422 unless said otherwise)."""

    def __init__(self, message: str, status: int = 422, **details: Any) -> None:
        super().__init__(message, status=status, **details)
        self.status = status


class NonFiniteOutputError(TeacherError):
    """The teacher produced NaN or inf for some rows of finite inputs: an overflow in the forward, the projection or
    the cast to the travel dtype. Nothing is returned for the request (a cache is never written with it).
    ``rows``: the rows of the request (or of the cache) that are not finite; ``status``: 422 over HTTP."""

    def __init__(self, message: str, rows: list[int] | None = None, status: int = 422, **details: Any) -> None:
        super().__init__(message, rows=list(rows or []), status=status, **details)
        self.rows = list(rows or [])
        self.status = status


def _shown(rows, limit: int = 10) -> str:
    rows = [int(r) for r in rows]
    return f"{rows[:limit]}" + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


def nonfinite_output_error(rows, what: str = "request rows", ids=None, dtype: str = "fp32") -> NonFiniteOutputError:
    """The error for non-finite outputs at ``rows`` (of a request, or of a cache: ``what`` says which)."""
    where = f"{what} {_shown(rows)}" + (f" (training ids {_shown(ids)})" if ids is not None else "")
    cause = ("an overflow in the teacher forward or the projection" if dtype == "fp32" else
             f"an overflow in the teacher forward, the projection or the cast to {dtype} (fp16 ends at 65504: ask "
             "for fp32 or bf16)")
    return NonFiniteOutputError(f"the teacher produced non-finite values (NaN or inf) for {where}: {cause}; "
                                "nothing was returned for this request", rows=[int(r) for r in rows])


def split_fingerprint(split: DataSplit) -> str:
    """A cheap fingerprint of a training split (ids, labels and the inputs' identity): the stream client and the
    server must agree on it, or ids would name different samples."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.ids_train).tobytes())
    h.update(np.ascontiguousarray(split.y_train).tobytes())
    h.update(split.fingerprint().encode())
    return h.hexdigest()[:16]


class TeacherCore:
    """The teacher forward on ids or inputs, with projection and dtype encoding of the result."""

    def __init__(self, job: JobSpec, device: str | None = None, split: DataSplit | None = None) -> None:
        self.job = job
        self.split = split if split is not None else load_split(job)
        self.runner = build_teacher(job, device=device)
        self.mapper = RowMapper(self.split, job.data)  # the one cache row -> input mapping
        self.input_shape = tuple(int(d) for d in self.mapper.input_shape)
        self.shapes = self.runner.shapes(torch.from_numpy(self.mapper.cache_rows(0, min(2, self.mapper.n_rows)).x))
        self.taps = [k for k in self.shapes if k != LOGITS]
        self.dims = {k: int(np.prod(self.shapes[k])) for k in self.taps}
        self.n_train = self.split.n_train
        self.views = job.data.views
        self.projected_dim = job.features.stream.projected_dim
        self.fingerprint = split_fingerprint(self.split)

    # -- validation ---------------------------------------------------------------------------------------
    def check_mode(self, mode: str | None, dtype: str | None) -> tuple[str, str]:
        stream = self.job.features.stream
        mode = mode or stream.payload
        dtype = dtype or stream.dtype
        if mode not in MODES:
            raise RequestError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if dtype not in DTYPES:
            raise RequestError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return mode, dtype

    def check_ids(self, ids: Any, views: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Training-row indices (and their views) as int64 arrays; out-of-range values are refused."""
        a = np.asarray(ids)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise RequestError(f"ids must be a 1-D list of integer training-row indices, got shape {a.shape} "
                               f"dtype {a.dtype}")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.n_train):
            bad = a[(a < 0) | (a >= self.n_train)][:5].tolist()
            raise RequestError(f"ids {bad} are outside the {self.n_train} training rows [0, {self.n_train})")
        if views is None:
            v = np.zeros(len(a), dtype=np.int64)
        else:
            v = np.asarray(views)
            if v.ndim == 0:
                v = np.full(len(a), v)
            if v.shape != a.shape or (v.size and v.dtype.kind not in "iu"):
                raise RequestError(f"views must be integers, one per id ({len(a)}), got shape {v.shape} dtype {v.dtype}")
            v = v.astype(np.int64)
            if v.size and (v.min() < 0 or v.max() >= self.views):
                raise RequestError(f"views must be in [0, {self.views}) (data.views = {self.views}), got "
                                   f"{sorted(set(v[(v < 0) | (v >= self.views)].tolist()))[:5]}")
        return a, v

    def check_inputs(self, x: Any) -> np.ndarray:
        """Inputs of shape (batch, *input_shape), floating point; returned as contiguous float32."""
        if not isinstance(x, np.ndarray):
            if type(x).__module__.startswith("torch"):
                x = x.detach().cpu().numpy()
            else:
                raise RequestError(f"inputs must be a numpy array, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise RequestError(f"inputs have dtype {x.dtype}; send floating point inputs (float32; float16 and "
                               "float64 are converted)")
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise RequestError(f"inputs have shape {tuple(x.shape)}; expected (batch, "
                               f"{', '.join(map(str, self.input_shape))}) like the job's data")
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        bad = nonfinite_rows([x32])  # after the cast: float64 values beyond +-3.4e38 become inf in float32
        if len(bad):
            overflow = x.dtype.itemsize > 4 and bool(np.isfinite(x[bad]).all())
            raise RequestError(f"input rows {_shown(bad)} hold NaN or inf"
                               + (" after the cast to float32 (values beyond +-3.4e38 overflow)" if overflow else "")
                               + "; send finite float32 inputs", status=400, rows=bad.tolist())
        return x32

    # -- compute ------------------------------------------------------------------------------------------
    def inputs_for(self, ids: np.ndarray, views: np.ndarray) -> np.ndarray:
        """The (augmented) inputs of training rows ``ids`` under ``views``: exactly what the student sees."""
        return self.mapper.inputs(ids, views).x

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.runner(torch.from_numpy(x))
        return {k: v.numpy() for k, v in out.items()}

    def encode(self, out: dict[str, np.ndarray], mode: str, dtype: str, projection: Projection | None) -> dict[str, Any]:
        """float32 teacher outputs -> the response dict (projected features when asked; logits never are)."""
        if mode == "projected":
            if projection is None:
                raise RequestError("this teacher has no projection yet", status=503)
            feats = {k: cast(projection.apply(k, out[k]), dtype) for k in self.taps}
            version = projection.version
        else:
            feats = {k: cast(out[k], dtype) for k in self.taps}
            version = None
        return {"features": feats, "logits": cast(out[LOGITS], dtype), "mode": mode, "dtype": dtype,
                "projector_version": version}

    def feature_sample(self, rows: int, seed: int, batch: int = 256) -> dict[str, np.ndarray]:
        """Raw features of a seeded sample of training rows (view 0): what a PCA projection is fitted on. The
        rows are a few contiguous windows at seeded places (``sample_windows``), so the source is read in order."""
        idx = sample_windows(self.n_train, rows, seed)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.taps}
        for s in range(0, len(idx), batch):
            r = idx[s:s + batch]
            out = self.forward(self.inputs_for(r, np.zeros(len(r), np.int64)))
            for k in self.taps:
                parts[k].append(out[k])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def features_for_rows(self, start: int, stop: int, views: int | None = None, with_aug: bool = True,
                          batch: int = 256) -> dict[str, np.ndarray]:
        """fp32 features of cache rows ``[start, stop)`` (row r = training row r // views, view r % views):
        ``{layer: (n, ...), "logits": (n, C)}`` plus ``"aug"`` (n, n_params) when the augmentation has
        parameters and ``with_aug``. A ready ``compute_fn`` for ``kdcore.cache.build``."""
        ids, vs = self.rows_to_ids(start, stop, views)
        v = int(views or self.views)
        parts: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(ids), batch):
            if v == self.views:  # the cache layout: one contiguous read of the rows' inputs
                x = self.mapper.cache_rows(start + s, start + min(s + batch, len(ids))).x
            else:
                x = self.inputs_for(ids[s:s + batch], vs[s:s + batch])
            out = self.forward(x)
            for k, a in out.items():
                parts.setdefault(k, []).append(a)
        result = {k: np.concatenate(a) for k, a in parts.items()} if parts else {
            k: np.zeros((0, *self.shapes[k]), np.float32) for k in self.shapes}
        bad = nonfinite_rows(result.values())
        if len(bad):
            raise nonfinite_output_error(bad + start, "cache rows")
        if with_aug:
            result.update(self.aug_for(ids, vs))
        return result

    def rows_to_ids(self, start: int, stop: int, views: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(training row, view) of each cache row in ``[start, stop)`` with ``views`` views per sample."""
        v = int(views or self.views)
        if not (0 <= start <= stop <= self.n_train * v):
            raise RequestError(f"rows [{start}, {stop}) are outside the {self.n_train * v} cache rows "
                               f"({self.n_train} training rows x {v} views)")
        rows = np.arange(start, stop, dtype=np.int64)
        return rows // v, rows % v

    def aug_for(self, ids: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """``{"aug": params}`` of (row, view) pairs when the augmentation has parameters, else ``{}``."""
        if self.mapper.n_params == 0:
            return {}
        return {"aug": self.mapper.params(ids, views)}

    def info(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "taps": list(self.taps),
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "dims": dict(self.dims),
                "n_train": self.n_train, "views": self.views, "projected_dim": self.projected_dim,
                "split_fingerprint": self.fingerprint, "forwards": self.runner.forwards, "rows": self.runner.rows,
                "device": str(self.runner.device), "torch_threads": torch.get_num_threads()}


def sample_windows(n_train: int, rows: int, seed: int, windows: int = 8) -> np.ndarray:
    """``min(rows, n_train)`` distinct training rows, sorted: ``windows`` contiguous runs, one at a seeded place
    in each of ``windows`` equal strata of the rows (reading scattered rows would decode whole row groups of
    encoded files for one row each)."""
    n = min(rows, n_train)
    if n >= n_train:
        return np.arange(n_train, dtype=np.int64)
    rng = np.random.default_rng([seed, 7])
    w = max(1, min(windows, n))
    size, stratum = -(-n // w), n_train // w
    if size > stratum:  # most of the rows: one run
        start = int(rng.integers(0, n_train - n + 1))
        return np.arange(start, start + n, dtype=np.int64)
    starts = np.arange(w) * stratum + rng.integers(0, stratum - size + 1, size=w)
    return np.concatenate([np.arange(s, s + size) for s in starts])[:n].astype(np.int64)
