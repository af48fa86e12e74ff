"""The data source (and ``data.eval``), read from metadata: files and columns exist, the per-sample shape,
the row count, the label range and (where the source says so) the class count. Over 300 lines on purpose:
one metadata inspector per source kind, side by side.

Nothing is loaded in full. Local ``.npz`` arrays are read by their ``.npy`` headers inside the zip (the label
array alone is read), local Parquet by its schema and row-group statistics, image folders by listing.
Other sources (Parquet on S3, ``.npy`` directories, factories, any kind added later) are opened with kd's
own row reader (``kdcore.data.readers.open_reader``), which holds metadata only and reads one row for the
shape; a factory dataset is called, since only it knows what it returns.
"""

from __future__ import annotations

import difflib
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcore.spec.job import JobSpec
from kdcore.validate.factories import check_kwargs, resolve
from kdcore.validate.report import Report, first_line, path_hint, with_timeout

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_MAX_LABELS_READ = 50_000_000  # npz: the label array is read to find its range when it has at most this many
REMOTE_TIMEOUT_S = 30.0


@dataclass
class DataInfo:
    """What the checks need to know about the data. None where it could not be found out."""

    shape: tuple[int, ...] | None = None  # one sample's input shape, as the model sees it (after augmentation)
    n_rows: int | None = None
    label_min: int | None = None
    label_max: int | None = None
    declared_classes: int | None = None  # from the source itself (a known dataset, folders, num_classes)
    n_train_rows: int | None = None  # training rows after the validation split

    @property
    def num_classes(self) -> int | None:
        """The data's class count: declared by the source, else the largest label + 1."""
        if self.declared_classes is not None:
            return self.declared_classes
        return None if self.label_max is None else self.label_max + 1

    def n_train(self, val_fraction: float | None = None) -> int | None:
        """Training rows (``val_fraction`` is accepted for callers of the first version and ignored)."""
        return self.n_train_rows


def inspect_data(job: JobSpec, report: Report, offline: bool = False) -> DataInfo:
    """Check ``data.source`` (and ``data.eval``); returns what could be learned about the training data."""
    info = inspect_source(job.data.source, "data.source", report, offline)
    ev = getattr(job.data, "eval", None)
    if ev is not None:
        ev_info = inspect_source(ev, "data.eval", report, offline)
        if info.shape and ev_info.shape and info.shape != ev_info.shape:
            report.add("data.eval", f"its inputs are shaped {ev_info.shape} but data.source's are {info.shape}",
                       None, "evaluate on data shaped like the training data (same image_size, channels)")
    if info.shape is not None:
        try:
            from kdcore.data.augment import output_shape
        except ImportError:
            pass
        else:
            info.shape = tuple(output_shape(job.data.augment, info.shape))
    info.n_train_rows = _n_train(job, info, report)
    return info


def _n_train(job: JobSpec, info: DataInfo, report: Report) -> int | None:
    n = info.n_rows
    if n is None:
        return None
    if getattr(job.data, "eval", None) is not None:
        return n  # every row of data.source trains
    try:
        from kdcore.data.splits import val_rows_of
    except ImportError:
        return n - max(1, int(round(n * job.data.val_fraction)))
    try:
        return n - len(val_rows_of(n, job.data))
    except Exception as e:  # noqa: BLE001 - DataError: the split leaves no training rows
        report.add("data.val_fraction", getattr(e, "message", str(e)), job.data.val_fraction,
                   "lower data.val_fraction (or data.split_block)")
        return None


def inspect_source(src, prefix: str, report: Report, offline: bool = False) -> DataInfo:
    kind = getattr(src, "kind", None)
    if kind == "sklearn_digits":
        return DataInfo((1, 8, 8), 1797, 0, 9, declared_classes=10)
    if kind == "npz":
        return _npz(src, prefix, report)
    if kind == "imagefolder":
        return _image_folder(src, prefix, report)
    if kind == "parquet" and "://" not in src.path:
        return _parquet(src, prefix, report)
    if kind == "factory":
        fn = resolve(src.target, f"{prefix}.target", report, what="dataset factory")
        if fn is None or not check_kwargs(fn, src.kwargs, prefix, report, src.target):
            return DataInfo()
    remote = "://" in str(getattr(src, "path", "") or getattr(src, "root", "") or "")
    if remote and offline:
        report.note(f"{prefix}: {getattr(src, 'path', '')} not checked (--offline)")
        return DataInfo()
    return _via_reader(src, prefix, report, timeout=REMOTE_TIMEOUT_S if remote else None)


