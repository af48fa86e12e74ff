"""Decoding images to float32 arrays: PNG/JPEG bytes or files -> (C, H, W) in [0, 1], resized to a square."""

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


def decode_image(data: bytes | str, size: int, grayscale: bool = False, where: str = "",
                 out: np.ndarray | None = None) -> np.ndarray:
    """One image (encoded bytes or a file path) as float32 (C, size, size) in [0, 1]; written into ``out`` (a
    float32 (C, size, size) array) when given, with no intermediate copy."""
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
    chw = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if out is None:
        out = np.empty(chw.shape, dtype=np.float32)
    return np.divide(chw, np.float32(255.0), out=out, dtype=np.float32)  # the same float32 division as x / 255


def decode_images(items, size: int, grayscale: bool = False, where=None) -> np.ndarray:
    """A batch of images as float32 (B, C, size, size); ``where(i)`` names item i in errors."""
    c = 1 if grayscale else 3
    out = np.empty((len(items), c, size, size), dtype=np.float32)
    for i, item in enumerate(items):
        if isinstance(item, dict):  # Hugging Face's image struct {bytes, path}
            item = item.get("bytes") or item.get("path")
        if item is None:
            raise DataError(f"{where(i) if where else f'item {i}'}: the image is empty (null)")
        decode_image(item, size, grayscale, where(i) if where else "", out=out[i])
    return out
