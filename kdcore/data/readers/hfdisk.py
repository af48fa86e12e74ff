"""A Hugging Face ``datasets`` directory written by ``save_to_disk``, read with pyarrow alone, memory-mapped.

``Dataset.save_to_disk(path)`` writes ``state.json`` (the shard list), ``dataset_info.json`` (the features:
``Image``, ``ClassLabel``, ``Array3D``...) and ``data-XXXXX-of-NNNNN.arrow`` shards in the Arrow IPC *stream*
format; ``DatasetDict.save_to_disk`` writes ``dataset_dict.json`` and one such directory per split.

Opening walks each shard's messages through a memory map: it keeps the byte offset and row count of every
record batch and copies out the label (and id) column; the payload (image bytes, arrays) is never touched, and
no mapping stays open. A read maps the shards of its window, reads the record batches it covers zero-copy,
copies out the rows of the window and lets the mapping go, so resident memory follows the window, not the
shard. ``datasets`` itself is never imported.

(Longer than most modules: the Arrow IPC stream walk, HF's feature types and their error messages belong
together, and splitting them would spread one format over several files.)
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.data.images import decode_pixel_batch, pixels_to_float
from kdcore.data.readers.base import RowReader, check_labels
from kdcore.errors import DataError
from kdcore.spec.data import HFDiskData

STATE, INFO, DICT = "state.json", "dataset_info.json", "dataset_dict.json"


def _storage(t):
    """The Arrow type under an extension type (HF's ArrayND types, when ``datasets`` is imported)."""
    import pyarrow as pa

    return t.storage_type if isinstance(t, pa.ExtensionType) else t


def _storage_array(a):
    import pyarrow as pa

    return a.storage if isinstance(a, pa.ExtensionArray) else a


def _is_list(t) -> bool:
    import pyarrow.types as pt

    return pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t)


def _is_numeric(t) -> bool:
    import pyarrow.types as pt

    return pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t)


def _leaf(t):
    t = _storage(t)
    while _is_list(t):
        t = _storage(t.value_type)
    return t


def _image_kind(t) -> str | None:
    """'struct' (HF Image: {bytes, path}), 'bytes', 'path' or None (not an image column)."""
    import pyarrow.types as pt

    t = _storage(t)
    if pt.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        if "bytes" in names and (pt.is_binary(t.field("bytes").type) or pt.is_large_binary(t.field("bytes").type)):
            return "struct"
        return None
    if pt.is_binary(t) or pt.is_large_binary(t):
        return "bytes"
    if pt.is_string(t) or pt.is_large_string(t):
        return "path"
    return None


def _hf_type(features: dict, column: str) -> str | None:
    f = features.get(column)
    return f.get("_type") if isinstance(f, dict) else None