# ---- kd's own row reader: every source kind it knows --------------------------------------------------------
def _via_reader(src, prefix: str, report: Report, timeout: float | None = None) -> DataInfo:
    try:
        from kdcore.data.readers import open_reader
    except ImportError:  # the first data layer: arrays only
        return _via_arrays(src, prefix, report)

    def look():
        reader = open_reader(src)
        try:
            y = np.asarray(reader.labels())
            shape = tuple(int(d) for d in reader.sample_shape) if len(reader) else None
            return DataInfo(shape, len(reader), int(y.min()) if y.size else None, int(y.max()) if y.size else None,
                            declared_classes=getattr(reader, "num_classes", None))
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()

    t0 = time.perf_counter()
    if timeout is None:
        try:
            info = look()
        except Exception as e:  # noqa: BLE001 - DataError (the source's own words), or whatever user code raises
            report.add(prefix, f"the data cannot be read: {_message(e)}", None, f"fix {prefix} (or the data)")
            return DataInfo()
    else:

        info, err = with_timeout(look, timeout)
        if err is not None:
            report.note(f"{prefix}: {getattr(src, 'path', '')} could not be read from here ({err}); not checked "
                        "(--offline skips this)")
            return DataInfo()
    if getattr(src, "kind", None) == "factory":
        report.note(f"{prefix}: opened {src.target} to see its data ({info.n_rows} rows, "
                    f"{time.perf_counter() - t0:.1f} s)")
    return info


def _message(e: BaseException) -> str:
    text = getattr(e, "message", None)
    return text if isinstance(text, str) and text else first_line(e)


def _via_arrays(src, prefix: str, report: Report) -> DataInfo:
    """Factory datasets of the first data layer: call it, look at the (x, y) arrays."""
    if getattr(src, "kind", None) != "factory":
        report.note(f"{prefix}: kind {getattr(src, 'kind', '?')!r} is not checked by kd validate")
        return DataInfo()
    fn = resolve(src.target, f"{prefix}.target", report, what="dataset factory")
    if fn is None:
        return DataInfo()
    try:
        out = fn(**src.kwargs)
    except Exception as e:  # noqa: BLE001 - user code
        report.add(prefix, f"the dataset factory {src.target} fails: {first_line(e)}", None,
                   "fix its kwargs or the function")
        return DataInfo()
    if not (isinstance(out, tuple) and len(out) == 2):
        report.add(f"{prefix}.target", f"a dataset factory must return (x, y) arrays; {src.target} returned "
                   f"{type(out).__name__}", src.target, "return a tuple (inputs N x ..., integer labels N)")
        return DataInfo()
    x, y = np.asarray(out[0]), np.asarray(out[1])
    info = DataInfo()
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        report.add(f"{prefix}.target", f"inputs must be a numeric N x ... array, got {x.dtype} of shape {x.shape}",
                   src.target, "return float inputs, one row per sample")
    else:
        info.shape, info.n_rows = tuple(int(d) for d in x.shape[1:]), int(x.shape[0])
    if y.ndim != 1 or y.dtype.kind not in "iu":
        report.add(f"{prefix}.target", f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}",
                   src.target, "return integer class indices, one per sample")
        return info
    if info.n_rows is not None and len(y) != info.n_rows:
        report.add(f"{prefix}.target", f"{info.n_rows} inputs but {len(y)} labels", src.target,
                   "return one label per input row")
    if len(y):
        info.label_min, info.label_max = int(y.min()), int(y.max())
    return info


