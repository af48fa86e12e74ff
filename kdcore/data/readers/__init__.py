"""Row readers, one per source kind, registered in one table: ``open_reader(spec.data.source)``."""

from __future__ import annotations

from typing import Callable

import numpy as np

from kdcore.data.readers.base import ArrayReader, RowReader, check_finite, check_labels
from kdcore.errors import DataError


def _digits(spec) -> RowReader:
    x, y = digits_arrays()
    return ArrayReader(x, y, "sklearn_digits")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` floats in [0, 1] and int labels, read from the CSV the package
    ships without importing scikit-learn (which costs each Ray worker ~2 s of CPU); ``load_digits`` otherwise."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # where the package is, without importing it
    where = spec.submodule_search_locations if spec is not None else None
    csv = Path(where[0], "datasets", "data", "digits.csv.gz") if where else None
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    return images[:, None, :, :] / 16.0, target


def _npz(spec) -> RowReader:
    from pathlib import Path

    p = Path(spec.path)
    if not p.is_file():
        raise DataError(f"data.source.path: npz file not found: {p}")
    with np.load(p, allow_pickle=False) as f:
        for key in (spec.x_key, spec.y_key):
            if key not in f:
                raise DataError(f"data.source: {p} has no array {key!r}; it has {sorted(f.files)}")
        return ArrayReader(f[spec.x_key], f[spec.y_key], str(p))


def _parquet(spec) -> RowReader:
    from kdcore.data.readers.parquet import ParquetReader

    return ParquetReader(spec)


def _imagefolder(spec) -> RowReader:
    from kdcore.data.readers.imagefolder import ImageFolderReader

    return ImageFolderReader(spec)


def _npy_dir(spec) -> RowReader:
    from kdcore.data.readers.npydir import NpyDirReader

    return NpyDirReader(spec)


def _hf_disk(spec) -> RowReader:
    from kdcore.data.readers.hfdisk import HFDiskReader

    return HFDiskReader(spec)


def _factory(spec) -> RowReader:
    from kdcore.data.readers.factory import open_factory

    return open_factory(spec)


# The one place a data source kind is registered (its spec model lives in kdcore.spec.data).
READERS: dict[str, Callable[..., RowReader]] = {
    "sklearn_digits": _digits, "npz": _npz, "parquet": _parquet, "imagefolder": _imagefolder,
    "npy_dir": _npy_dir, "hf_disk": _hf_disk, "factory": _factory,
}


def open_reader(source) -> RowReader:
    """The reader of a ``data.source`` (or ``data.eval``) spec."""
    try:
        opener = READERS[source.kind]
    except KeyError:
        raise DataError(f"unknown data source kind {source.kind!r}; known: {sorted(READERS)}") from None
    return opener(source)


__all__ = ["ArrayReader", "READERS", "RowReader", "check_finite", "check_labels", "open_reader"]
