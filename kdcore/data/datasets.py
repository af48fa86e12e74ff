"""Reading a spec's data source into arrays: x (N, ...) float32, y (N,) int64, ids (N,) int64."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcore.errors import DataError
from kdcore.spec.data import FactoryData, ImageFolderData, NpzData, ParquetData, SklearnDigits


@dataclass
class Arrays:
    """A whole dataset in memory. ``ids`` are stable sample ids (row numbers unless the source has ids)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0


def check_finite(x: np.ndarray, what: str, row_offset: int = 0) -> None:
    """Refuse NaN/Inf inputs, naming the first rows that hold them (they would poison normalisation and
    every step after it)."""
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.size else np.ones(len(x), dtype=bool)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(int(r) + row_offset) for r in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(f"{what}: {len(bad)} row(s) hold NaN or Inf values (rows {shown}); fix or drop those rows "
                        "in the dataset")


def _finish(x: np.ndarray, y: np.ndarray, what: str) -> Arrays:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} labels; both must have one row per sample")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0 (found {int(y.min())})")
    check_finite(x, what)
    return Arrays(x, y.astype(np.int64), np.arange(len(y), dtype=np.int64))


def load_arrays(source) -> Arrays:
    """Load the dataset a spec names."""
    if isinstance(source, SklearnDigits):
        from sklearn.datasets import load_digits

        d = load_digits()
        return _finish(d.images[:, None, :, :] / 16.0, d.target, "sklearn_digits")
    if isinstance(source, NpzData):
        p = Path(source.path)
        if not p.is_file():
            raise DataError(f"data.source.path: npz file not found: {p}")
        with np.load(p, allow_pickle=False) as f:
            for key in (source.x_key, source.y_key):
                if key not in f:
                    raise DataError(f"data.source: {p} has no array {key!r}; it has {sorted(f.files)}")
            return _finish(f[source.x_key], f[source.y_key], str(p))
    if isinstance(source, ParquetData):
        import pyarrow.parquet as pq

        p = Path(source.path)
        if not p.exists():
            raise DataError(f"data.source.path: parquet path not found: {p}")
        table = pq.read_table(p, columns=[*source.feature_columns, source.label_column])
        x = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in source.feature_columns], axis=1)
        if source.shape:
            x = x.reshape(len(x), *source.shape)
        return _finish(x, table.column(source.label_column).to_numpy(zero_copy_only=False), str(p))
    if isinstance(source, ImageFolderData):
        return _image_folder(source)
    if isinstance(source, FactoryData):
        from kdcore.modeling import resolve_target

        out = resolve_target(source.target, what="dataset factory")(**source.kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise DataError(f"dataset factory {source.target!r} must return (x, y) arrays")
        return _finish(np.asarray(out[0]), np.asarray(out[1]), source.target)
    raise DataError(f"unknown data source {source!r}")


def _image_folder(source: ImageFolderData) -> Arrays:
    root = Path(source.root)
    if not root.is_dir():
        raise DataError(f"data.source.root: not a directory: {root}")
    try:
        from PIL import Image
    except ImportError:
        raise DataError("imagefolder data needs Pillow installed") from None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"data.source.root: {root} has no class sub-folders")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}:
                continue
            img = Image.open(f).convert("L" if source.grayscale else "RGB").resize((source.image_size,) * 2)
            a = np.asarray(img, dtype=np.float32) / 255.0
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"data.source.root: no images under {root}")
    return _finish(np.stack(xs), np.asarray(ys), str(root))
