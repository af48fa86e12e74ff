"""Seeded, replayable augmentation.

Each (sample id, view) has its own parameters, drawn from ``(seed, id, view)`` alone, so the teacher (when
its features are cached) and the student (when it reads them back) apply exactly the same transform.
Parameters are a float32 row per sample: ``shift_noise`` -> (dy, dx, noise_seed); ``crop_flip`` ->
(dy, dx, flip); ``random_resized_crop`` -> (top, left, height, width, flip) of the crop box, as drawn by
torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop of clamped aspect), replayed
with torch's bilinear antialiased resize. ``none`` has no parameters. View 0 is always the clean input
(for random_resized_crop: a centre crop of ``size``).

Decoded images are augmented as pixels (``apply_augment_pixels``: uint8 (H, W, C) in, uint8 out) where the kind
allows it (``PIXEL_KINDS``): random_resized_crop resizes the uint8 crop with torch's uint8 antialiased kernel
(fixed point: within one level of resizing floats, 3-4x faster), as torchvision's ImageNet recipe does
(RandomResizedCrop on the image, then ToTensor and Normalize); the model input is then ``normalise(pixels / 255)``. shift_noise and crop_flip work on normalised floats (their fill
is 0 after normalisation, the noise is Gaussian in that space) and keep the float path.
"""

from __future__ import annotations

import math

import numpy as np

from kdcore.spec.data import AugmentSpec

_N_PARAMS = {"none": 0, "shift_noise": 3, "crop_flip": 3, "random_resized_crop": 5}
PIXEL_KINDS = ("none", "random_resized_crop")  # the kinds applied to uint8 pixels when inputs are decoded images


def n_params(spec: AugmentSpec) -> int:
    return _N_PARAMS[spec.kind]


def output_shape(spec: AugmentSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample shape after augmentation of inputs shaped ``shape`` (C, H, W)."""
    if spec.kind == "random_resized_crop" and spec.size:
        return (*shape[:-2], spec.size, spec.size)
    return tuple(shape)


def _rrc_box(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _centre_box(h: int, w: int, size: int | None) -> tuple[int, int, int, int]:
    ch, cw = min(h, size or h), min(w, size or w)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment_params(spec: AugmentSpec, ids: np.ndarray, views: np.ndarray | int,
                   image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Parameters (len(ids), n_params) for each (id, view); view 0 of any sample is the identity (or the
    centre crop). ``image_hw`` (the inputs' height and width) is needed by random_resized_crop."""
    ids = np.asarray(ids, dtype=np.int64)
    views = np.broadcast_to(np.asarray(views, dtype=np.int64), ids.shape)
    out = np.zeros((len(ids), n_params(spec)), dtype=np.float32)
    if spec.kind == "none":
        return out
    if spec.kind == "random_resized_crop":
        if image_hw is None:
            raise ValueError("random_resized_crop needs the input's (height, width)")
        h, w = image_hw
        for i, (sid, v) in enumerate(zip(ids.tolist(), views.tolist())):
            if v == 0:
                out[i] = (*_centre_box(h, w, spec.size), 0)
                continue
            rng = np.random.default_rng([spec.seed, sid, v])
            box = _rrc_box(rng, h, w, spec.scale, spec.ratio)
            out[i] = (*box, int(rng.integers(0, 2)) if spec.flip else 0)
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


def _resized_crops(spec: AugmentSpec, x: np.ndarray, params: np.ndarray, rows: list[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    size = spec.size or x.shape[-1]
    out = np.empty((len(rows), *x.shape[1:-2], size, size), dtype=np.float32)
    src = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    for i, j in enumerate(rows):
        top, left, h, w, flip = (int(v) for v in params[i])
        crop = src[j:j + 1, ..., top:top + h, left:left + w]
        if (h, w) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if flip:
            crop = crop.flip(-1)
        out[i] = crop[0].numpy()
    return out


def apply_augment(spec: AugmentSpec, x: np.ndarray, params: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Apply the per-row ``params`` (N, P) to images ``x`` (B, C, H, W); returns a new (N, C, H', W') array.
    Output row ``i`` is made from ``x[rows[i]]`` (default ``rows = arange(B)``, N = B), so the views of a
    sample decoded once are cut from it without first copying it once per view."""
    if spec.kind == "none" or params.shape[1] == 0:
        return x if rows is None else x[rows]
    index = list(range(len(x))) if rows is None else np.asarray(rows, dtype=np.int64).tolist()
    if spec.kind == "random_resized_crop":
        return _resized_crops(spec, x, params, index)
    out = np.empty((len(index), *x.shape[1:]), dtype=x.dtype)
    for i, j in enumerate(index):
        dy, dx, third = (int(v) for v in params[i])
        img = _shift(x[j], dy, dx) if (dy or dx) else x[j].copy()
        if spec.kind == "shift_noise" and spec.noise_std > 0 and (dy or dx or third):
            img = img + np.random.default_rng(third).normal(0, spec.noise_std, img.shape).astype(img.dtype)
        elif spec.kind == "crop_flip" and spec.flip and third:
            img = img[..., ::-1]
        out[i] = img
    return out


def apply_augment_pixels(spec: AugmentSpec, px: np.ndarray, params: np.ndarray,
                         rows: np.ndarray | None = None) -> np.ndarray:
    """``apply_augment`` on uint8 pixels ``px`` (B, H, W, C) for the ``PIXEL_KINDS``: a new uint8
    (N, H', W', C) array whose row ``i`` is the view ``params[i]`` of ``px[rows[i]]``. random_resized_crop: the
    crop box resized to ``size`` with torch's antialiased bilinear uint8 kernel (rounded), then the flip."""
    if spec.kind not in PIXEL_KINDS:
        raise ValueError(f"augmentation {spec.kind!r} works on normalised floats, not pixels")
    index = np.arange(len(px)) if rows is None else np.asarray(rows, dtype=np.int64)
    if spec.kind == "none" or params.shape[1] == 0:
        return px[index]
    import torch
    import torch.nn.functional as F

    size = spec.size or px.shape[2]
    out = np.empty((len(index), size, size, px.shape[-1]), dtype=np.uint8)
    src = torch.from_numpy(np.ascontiguousarray(px)).permute(0, 3, 1, 2)  # (B, C, H, W) in channels-last memory
    dst = torch.from_numpy(out).permute(0, 3, 1, 2)
    for i, j in enumerate(index.tolist()):
        top, left, h, w, flip = (int(v) for v in params[i])
        crop = src[j:j + 1, :, top:top + h, left:left + w]
        if (h, w) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        dst[i].copy_(crop[0].flip(-1) if flip else crop[0])
    return out