# ---- local files, by their metadata ------------------------------------------------------------------------------
def _local(path_value: str, field: str, what: str, report: Report, want_dir: bool | None = None) -> Path | None:
    if "://" in path_value:
        scheme = path_value.split("://", 1)[0]
        report.add(field, f"{what} is read from a local path; {scheme}:// is not supported here", path_value,
                   "copy the data to a local or shared directory and point the spec at it")
        return None
    p = Path(path_value).expanduser()
    exists = p.is_dir() if want_dir else (p.is_file() if want_dir is False else p.exists())
    if not exists:
        kind = "directory" if want_dir else ("file" if want_dir is False else "path")
        report.add(field, f"{what} {kind} not found", path_value, path_hint(path_value))
        return None
    return p


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _npz(src, prefix: str, report: Report) -> DataInfo:
    p = _local(src.path, f"{prefix}.path", "npz", report, want_dir=False)
    if p is None:
        return DataInfo()
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        report.add(f"{prefix}.path", f"not a readable .npz file ({first_line(e)})", src.path,
                   "write it with numpy.savez(path, x=..., y=...)")
        return DataInfo()
    with zf:
        arrays = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        info = DataInfo()
        headers = {}
        for key, field in ((src.x_key, "x_key"), (src.y_key, "y_key")):
            if key not in arrays:
                close = difflib.get_close_matches(key, arrays, n=1)
                fix = (f"did you mean {close[0]!r}? " if close else "") + f"it holds {arrays}; set {prefix}.{field}"
                report.add(f"{prefix}.{field}", f"{p.name} has no array {key!r}", key, fix)
                continue
            try:
                headers[key] = _npy_header(zf, key + ".npy")
            except Exception as e:  # noqa: BLE001 - a damaged member
                report.add(f"{prefix}.{field}", f"array {key!r} of {p.name} cannot be read ({first_line(e)})", key,
                           "rewrite the file with numpy.savez")
        if src.x_key in headers:
            shape, dtype = headers[src.x_key]
            if dtype.kind not in "biuf":
                report.add(f"{prefix}.x_key", f"inputs must be numeric, {src.x_key!r} is {dtype}", src.x_key,
                           "store the inputs as a float or integer array")
            elif len(shape) < 2:
                report.add(f"{prefix}.x_key", f"inputs must be N x ... (one row per sample), {src.x_key!r} has "
                           f"shape {shape}", src.x_key, "store one row per sample")
            else:
                info.shape, info.n_rows = shape[1:], shape[0]
        if src.y_key in headers:
            shape, dtype = headers[src.y_key]
            if len(shape) != 1 or dtype.kind not in "iu":
                report.add(f"{prefix}.y_key", f"labels must be a 1-D integer array, {src.y_key!r} is {dtype} of "
                           f"shape {shape}", src.y_key, "store integer class indices, one per sample")
                return info
            if info.n_rows is not None and shape[0] != info.n_rows:
                report.add(f"{prefix}.y_key", f"{info.n_rows} inputs but {shape[0]} labels", src.y_key,
                           "store one label per input row")
            info.n_rows = shape[0] if info.n_rows is None else info.n_rows
            if 0 < shape[0] <= _MAX_LABELS_READ:
                with np.load(p, allow_pickle=False) as f:
                    y = f[src.y_key]
                info.label_min, info.label_max = int(y.min()), int(y.max())
    return info


def _column(names: list[str], col: str, field: str, report: Report) -> bool:
    if col in names:
        return True
    close = difflib.get_close_matches(col, names, n=1)
    report.add(field, "no such column", col, f"did you mean {close[0]!r}?" if close else f"columns: {', '.join(names[:20])}")
    return False


def _parquet(src, prefix: str, report: Report) -> DataInfo:
    p = _local(src.path, f"{prefix}.path", "parquet", report)
    if p is None:
        return DataInfo()
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in (".parquet", ".pq"))
            if not files:
                report.add(f"{prefix}.path", "holds no .parquet files", src.path, "point it at Parquet file(s)")
                return DataInfo()
        else:
            files = [str(p)]
        schema = pq.read_schema(files[0])
    except Exception as e:  # noqa: BLE001 - not parquet, damaged footer, ...
        report.add(f"{prefix}.path", f"cannot read a Parquet schema ({first_line(e)})", src.path,
                   "point it at a .parquet file or a directory of them")
        return DataInfo()
    names = list(schema.names)
    info = DataInfo(declared_classes=getattr(src, "num_classes", None))
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    image_col, tensor_col = getattr(src, "image_column", None), getattr(src, "tensor_column", None)
    shape_ok = True
    if image_col:
        if _column(names, image_col, f"{prefix}.image_column", report):
            t = schema.field(image_col).type
            if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)):
                report.add(f"{prefix}.image_column", f"must hold encoded image bytes, {image_col!r} is {t}", image_col,
                           "store PNG/JPEG bytes, or use tensor_column / feature_columns")
                shape_ok = False
            shape = (1 if getattr(src, "grayscale", False) else 3, src.image_size, src.image_size)
        else:
            shape_ok = False
    elif tensor_col:
        shape_ok = _column(names, tensor_col, f"{prefix}.tensor_column", report)
        shape = tuple(src.shape) if src.shape else None
        if shape_ok and shape is None:
            first = next(pq.ParquetFile(files[0]).iter_batches(batch_size=1, columns=[tensor_col]), None)
            shape = (len(first.column(0)[0]),) if first is not None and first.num_rows else None
    else:
        columns = list(src.feature_columns or [])
        for i, col in enumerate(columns):
            if not _column(names, col, f"{prefix}.feature_columns.{i}", report):
                shape_ok = False
            elif not any(f(schema.field(col).type) for f in numeric):
                report.add(f"{prefix}.feature_columns.{i}", f"feature columns must be numeric, {col!r} is "
                           f"{schema.field(col).type}", col, "use numeric columns (one value per row each)")
                shape_ok = False
        shape = tuple(src.shape) if src.shape else (len(columns),)
        if src.shape and math.prod(src.shape) != len(columns):
            report.add(f"{prefix}.shape", f"holds {math.prod(src.shape)} values per row but there are {len(columns)} "
                       "feature columns", src.shape, f"use a shape whose product is {len(columns)}")
            shape_ok = False
    id_col = getattr(src, "id_column", None)
    if id_col:
        _column(names, id_col, f"{prefix}.id_column", report)
    label_ok = _column(names, src.label_column, f"{prefix}.label_column", report)
    if label_ok and not pa.types.is_integer(schema.field(src.label_column).type):
        report.add(f"{prefix}.label_column", f"labels must be integers, {src.label_column!r} is "
                   f"{schema.field(src.label_column).type}", src.label_column, "store integer class indices")
        label_ok = False
    if shape_ok:
        info.shape = shape
    try:
        rows, lo, hi, need_read = 0, None, None, False
        for f in files:
            md = pq.read_metadata(f)
            rows += md.num_rows
            if label_ok and not need_read and md.num_rows:
                got = _label_range(md, src.label_column)
                if got is None:
                    need_read = True  # a row group without statistics: read the label column alone
                else:
                    lo = got[0] if lo is None else min(lo, got[0])
                    hi = got[1] if hi is None else max(hi, got[1])
        info.n_rows = rows
        if label_ok and need_read:
            cols = [pq.read_table(f, columns=[src.label_column]).column(0).to_numpy(zero_copy_only=False)
                    for f in files]
            col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
            lo, hi = (int(col.min()), int(col.max())) if len(col) else (None, None)
        if label_ok:
            info.label_min, info.label_max = lo, hi
    except Exception as e:  # noqa: BLE001
        report.add(f"{prefix}.path", f"cannot read the Parquet metadata ({first_line(e)})", src.path,
                   "rewrite the file with pyarrow")
    return info