class HFDiskReader(RowReader):
    def __init__(self, spec: HFDiskData) -> None:
        self.spec = spec
        self.root = _split_dir(spec)
        self.name = f"hf_disk {self.root}"
        self.state = _json(self.root / STATE, self.name)
        self.files = _data_files(self.root, self.state, self.name)
        info = _json(self.root / INFO, self.name) if (self.root / INFO).is_file() else {}
        self.features: dict = info.get("features") or {}
        s = spec
        self.input_columns = [s.image_column] if s.image_column else (
            [s.tensor_column] if s.tensor_column else list(s.feature_columns or []))
        self._schemas: list[Any] = []
        batch_file, batch_offset, batch_rows, labels, ids = [], [], [], [], []
        for fi, path in enumerate(self.files):
            schema, offsets, rows, lab, idv = self._scan(path, fi == 0, int(sum(batch_rows)))
            self._schemas.append(schema)
            batch_file += [fi] * len(offsets)
            batch_offset += offsets
            batch_rows += rows
            labels += lab
            ids += idv
        self._b_file = np.asarray(batch_file, np.int64)
        self._b_offset = np.asarray(batch_offset, np.int64)
        self._b_start = np.concatenate([[0], np.cumsum(batch_rows, dtype=np.int64)])
        if not len(self):
            raise DataError(f"{self.name}: the dataset holds no rows; point path at a non-empty dataset (or split)")
        y = np.concatenate(labels)
        if y.min() < 0:
            bad = np.flatnonzero(y < 0)[:5].tolist()
            raise DataError(f"{self.name}: label_column {s.label_column!r} holds {int(y.min())} at rows {bad}; labels "
                            "must be >= 0 (HF's ClassLabel writes -1 for 'no label': drop those rows with "
                            f"ds.filter(lambda r: r[{s.label_column!r}] >= 0) and save again, or use another split)")
        self._labels = check_labels(y, f"{self.name} label_column {s.label_column!r}")
        self._ids = (np.concatenate(ids).astype(np.int64) if s.id_column
                     else np.arange(len(self._labels), dtype=np.int64))
        if s.id_column and len(np.unique(self._ids)) != len(self._ids):
            raise DataError(f"{self.name}: id_column {s.id_column!r} holds duplicate ids; ids must be unique (or "
                            "leave id_column out to use row numbers)")
        self.num_classes = s.num_classes if s.num_classes is not None else self._class_count()
        self._sizes = [p.stat().st_size for p in self.files]
        if s.tensor_column:
            self._row_shape = self._tensor_shape()

    # ---- opening -----------------------------------------------------------------------------------------------
    def _scan(self, path: Path, first: bool, row_base: int):
        """One shard's schema, record batch offsets and row counts, and its labels (and ids)."""
        import pyarrow as pa

        s = self.spec
        try:
            mm = pa.memory_map(str(path), "r")
        except OSError as e:
            raise DataError(f"{self.name}: cannot open {path.name} ({e}); the dataset is incomplete: write it "
                            "again with save_to_disk") from None
        offsets, rows, labels, ids = [], [], [], []
        with mm:
            try:
                reader = pa.ipc.MessageReader.open_stream(mm)
                msg = reader.read_next_message()
                schema = pa.ipc.read_schema(msg)
            except (pa.ArrowException, StopIteration, OSError, ValueError) as e:
                raise DataError(f"{self.name}: {path.name} is not an Arrow IPC stream ({type(e).__name__}: {e}); "
                                "hf_disk reads what Dataset.save_to_disk writes (for Parquet files use kind: "
                                "parquet)") from None
            self._check_columns(schema, path, first)
            label_i = schema.get_field_index(s.label_column)
            id_i = schema.get_field_index(s.id_column) if s.id_column else -1
            n_before = row_base
            while True:
                at = mm.tell()
                try:
                    msg = reader.read_next_message()
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as e:
                    raise DataError(f"{self.name}: {path.name} is damaged at byte {at} ({e}); write the dataset "
                                    "again with save_to_disk") from None
                if msg.type in ("dictionary", "dictionary batch"):
                    raise DataError(f"{self.name}: {path.name} holds dictionary-encoded columns, which hf_disk "
                                    "does not read; cast them to plain types (ds.cast_column) and save again")
                if msg.type != "record batch":
                    continue
                try:
                    batch = pa.ipc.read_record_batch(msg, schema)
                except (pa.ArrowException, OSError, ValueError) as e:
                    raise DataError(f"{self.name}: {path.name} has a record batch at byte {at} that cannot be read "
                                    f"({type(e).__name__}: {e}); write the dataset again with save_to_disk") from None
                offsets.append(at)
                rows.append(batch.num_rows)
                labels.append(self._int_column(batch.column(label_i), "label_column", path, n_before))
                if id_i >= 0:
                    ids.append(self._int_column(batch.column(id_i), "id_column", path, n_before))
                n_before += batch.num_rows
                del batch, msg
        return schema, offsets, rows, labels, ids

    def _int_column(self, arr, field: str, path: Path, row0: int) -> np.ndarray:
        arr = _storage_array(arr)
        if arr.null_count:
            bad = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[:5] + row0
            raise DataError(f"{self.name}: {field} {getattr(self.spec, field)!r} is missing (null) at rows "
                            f"{bad.tolist()}; give every row a value (or drop those rows: ds.filter)")
        return np.array(arr.to_numpy(zero_copy_only=False), dtype=np.int64, copy=True)

    def _check_columns(self, schema, path: Path, first: bool) -> None:
        s = self.spec
        names = list(schema.names)
        fields = [("image_column", s.image_column), ("tensor_column", s.tensor_column)]
        fields += [(f"feature_columns.{i}", c) for i, c in enumerate(s.feature_columns or [])]
        fields += [("label_column", s.label_column), ("id_column", s.id_column)]
        for field, col in fields:
            if col is not None and col not in names:
                close = difflib.get_close_matches(col, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                where = "" if first else f" of {path.name}"
                raise DataError(f"{self.name}: {field} {col!r} is not a column{where}; {hint}the columns are {names}; "
                                f"set {field.split('.')[0]} to one of them")
        if not first:
            ref = self._schemas[0]
            for col in {*self.input_columns, s.label_column, s.id_column} - {None}:
                if not ref.field(col).type.equals(schema.field(col).type):
                    raise DataError(f"{self.name}: column {col!r} is {schema.field(col).type} in {path.name} but "
                                    f"{ref.field(col).type} in {self.files[0].name}; every shard must have the same "
                                    "features")
            return
        images = [n for n in names if _hf_type(self.features, n) == "Image" or
                  _image_kind(schema.field(n).type) == "struct"]
        if s.image_column:
            t = schema.field(s.image_column).type
            if _image_kind(t) is None:
                use = "tensor_column" if _is_list(_storage(t)) else "feature_columns"
                raise DataError(f"{self.name}: image_column {s.image_column!r} holds {_storage(t)}, not images "
                                f"(HF Image or encoded bytes); use {use} for it" +
                                (f", or image_column: {images[0]!r}" if images else ""))
        elif s.tensor_column:
            t = _storage(schema.field(s.tensor_column).type)
            if _image_kind(t) is not None and not _is_list(t):
                raise DataError(f"{self.name}: tensor_column {s.tensor_column!r} holds images ({t}); use "
                                f"image_column: {s.tensor_column!r}")
            if not _is_list(t):
                raise DataError(f"{self.name}: tensor_column {s.tensor_column!r} holds one {t} per row, not a "
                                "list or array; use feature_columns for scalar columns")
            if not _is_numeric(_leaf(t)):
                raise DataError(f"{self.name}: tensor_column {s.tensor_column!r} holds lists of {_leaf(t)}; it "
                                "must hold numbers (HF Array2D/Array3D or lists of int/float values)")
        else:
            for i, col in enumerate(s.feature_columns or []):
                t = _storage(schema.field(col).type)
                if not _is_numeric(t):
                    raise DataError(f"{self.name}: feature_columns.{i} {col!r} is {t}; feature columns must be "
                                    "numeric scalars (one value per row; lists go in tensor_column)")
        for field in ("label_column", "id_column"):
            col = getattr(s, field)
            if col is None:
                continue
            t = _storage(schema.field(col).type)
            import pyarrow.types as pt

            if not pt.is_integer(t):
                fix = ("cast it to integer class indices (ds.cast_column(..., ClassLabel(names=...)))"
                       if field == "label_column" else "use an integer column, or leave id_column out")
                raise DataError(f"{self.name}: {field} {col!r} is {t}; it must hold integers: {fix}")

    def _class_count(self) -> int | None:
        f = self.features.get(self.spec.label_column)
        if isinstance(f, dict) and f.get("_type") == "ClassLabel":
            names = f.get("names")
            if isinstance(names, list) and len(names) > 1:
                return len(names)
            if isinstance(f.get("num_classes"), int) and f["num_classes"] > 1:
                return int(f["num_classes"])
        return None

    def _tensor_shape(self) -> tuple[int, ...]:
        """The per-row shape of tensor_column, from its first row (every read checks its rows against it)."""
        return tuple(self._tensor_rows(self._column_range(0, 1)[0][0], 0, check=None).shape[1:])

    # ---- reading -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._b_start[-1])

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> np.ndarray:
        return self._ids

    def _column_range(self, start: int, stop: int) -> list[Any]:
        """The input columns of rows [start, stop) as Arrow arrays, one list per record batch touched, each
        sliced to the window; the arrays point into mappings that go away with them."""
        import pyarrow as pa

        b = int(np.searchsorted(self._b_start, start, side="right") - 1)
        parts: list[Any] = []
        mm, mm_file = None, -1
        try:
            while b < len(self._b_file) and self._b_start[b] < stop:
                fi = int(self._b_file[b])
                if fi != mm_file:
                    if mm is not None:
                        mm.close()
                    mm, mm_file = pa.memory_map(str(self.files[fi]), "r"), fi
                mm.seek(int(self._b_offset[b]))
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(mm), self._schemas[fi])
                lo = max(start, self._b_start[b]) - self._b_start[b]
                hi = min(stop, self._b_start[b + 1]) - self._b_start[b]
                parts.append([_storage_array(batch.column(batch.schema.get_field_index(c))).slice(lo, hi - lo)
                              for c in self.input_columns])
                b += 1
        finally:
            if mm is not None:
                mm.close()  # the mapping itself lives until the arrays above are released
        return parts

    def fetch(self, start: int, stop: int):
        s = self.spec
        parts = self._column_range(start, stop)
        if s.image_column:
            return [item for (col,) in parts for item in _image_items(col)]
        if s.tensor_column:
            out, at = [], start
            for (col,) in parts:
                out.append(self._tensor_rows(col, at, check=self._row_shape))
                at += len(col)
            return out[0] if len(out) == 1 else np.concatenate(out)
        blocks = [np.stack([np.array(_storage_array(c).to_numpy(zero_copy_only=False), dtype=np.float32)
                            for c in cols], axis=1) for cols in parts]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)

    def _tensor_rows(self, col, row0: int, check: tuple[int, ...] | None) -> np.ndarray:
        """A (nested) list column as a copied (n, *dims) array of its own dtype (float64 -> float32); every row
        must have the same nesting (and that of ``check``)."""
        import pyarrow.compute as pc
        import pyarrow.types as pt

        n, a, dims = len(col), _storage_array(col), []
        col_name = self.spec.tensor_column
        while _is_list(a.type):
            per_row = math.prod(dims)
            if a.null_count:
                bad = np.flatnonzero(a.is_null().to_numpy(zero_copy_only=False))[:5] // max(per_row, 1) + row0
                raise DataError(f"{self.name}: tensor_column {col_name!r} is missing (null) in rows "
                                f"{sorted(set(bad.tolist()))}; fix or drop those rows")
            want = check[len(dims)] if check is not None and len(dims) < len(check) else None
            if pt.is_fixed_size_list(a.type):
                length = a.type.list_size
            else:
                lengths = pc.list_value_length(a).to_numpy(zero_copy_only=False)
                length = want if want is not None else (int(lengths[0]) if len(lengths) else 0)
                odd = np.flatnonzero(lengths != length)
                if len(odd):
                    raise self._shape_error(int(odd[0]) // max(per_row, 1) + row0, check)
            if check is not None and want != length and n:
                raise self._shape_error(row0, check)
            dims.append(int(length))
            a = _storage_array(a.flatten())
        if check is not None and tuple(dims) != tuple(check) and n:
            raise self._shape_error(row0, check)
        values = a.to_numpy(zero_copy_only=False)  # nulls in the numbers come out as NaN: refused by name later
        dtype = np.float32 if values.dtype.kind == "f" else (np.uint8 if values.dtype == np.bool_ else values.dtype)
        return np.array(values, dtype=dtype, copy=True).reshape(n, *dims)

    def _shape_error(self, row: int, check) -> DataError:
        return DataError(f"{self.name}: tensor_column {self.spec.tensor_column!r}: row {row} is not shaped like row "
                         f"0 ({list(check) if check else 'the others'}); every row must have the same shape (pad or "
                         "resize the arrays, or drop the odd rows)")

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
        x = np.array(raw, dtype=np.float32, copy=True)
        if s.scale != 1.0:
            x *= np.float32(s.scale)
        if s.shape:
            per_row = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
            try:
                x = x.reshape(len(x), *s.shape)
            except ValueError:
                raise DataError(f"{self.name}: shape {s.shape} does not fit rows of {per_row} values "
                                f"{list(x.shape[1:])}; use a shape whose product is {per_row}") from None
        return x

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {"name": self.name, "rows": len(self), "files": [p.name for p in self.files], "bytes": self._sizes,
                "fingerprint": self.state.get("_fingerprint"), "split": s.split, "input": self.input_columns,
                "image_size": s.image_size, "grayscale": s.grayscale, "shape": s.shape, "scale": s.scale}


# ---- the directory ---------------------------------------------------------------------------------------------
def _image_items(col) -> list:
    """Encoded images (bytes, or a file path where HF stored no bytes) of an image column slice; None for nulls."""
    import pyarrow.types as pt

    col = _storage_array(col)
    if pt.is_struct(col.type):
        children = dict(zip([col.type.field(i).name for i in range(col.type.num_fields)], col.flatten()))
        data = children["bytes"].to_pylist()
        paths = children["path"].to_pylist() if "path" in children else [None] * len(data)
        return [b if b is not None else p for b, p in zip(data, paths)]
    return col.to_pylist()


def _json(path: Path, name: str) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read {path.name} ({type(e).__name__}: {e}); write the dataset again with "
                        "save_to_disk") from None
    if not isinstance(out, dict):
        raise DataError(f"{name}: {path.name} is not a JSON object; write the dataset again with save_to_disk")
    return out


