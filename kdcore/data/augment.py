"""Seeded, replayable augmentation.

Each (sample id, view) has its own parameters, drawn from ``(seed, id, view)`` alone, so the teacher (when
its features are cached) and the student (when it reads them back) apply exactly the same transform.
Parameters are a float32 row per sample: ``shift_noise`` -> (dy, dx, noise_seed); ``crop_flip`` ->
(dy, dx, flip). ``none`` has no parameters.
"""

from __future__ import annotations

import numpy as np

from kdcore.spec.data import AugmentSpec

_N_PARAMS = {"none": 0, "shift_noise": 3, "crop_flip": 3}


def n_params(spec: AugmentSpec) -> int:
    return _N_PARAMS[spec.kind]


def augment_params(spec: AugmentSpec, ids: np.ndarray, views: np.ndarray | int) -> np.ndarray:
    """Parameters (len(ids), n_params) for each (id, view); view 0 of any sample is the identity."""
    ids = np.asarray(ids, dtype=np.int64)
    views = np.broadcast_to(np.asarray(views, dtype=np.int64), ids.shape)
    out = np.zeros((len(ids), n_params(spec)), dtype=np.float32)
    if spec.kind == "none":
        return out
    s = spec.max_shift
    for i, (sid, v) in enumerate(zip(ids.tolist(), views.tolist())):
        if v == 0:
            continue  # view 0 is always the clean input: the eval-time view and the teacher's default
        rng = np.random.default_rng([spec.seed, sid, v])
        dy, dx = rng.integers(-s, s + 1, size=2)
        third = rng.integers(0, 2**31 - 1) if spec.kind == "shift_noise" else rng.integers(0, 2)
        out[i] = (dy, dx, third)
    return out


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift a (C, H, W) image by (dy, dx), filling with zeros (the padded-crop equivalent)."""
    out = np.zeros_like(img)
    h, w = img.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = img[..., ys, xs]
    return out


def apply_augment(spec: AugmentSpec, x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Apply the per-row ``params`` to a batch ``x`` (B, C, H, W); returns a new array."""
    if spec.kind == "none" or params.shape[1] == 0:
        return x
    out = np.empty_like(x)
    for i in range(len(x)):
        dy, dx, third = (int(v) for v in params[i])
        img = _shift(x[i], dy, dx) if (dy or dx) else x[i].copy()
        if spec.kind == "shift_noise" and spec.noise_std > 0 and (dy or dx or third):
            img = img + np.random.default_rng(third).normal(0, spec.noise_std, img.shape).astype(img.dtype)
        elif spec.kind == "crop_flip" and spec.flip and third:
            img = img[..., ::-1]
        out[i] = img
    return out