def _label_range(md, column: str) -> tuple[int, int] | None:
    """(min, max) of ``column`` from every row group's statistics; None when some group has none."""
    schema = md.schema.to_arrow_schema()
    j = schema.get_field_index(column)
    lo = hi = None
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows == 0:
            continue
        stats = rg.column(j).statistics
        if stats is None or not stats.has_min_max:
            return None
        lo = int(stats.min) if lo is None else min(lo, int(stats.min))
        hi = int(stats.max) if hi is None else max(hi, int(stats.max))
    return (lo, hi) if lo is not None else None


def _image_folder(src, prefix: str, report: Report) -> DataInfo:
    root = _local(src.root, f"{prefix}.root", "image folder", report, want_dir=True)
    if root is None:
        return DataInfo()
    try:
        import PIL  # noqa: F401
    except ImportError:
        report.add(f"{prefix}.kind", "imagefolder data needs Pillow, which is not installed", "imagefolder",
                   "pip install pillow")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        report.add(f"{prefix}.root", "holds no class sub-folders", src.root,
                   "arrange images as ROOT/<class>/<image>.png, one folder per class")
        return DataInfo()
    n = sum(1 for c in classes for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if n == 0:
        report.add(f"{prefix}.root", f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under its class folders",
                   src.root, "put the images in ROOT/<class>/")
        return DataInfo()
    return DataInfo((1 if src.grayscale else 3, src.image_size, src.image_size), n, 0, len(classes) - 1,
                    declared_classes=len(classes))


# ---- what the job asks of the data ----------------------------------------------------------------------------
def check_fit(job: JobSpec, info: DataInfo, report: Report) -> None:
    """Checks that need the data's size: enough rows, labels >= 0, labeled rows and CRD's nce_k in range."""
    if info.label_min is not None and info.label_min < 0:
        report.add("data.source", "labels must be >= 0", info.label_min, "use class indices 0..C-1")
    declared = getattr(job.data.source, "num_classes", None)
    if declared is not None and info.label_max is not None and info.label_max >= declared:
        report.add("data.source.num_classes", f"the labels go up to {info.label_max}", declared,
                   f"set it to at least {info.label_max + 1}, or remove it")
    if info.n_rows is not None and info.n_rows < 2:
        report.add("data.source", f"the dataset has {info.n_rows} rows; training needs at least 2", info.n_rows,
                   "point data.source at the full dataset")
        return
    n_train = info.n_train_rows
    if n_train is None or job.data.source.known_size() is not None:
        return  # unknown, or the schema already checked nce_k and labeled_rows against the known size
    for i, loss in enumerate(job.losses):
        nce_k = getattr(getattr(loss, "params", None), "nce_k", None)
        if nce_k is not None and nce_k >= n_train:
            report.add(f"losses.{i}.params.nce_k", f"must be smaller than the {n_train} training rows", nce_k,
                       f"use at most {n_train - 1}")
    if job.data.labeled_rows is not None:
        bad = [r for r in job.data.labeled_rows if r >= n_train]
        if bad:
            report.add("data.labeled_rows", f"row indices beyond the {n_train} training rows", bad[:5],
                       f"use indices in [0, {n_train})")