def _split_dir(spec: HFDiskData) -> Path:
    """The directory of the one split to read: ``path`` itself, or ``path/<split>`` of a DatasetDict."""
    path = spec.path[len("file://"):] if spec.path.startswith("file://") else spec.path
    if "://" in path:
        raise DataError(f"hf_disk {spec.path}: path must be a local directory ({spec.path.split('://')[0]}:// is "
                        "not read); copy the dataset to a local or shared directory, or write it as Parquet shards "
                        "(ds.to_parquet) and use kind: parquet")
    root = Path(path).expanduser()
    name = f"hf_disk {root}"
    if not root.exists():
        import os

        where = "" if root.is_absolute() else f" (relative paths are resolved from {os.getcwd()})"
        raise DataError(f"{name}: path not found{where}; point path at the directory given to save_to_disk")
    if not root.is_dir():
        raise DataError(f"{name}: path is a file; point it at the directory given to save_to_disk"
                        + (" (for Parquet files use kind: parquet)" if root.suffix in (".parquet", ".pq") else ""))
    if (root / DICT).is_file():
        splits = _json(root / DICT, name).get("splits")
        splits = [str(x) for x in splits] if isinstance(splits, list) else sorted(
            p.name for p in root.iterdir() if (p / STATE).is_file())
        if spec.split is None:
            raise DataError(f"{name}: path is a DatasetDict with splits {splits}; set split: to one of them "
                            f"(e.g. split: {splits[0] if splits else 'train'} for data.source and the test split "
                            "for data.eval)")
        if spec.split not in splits:
            close = difflib.get_close_matches(spec.split, splits, n=1)
            raise DataError(f"{name}: split {spec.split!r} is not one of its splits {splits}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        root = root / spec.split
        if not (root / STATE).is_file():
            raise DataError(f"hf_disk {root}: split {spec.split!r} has no {STATE}; write the DatasetDict again with "
                            "save_to_disk")
        return root
    if not (root / STATE).is_file():
        have = sorted(p.name for p in root.iterdir())[:8]
        subs = [p.name for p in root.iterdir() if (p / STATE).is_file()]
        hint = (f"; its sub-directories {subs} are datasets: point path at one of them" if subs else
                "; hf_disk reads what Dataset.save_to_disk(path) writes (state.json, dataset_info.json, "
                "data-*.arrow)")
        if any(h.endswith((".parquet", ".pq")) for h in have):
            hint += "; for Parquet files use kind: parquet"
        raise DataError(f"{name}: not a directory written by save_to_disk: no {STATE} or {DICT} (it holds "
                        f"{have or 'nothing'}){hint}")
    if spec.split is not None:
        own = _json(root / STATE, name).get("_split")
        if own != spec.split:
            raise DataError(f"{name}: split {spec.split!r} is given but path is a single dataset (split "
                            f"{own!r}), not a DatasetDict; remove split, or point path at the DatasetDict "
                            "directory")
    return root


def _data_files(root: Path, state: dict, name: str) -> list[Path]:
    listed = state.get("_data_files")
    if isinstance(listed, list) and listed:
        files = [root / str(f.get("filename", "")) if isinstance(f, dict) else root / str(f) for f in listed]
    else:
        files = sorted(root.glob("data-*.arrow"))
    missing = [p.name for p in files if not p.is_file()]
    if missing or not files:
        raise DataError(f"{name}: {STATE} lists shard(s) that are missing: {missing[:5]}; copy the whole directory "
                        "(or write it again with save_to_disk)" if missing else
                        f"{name}: no data-*.arrow shards; write the dataset again with save_to_disk")
    return files
