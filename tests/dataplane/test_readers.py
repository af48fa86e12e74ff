"""Row readers: Parquet image shards, image folders, memory-mapped .npy, map-style factories; splits as indices."""

from __future__ import annotations

import numpy as np
import pytest

from kdcore.data.images import decode_image
from kdcore.data.readers import open_reader
from kdcore.data.splits import make_split
from kdcore.data.synth import encode, synth_images, write_image_folder, write_parquet_images
from kdcore.errors import DataError
from kdcore.spec.data import DataSpec


def _data(source, **kw) -> DataSpec:
    return DataSpec.model_validate({"source": source, **kw})


def test_parquet_images_are_read_by_window_and_raw(tmp_path):
    write_parquet_images(tmp_path / "pq", 700, size=16, shards=3, rows_per_group=64)
    spec = _data({"kind": "parquet", "path": str(tmp_path / "pq"), "image_column": "image", "label_column": "label",
                  "id_column": "id", "image_size": 16}).source
    r = open_reader(spec)
    assert len(r) == 700 and r.sample_shape == (3, 16, 16)
    imgs, labels = synth_images(700, 16)
    assert np.array_equal(r.labels(), labels) and np.array_equal(r.ids(), np.arange(700) * 7 + 3)
    x = r.read(230, 250)  # crosses row groups 3 -> 4 and shard 0 -> 1 (233 rows per shard)
    assert x.shape == (20, 3, 16, 16) and x.dtype == np.float32
    assert np.allclose(x, imgs[230:250].transpose(0, 3, 1, 2) / 255.0)
    rows = np.array([699, 5, 400, 6, 0])
    assert np.array_equal(r.take(rows), r.read(0, 700)[rows])
    # the reader keeps only its metadata and two decoded row groups
    assert len(r._raw) <= 8


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("size", [24, 16])  # as stored, and resized
def test_a_decoded_image_is_its_pixels_written_into_its_slot_and_as_floats_their_float32_division(gray, size):
    import io

    from PIL import Image

    from kdcore.data.images import decode_pixel_batch, decode_pixels, pixels_to_float

    pixels = np.random.default_rng(size).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:  # the reference: PIL's pixels as float32, / 255
        img = img.convert("L" if gray else "RGB")
        img = img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)
        px = np.asarray(img).reshape(size, size, -1)
        ref = np.asarray(img, dtype=np.float32) / 255.0
    ref = ref[None] if gray else ref.transpose(2, 0, 1)
    slot = np.zeros((size, size, 1 if gray else 3), dtype=np.uint8)
    assert decode_pixels(data, size, gray, out=slot) is slot and np.array_equal(slot, px)
    assert np.array_equal(decode_image(data, size, gray), ref)
    assert np.array_equal(pixels_to_float(slot[None])[0], ref)  # pixels -> floats: the same numbers
    batch = pixels_to_float(decode_pixel_batch([data, data], size, gray))
    assert batch.dtype == np.float32 and np.array_equal(batch[0], ref) and np.array_equal(batch[1], ref)


def test_parquet_refuses_missing_columns_and_undecodable_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs, labels = synth_images(4, 8)
    blobs = [encode(im) for im in imgs]
    blobs[2] = b"not an image"
    pq.write_table(pa.table({"image": blobs, "label": labels}), tmp_path / "bad.parquet")
    base = {"kind": "parquet", "path": str(tmp_path / "bad.parquet"), "image_column": "image", "image_size": 8}
    with pytest.raises(DataError, match=r"no column\(s\) \['y'\]"):
        open_reader(_data({**base, "label_column": "y"}).source)
    r = open_reader(_data({**base, "label_column": "label"}).source)
    with pytest.raises(DataError, match="cannot decode the image .*bad.parquet row 2"):
        r.read(0, 4)


def test_non_finite_tensor_rows_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.ones((10, 4), np.float32)
    x[6, 1] = np.inf
    pq.write_table(pa.table({"x": list(x), "label": np.zeros(10, np.int64)}), tmp_path / "t.parquet")
    r = open_reader(_data({"kind": "parquet", "path": str(tmp_path / "t.parquet"), "tensor_column": "x",
                           "label_column": "label", "shape": [1, 2, 2]}).source)
    assert r.read(0, 5).shape == (5, 1, 2, 2)
    with pytest.raises(DataError, match=r"1 row\(s\) hold NaN or Inf values \(rows 6\)"):
        r.read(4, 10)


