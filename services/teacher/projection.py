"""Teacher-side projections of tapped features to ``d_p`` dimensions (the ``projected`` payload).

A projection maps each sample's flattened feature ``h`` (``d_t = prod(shape)`` values) of every tapped
layer to ``z = W h + b`` with ``W`` of shape ``(d_p, d_t)``. Projections are versioned: version 0 is a
fixed projection computed when the deployment first starts (``pca``: the top principal directions of a
seeded sample of features, or ``random``: a seeded random semi-orthogonal matrix); later versions are
weights a trainer publishes (``kind="published"``). Logits are never projected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from kdcore.errors import UserError

FIXED_KINDS = ("pca", "random")


@dataclass
class Projection:
    """One version of the projection: ``layers[name] = (W (d_p, d_t) float32, b (d_p,) float32)``."""

    version: int
    kind: str
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def apply(self, name: str, feats: np.ndarray) -> np.ndarray:
        """Project a batch ``(B, ...)`` of layer ``name``'s features to ``(B, d_p)`` float32."""
        w, b = self.layers[name]
        flat = np.ascontiguousarray(feats, dtype=np.float32).reshape(len(feats), -1)
        return flat @ w.T + b

    def to_wire(self) -> dict[str, Any]:
        """A plain dict of numpy arrays (what the registry actor stores and replicas fetch)."""
        return {"version": self.version, "kind": self.kind,
                "layers": {k: {"weight": w, "bias": b} for k, (w, b) in self.layers.items()}}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "Projection":
        return cls(int(d["version"]), str(d["kind"]),
                   {k: (np.asarray(v["weight"], np.float32), np.asarray(v["bias"], np.float32))
                    for k, v in d["layers"].items()})


def _as_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def check_weights(weights: Mapping[str, Any], dims: Mapping[str, int], d_p: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validate published weights: ``{layer: W}`` or ``{layer: {"weight": W, "bias": b}}`` (numpy or torch)
    for exactly the tapped layers, ``W`` of shape ``(d_p, d_t)``. Returns float32 (W, b) pairs."""
    if not isinstance(weights, Mapping):
        raise UserError(f"projector weights must be a dict of layer -> weight, got {type(weights).__name__}")
    missing, extra = sorted(set(dims) - set(weights)), sorted(set(weights) - set(dims))
    if missing or extra:
        raise UserError(f"projector weights must cover exactly the tapped layers {sorted(dims)}; "
                        f"missing {missing}, unexpected {extra}")
    out = {}
    for name, value in weights.items():
        if isinstance(value, Mapping):
            w, b = _as_numpy(value.get("weight")), value.get("bias")
            b = np.zeros(d_p, np.float32) if b is None else _as_numpy(b)
        else:
            w, b = _as_numpy(value), np.zeros(d_p, np.float32)
        if w.shape != (d_p, dims[name]):
            raise UserError(f"projector weight of {name!r} has shape {tuple(w.shape)}; expected "
                            f"({d_p}, {dims[name]}) = (features.stream.projected_dim, flattened layer size)")
        if b.shape != (d_p,):
            raise UserError(f"projector bias of {name!r} has shape {tuple(b.shape)}; expected ({d_p},)")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise UserError(f"projector weights of {name!r} hold NaN or inf")
        out[name] = (np.ascontiguousarray(w), np.ascontiguousarray(b))
    return out


def random_orthogonal(d_t: int, d_p: int, seed: int) -> np.ndarray:
    """A seeded ``(d_p, d_t)`` matrix with orthonormal rows (d_p <= d_t) or orthonormal columns (d_p > d_t)."""
    rng = np.random.default_rng([seed, d_t, d_p])
    a = rng.standard_normal((max(d_t, d_p), min(d_t, d_p)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # a unique, sign-fixed factor: the same matrix everywhere for this seed
    return np.ascontiguousarray((q.T if d_p <= d_t else q), dtype=np.float32)


def pca(features: np.ndarray, d_p: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of ``features`` (n, d_t): ``W`` = the top ``d_p`` principal directions (rows), ``b = -W mean``,
    so ``W h + b`` are the centred principal components. When ``d_p`` exceeds ``min(n, d_t)`` the missing
    rows are zero (there are no more directions of variance to keep). Signs are fixed (largest |loading| > 0)."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    mean = x.mean(0)
    xc = x - mean
    n, d_t = xc.shape
    # eigen-decompose the smaller of the covariance (d_t x d_t) and the Gram matrix (n x n): much cheaper
    # than an SVD of the data, and exact up to float64 rounding
    if d_t <= n:
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        order = np.argsort(evals)[::-1]
        evals, vt = evals[order], evecs[:, order].T
    else:
        evals, u = np.linalg.eigh(xc @ xc.T)
        order = np.argsort(evals)[::-1]
        evals, u = evals[order], u[:, order]
        keep = evals > 0
        vt = np.zeros((n, d_t))
        vt[keep] = (xc.T @ u[:, keep] / np.sqrt(evals[keep])).T
    rank = int((evals > max(float(evals[0]), 0.0) * 1e-10).sum()) if len(evals) else 0
    k = min(d_p, rank)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    w = np.zeros((d_p, x.shape[1]), dtype=np.float64)
    w[:k] = comps
    return w.astype(np.float32), (-(w @ mean)).astype(np.float32)


def fixed_projection(kind: str, dims: Mapping[str, int], d_p: int, seed: int,
                     sample: Mapping[str, np.ndarray] | None = None) -> Projection:
    """Version 0: ``random`` (seeded semi-orthogonal) or ``pca`` (fitted on ``sample``, {layer: (n, ...)})."""
    if kind not in FIXED_KINDS:
        raise UserError(f"unknown projection kind {kind!r}; use one of {', '.join(FIXED_KINDS)}")
    layers = {}
    for name, d_t in dims.items():
        if kind == "random":
            layers[name] = (random_orthogonal(d_t, d_p, seed), np.zeros(d_p, np.float32))
        else:
            if sample is None or name not in sample:
                raise UserError(f"a pca projection needs a feature sample of layer {name!r}")
            layers[name] = pca(sample[name], d_p)
    return Projection(0, kind, layers)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (names the registry of one teacher configuration)."""
    import json

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
