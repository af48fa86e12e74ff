"""Decoding images: PNG/JPEG bytes or files -> uint8 pixels (H, W, C), resized to a square, or float32 (C, H, W)
in [0, 1]; and pixels -> float32 model inputs.

Decoded images travel as pixels (uint8, channels last: what the decoder produces) until the models need them:
a quarter of the bytes of float32 through Ray's object store and to an accelerator. ``pixels_to_float`` is the
one conversion, ``x / 255`` in float32, the same numbers as decoding straight to float32.
"""

from __future__ import annotations

import io

import numpy as np

from kdcore.errors import DataError


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image datasets need Pillow: pip install pillow") from None
    return Image


def _item(item):
    if isinstance(item, dict):  # Hugging Face's image struct {bytes, path}
        item = item.get("bytes") or item.get("path")
    return item


def decode_pixels(data: bytes | str, size: int, grayscale: bool = False, where: str = "",
                  out: np.ndarray | None = None) -> np.ndarray:
    """One image (encoded bytes or a file path) as uint8 (size, size, C); written into ``out`` (a uint8
    (size, size, C) array) when given."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as img:
            img = img.convert("L" if grayscale else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            a = np.asarray(img)  # uint8 (H, W) or (H, W, C)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file names itself and stops the run
        raise DataError(f"cannot decode the image {where or '(bytes)'}: {type(e).__name__}: {e}; fix or drop it") from None
    if a.ndim == 2:
        a = a[..., None]
    if out is None:
        return np.ascontiguousarray(a)
    out[...] = a
    return out


def decode_pixel_batch(items, size: int, grayscale: bool = False, where=None) -> np.ndarray:
    """A batch of images as uint8 (B, size, size, C); ``where(i)`` names item i in errors."""
    out = np.empty((len(items), size, size, 1 if grayscale else 3), dtype=np.uint8)
    for i, item in enumerate(items):
        item = _item(item)
        if item is None:
            raise DataError(f"{where(i) if where else f'item {i}'}: the image is empty (null)")
        decode_pixels(item, size, grayscale, where(i) if where else "", out=out[i])
    return out


def pixels_to_float(px: np.ndarray) -> np.ndarray:
    """uint8 pixels (B, H, W, C) -> float32 (B, C, H, W) in [0, 1], contiguous (a new array)."""
    px = np.asarray(px)
    if px.dtype != np.uint8 or px.ndim != 4:
        raise ValueError(f"pixels must be uint8 (B, H, W, C), got {px.dtype} {tuple(px.shape)}")
    out = np.empty((px.shape[0], px.shape[3], px.shape[1], px.shape[2]), dtype=np.float32)
    np.copyto(out, px.transpose(0, 3, 1, 2))
    return np.divide(out, np.float32(255.0), out=out)


def decode_image(data: bytes | str, size: int, grayscale: bool = False, where: str = "") -> np.ndarray:
    """One image as float32 (C, size, size) in [0, 1]."""
    return pixels_to_float(decode_pixels(data, size, grayscale, where)[None])[0]
