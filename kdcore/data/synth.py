"""Synthetic image datasets written to disk the way users prepare theirs: PNG/JPEG bytes in Parquet shards
(with ids and labels) or an ImageFolder tree. For tests, benchmarks and docs; nothing is downloaded.

Each class is a coloured blob at a class-dependent position over noise, so small models learn it quickly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def synth_images(n: int, size: int = 32, classes: int = 10, seed: int = 0, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 images and (n,) int64 labels; rows ``start..start+n`` of an endless stream."""
    labels = np.empty(n, dtype=np.int64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        rng = np.random.default_rng([seed, start + i])
        c = int(rng.integers(0, classes))
        angle = 2 * np.pi * c / classes
        cy, cx = 0.5 + 0.3 * np.sin(angle), 0.5 + 0.3 * np.cos(angle)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], dtype=np.float64) / 255
        img = 0.25 * rng.random((size, size, 3)) + blob[..., None] * (0.4 + 0.6 * colour)
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
        labels[i] = c
    return images, labels


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_parquet_images(root: str | Path, n: int, size: int = 32, classes: int = 10, shards: int = 2,
                         rows_per_group: int = 256, fmt: str = "PNG", seed: int = 0, fs=None) -> list[str]:
    """``shards`` Parquet files under ``root`` with columns id (int64), image (bytes), label (int64), written
    ``rows_per_group`` rows per row group, a few thousand rows at a time (bounded memory). Returns the paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = str(root).rstrip("/")
    if fs is None:
        Path(root).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("label", pa.int64())])
    paths = []
    for k in range(shards):
        path = f"{root}/part-{k:05d}.parquet"
        sink = fs.open(path, "wb") if fs is not None else path
        with pq.ParquetWriter(sink, schema) as w:
            for s in range(int(bounds[k]), int(bounds[k + 1]), 4096):
                e = min(s + 4096, int(bounds[k + 1]))
                imgs, labels = synth_images(e - s, size, classes, seed, start=s)
                table = pa.table({"id": np.arange(s, e, dtype=np.int64) * 7 + 3,
                                  "image": [encode(im, fmt) for im in imgs], "label": labels}, schema=schema)
                w.write_table(table, row_group_size=rows_per_group)
        if fs is not None:
            sink.close()
        paths.append(path)
    return paths


def write_image_folder(root: str | Path, n: int, size: int = 32, classes: int = 10, fmt: str = "PNG",
                       seed: int = 0) -> Path:
    """root/class_<k>/<i>.png images."""
    root = Path(root)
    imgs, labels = synth_images(n, size, classes, seed)
    ext = "png" if fmt == "PNG" else "jpg"
    for i, (im, c) in enumerate(zip(imgs, labels)):
        d = root / f"class_{int(c):02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.{ext}").write_bytes(encode(im, fmt))
    return root