def test_image_folder_holds_the_file_list_and_mixes_classes(tmp_path):
    write_image_folder(tmp_path / "imgs", 60, size=12, classes=3)
    r = open_reader(_data({"kind": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": 12}).source)
    assert len(r) == 60 and r.num_classes == 3 and r.sample_shape == (3, 12, 12)
    first = r.labels()[:12]
    assert len(set(first.tolist())) > 1  # rows are not sorted by class
    i = 7
    expected = decode_image(str(tmp_path / "imgs" / r.files[i]), 12)
    assert np.array_equal(r.read(i, i + 1)[0], expected)


def test_npy_dir_is_memory_mapped(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(50, 1, 4, 4)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(50) % 5)
    r = open_reader(_data({"kind": "npy_dir", "path": str(tmp_path), "scale": 1 / 255}).source)
    assert isinstance(r.x, np.memmap)
    assert np.allclose(r.read(10, 20), x[10:20] / 255.0)


class Squares:
    """A map-style dataset (what a `kind: factory` target may return)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, []

    def __len__(self) -> int:
        return self.n

    def labels(self):
        return np.arange(self.n) % 3

    def rows(self, start, stop):
        self.calls.append((start, stop))
        x = np.arange(start, stop, dtype=np.float32)[:, None].repeat(4, 1)
        return x, np.arange(start, stop) % 3


def make_squares(n: int = 100) -> Squares:
    return Squares(n)


def test_factory_may_return_a_map_style_dataset():
    r = open_reader(_data({"kind": "factory", "target": "tests.dataplane.test_readers:make_squares",
                           "kwargs": {"n": 100}}).source)
    assert not r.in_memory and len(r) == 100
    assert np.array_equal(r.read(10, 13)[:, 0], [10, 11, 12])
    assert r.ds.calls == [(10, 13)]  # only the window asked for was read


def test_split_blocks_keep_training_rows_in_source_order_and_eval_source_wins(tmp_path):
    write_parquet_images(tmp_path / "train", 1000, size=8, shards=2)
    write_parquet_images(tmp_path / "test", 120, size=8, shards=1, seed=1)
    src = {"kind": "parquet", "path": str(tmp_path / "train"), "image_column": "image", "label_column": "label",
           "image_size": 8}
    split = make_split(_data(src, val_fraction=0.2, split_block=50))
    assert np.all(np.diff(split.train_rows) > 0) and split.n_train + split.n_val == 1000
    assert split.n_val == 200 and set(np.unique(split.val_rows // 50).tolist()).__len__() == 4
    x = split.train_window(100, 140)
    assert x.shape == (40, 3, 8, 8)
    both = make_split(_data(src, eval={**src, "path": str(tmp_path / "test")}))
    assert both.n_train == 1000 and both.n_val == 120
    batches = list(both.val_batches(50))
    assert [len(b[1]) for b in batches] == [50, 50, 20]
    # the statistics came from a bounded sample, not the whole dataset
    assert 0.0 < both.norm.mean[0] < 1.0


def test_builtin_digits_equal_scikit_learns_without_importing_it():
    """The built-in source reads the CSV scikit-learn ships (no sklearn import in every worker): same rows."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from kdcore.data.readers import digits_arrays

    x, y = digits_arrays()
    d = load_digits()
    assert x.shape == (1797, 1, 8, 8) and np.array_equal(x, d.images[:, None] / 16.0)
    assert np.array_equal(y, d.target)
    code = "import sys; from kdcore.data.readers import digits_arrays; digits_arrays(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_private_local_ray_runs_without_the_preemption_watcher(monkeypatch):
    """Nothing drains a private node: kd's local Ray saves Ray Train's watcher actor unless the user asks."""
    from kdcore.spec.job import RaySpec
    from services.raysession import init_kwargs

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    kwargs, _ = init_kwargs(RaySpec())
    assert kwargs["address"] == "local"
    assert kwargs["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert init_kwargs(RaySpec())[0]["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_object_store_size_goes_to_a_private_local_ray_only(monkeypatch):
    import pydantic

    from kdcore.spec.job import RaySpec
    from services.raysession import init_kwargs

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert "object_store_memory" not in init_kwargs(RaySpec())[0]
    assert init_kwargs(RaySpec(object_store_mb=1536))[0]["object_store_memory"] == 1536 * 2**20
    assert "object_store_memory" not in init_kwargs(RaySpec(object_store_mb=1536, address="auto"))[0]
    with pytest.raises(pydantic.ValidationError, match="object_store_mb"):
        RaySpec(object_store_mb=10)
