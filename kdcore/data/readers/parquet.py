"""Parquet shards read row group by row group: an image-bytes, tensor or numeric-columns input, a label
column and optional ids. Only the footers, labels and ids are held; a read decodes the row groups it
touches; the last eight row groups' stored bytes stay, so nearby windows cost one fetch."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from kdcore.data.fs import list_files
from kdcore.data.images import decode_pixel_batch, pixels_to_float
from kdcore.data.readers.base import RowReader, check_labels
from kdcore.errors import DataError
from kdcore.spec.data import ParquetData


RAW_CACHE_BYTES = 32 << 20


class ParquetReader(RowReader):
    def __init__(self, spec: ParquetData) -> None:
        import pyarrow.parquet as pq

        self.spec, self.name = spec, f"parquet {spec.path}"
        self.fs, self.files = list_files(spec.path, (".parquet", ".pq"), spec.s3_endpoint)
        self.num_classes = spec.num_classes
        self.input_columns = [spec.image_column] if spec.image_column else (
            [spec.tensor_column] if spec.tensor_column else list(spec.feature_columns or []))
        rg_file, rg_index, rg_rows, labels, ids, self._sizes = [], [], [], [], [], []
        for fi, path in enumerate(self.files):
            with self.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                wanted = [*self.input_columns, spec.label_column] + ([spec.id_column] if spec.id_column else [])
                missing = [c for c in wanted if c not in names]
                if missing:
                    raise DataError(f"data.source: {path} has no column(s) {missing}; it has {names}")
                for g in range(pf.num_row_groups):
                    rg_file.append(fi), rg_index.append(g), rg_rows.append(pf.metadata.row_group(g).num_rows)
                cols = [spec.label_column] + ([spec.id_column] if spec.id_column else [])
                t = pf.read(columns=cols)
                labels.append(t.column(spec.label_column).to_numpy(zero_copy_only=False))
                if spec.id_column:
                    ids.append(t.column(spec.id_column).to_numpy(zero_copy_only=False))
            self._sizes.append(self.fs.size(path))
        self._rg_file, self._rg_index = np.asarray(rg_file, np.int64), np.asarray(rg_index, np.int64)
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows, dtype=np.int64)])
        self._labels = check_labels(np.concatenate(labels) if labels else np.zeros(0, np.int64), self.name)
        self._ids = np.concatenate(ids).astype(np.int64) if ids else np.arange(len(self._labels), dtype=np.int64)
        if spec.id_column and len(np.unique(self._ids)) != len(self._ids):
            raise DataError(f"data.source.id_column: {spec.id_column!r} holds duplicate ids; ids must be unique")
        self._open: OrderedDict[int, Any] = OrderedDict()  # file index -> ParquetFile (a few kept open)
        self._raw: OrderedDict[int, np.ndarray] = OrderedDict()  # row group -> decoded inputs

    def __len__(self) -> int:
        return int(self._rg_start[-1])

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> np.ndarray:
        return self._ids

    def _file(self, fi: int):
        import pyarrow.parquet as pq

        if fi not in self._open:
            self._open[fi] = pq.ParquetFile(self.fs.open(self.files[fi], "rb"))
            while len(self._open) > 8:
                _, old = self._open.popitem(last=False)
                old.close()
        self._open.move_to_end(fi)
        return self._open[fi]

    def _group(self, g: int):
        """Row group ``g``'s stored inputs (image bytes, or a float32 array); the last few (at most eight, at most
        ``RAW_CACHE_BYTES``) stay in memory."""
        if g in self._raw:
            self._raw.move_to_end(g)
            return self._raw[g]
        fi = int(self._rg_file[g])
        table = self._file(fi).read_row_group(int(self._rg_index[g]), columns=self.input_columns)
        s = self.spec
        if s.image_column:
            raw = table.column(s.image_column).to_pylist()
        elif s.tensor_column:
            col = table.column(s.tensor_column).combine_chunks()
            flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            raw = flat.reshape(len(col), -1) if len(col) else flat.reshape(0, 0)
        else:
            raw = np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float32)
                            for c in s.feature_columns], axis=1)
        self._raw[g] = raw
        size = lambda r: sum(map(len, r)) if isinstance(r, list) else r.nbytes  # noqa: E731
        while len(self._raw) > 1 and (len(self._raw) > 8 or sum(map(size, self._raw.values())) > RAW_CACHE_BYTES):
            self._raw.popitem(last=False)
        return raw

    def fetch(self, start: int, stop: int):
        g = int(np.searchsorted(self._rg_start, start, side="right") - 1)
        parts = []
        while g < len(self._rg_file) and self._rg_start[g] < stop:
            raw = self._group(g)
            lo = max(start, self._rg_start[g]) - self._rg_start[g]
            hi = min(stop, self._rg_start[g + 1]) - self._rg_start[g]
            parts.append(raw[lo:hi])
            g += 1
        if self.spec.image_column:
            return [item for part in parts for item in part]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def decodes_images(self) -> bool:
        return bool(self.spec.image_column)

    def decode_pixels(self, raw, start: int = 0) -> np.ndarray:
        s = self.spec
        if not s.image_column:
            return super().decode_pixels(raw, start)
        return decode_pixel_batch(list(raw), s.image_size, s.grayscale, lambda i: f"{self.name} row {start + i}")

    def decode(self, raw, start: int = 0) -> np.ndarray:
        s = self.spec
        if s.image_column:
            return pixels_to_float(self.decode_pixels(raw, start))
        x = np.asarray(raw, dtype=np.float32)
        if s.shape:
            try:
                x = x.reshape(len(x), *s.shape)
            except ValueError:
                raise DataError(f"data.source.shape: rows of {x.shape[1]} values do not reshape to {s.shape}") from None
        return x

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rows": len(self), "files": [f.rsplit("/", 1)[-1] for f in self.files],
                "bytes": self._sizes, "input": self.input_columns, "image_size": self.spec.image_size,
                "grayscale": self.spec.grayscale}

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._raw.clear()
