"""`kind: hf_disk`: Hugging Face `datasets` saved with save_to_disk, read memory-mapped with pyarrow alone.

The datasets here are written by `datasets` itself (Image, ClassLabel, Array3D features, several shards, a
DatasetDict with train/test) and read back through `open_reader`, `kd validate` and `kd train --local`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

datasets = pytest.importorskip("datasets")

from kdcore.data.readers import open_reader  # noqa: E402
from kdcore.errors import DataError  # noqa: E402
from kdcore.spec.data import DataSpec  # noqa: E402

SIZE, N_TRAIN, N_TEST = 16, 96, 40
CLASSES = ["cat", "dog", "eel", "fox", "gnu"]  # five names; the labels below use only the first four


def _source(**kw):
    return DataSpec.model_validate({"source": {"kind": "hf_disk", **kw}}).source


def _quiet():
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def image_dict(tmp_path_factory):
    """A DatasetDict (train 3 shards, test 1) of 16x16 RGB images with ClassLabel labels and integer ids."""
    from datasets import ClassLabel, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    _quiet()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(N_TRAIN + N_TEST, SIZE, SIZE, 3), dtype=np.uint8)
    labels = (np.arange(N_TRAIN + N_TEST) * 7) % 4
    ids = 1000 + 3 * np.arange(N_TRAIN + N_TEST)
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES), "uid": Value("int64")})

    def part(lo, hi):
        return datasets.Dataset.from_dict({"img": [PILImage.fromarray(im) for im in imgs[lo:hi]],
                                           "label": labels[lo:hi].tolist(), "uid": ids[lo:hi].tolist()},
                                          features=features)

    root = tmp_path_factory.mktemp("hf") / "images"
    DatasetDict(train=part(0, N_TRAIN), test=part(N_TRAIN, N_TRAIN + N_TEST)).save_to_disk(
        str(root), num_shards={"train": 3, "test": 1})
    return root, imgs, labels, ids


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    """2500 rows of an Array3D column (and the same values as a flat list), 2 shards of 1000 + 250 row batches."""
    from datasets import Array3D, ClassLabel, Features, Value

    _quiet()
    n = 2500
    arr = np.random.default_rng(1).standard_normal((n, 2, 3, 4)).astype(np.float32)
    features = Features({"arr": Array3D(shape=(2, 3, 4), dtype="float32"), "flat": [Value("float32")],
                         "label": ClassLabel(num_classes=3), "score": Value("float64"), "flag": Value("bool")})
    ds = datasets.Dataset.from_dict({"arr": arr, "flat": arr.reshape(n, -1), "label": (np.arange(n) % 3).tolist(),
                                     "score": np.arange(n, dtype=np.float64) / 2, "flag": (np.arange(n) % 2 == 0)},
                                    features=features)
    root = tmp_path_factory.mktemp("hf") / "tensors"
    ds.save_to_disk(str(root), num_shards=2)
    return root, arr


def test_images_of_a_dataset_dict_split_read_back_pixel_exact_across_shards(image_dict):
    root, imgs, labels, ids = image_dict
    r = open_reader(_source(path=str(root), split="train", image_column="img", id_column="uid", image_size=SIZE))
    assert len(r) == N_TRAIN and r.sample_shape == (3, SIZE, SIZE)
    assert len(r.files) == 3 and len(set(np.diff(r._b_start).tolist())) == 1  # 3 shards of 32 rows
    assert r.num_classes == len(CLASSES)  # from the ClassLabel in dataset_info.json, not the labels seen
    assert np.array_equal(r.labels(), labels[:N_TRAIN]) and np.array_equal(r.ids(), ids[:N_TRAIN])
    expected = imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    x = r.read(20, 70)  # shard 0 -> 1 -> 2
    assert x.shape == (50, 3, SIZE, SIZE) and x.dtype == np.float32
    assert np.array_equal(x, expected[20:70])
    raw = r.fetch(31, 33)  # the stored form: encoded PNG bytes, decoded by decode()
    assert all(isinstance(b, bytes) and b[:4] == b"\x89PNG" for b in raw)
    assert np.array_equal(r.decode(raw, 31), expected[31:33])
    rows = np.array([95, 0, 64, 31, 32])
    assert np.array_equal(r.take(rows), expected[rows])
    test = open_reader(_source(path=str(root), split="test", image_column="img", image_size=SIZE, grayscale=True))
    assert len(test) == N_TEST and test.sample_shape == (1, SIZE, SIZE)
    assert np.array_equal(test.labels(), labels[N_TRAIN:]) and np.array_equal(test.ids(), np.arange(N_TEST))
    # the test split, as its own directory, is a single dataset too
    alone = open_reader(_source(path=str(root / "test"), image_column="img", image_size=SIZE))
    assert np.array_equal(alone.read(0, N_TEST), expected[N_TRAIN:])


def test_array3d_flat_lists_and_feature_columns_across_batches_and_shards(tensors):
    root, arr = tensors
    r = open_reader(_source(path=str(root), tensor_column="arr"))
    assert len(r) == 2500 and r.sample_shape == (2, 3, 4) and r.num_classes == 3
    assert np.diff(r._b_start).tolist() == [1000, 250, 1000, 250]
    assert np.array_equal(r.read(990, 1010), arr[990:1010])  # record batch 0 -> 1
    assert np.array_equal(r.read(1240, 1260), arr[1240:1260])  # shard 0 -> 1
    assert np.array_equal(r.read(0, 2500), arr)
    x = r.read(5, 9)
    x += 1  # decoded rows are the reader's own, writable (normalisation works in place)
    assert np.array_equal(r.read(5, 9), arr[5:9])
    flat = open_reader(_source(path=str(root), tensor_column="flat", shape=[6, 4], scale=0.5))
    assert flat.sample_shape == (6, 4)
    assert np.array_equal(flat.read(1200, 1300), arr[1200:1300].reshape(100, 6, 4) * np.float32(0.5))
    feats = open_reader(_source(path=str(root), feature_columns=["score", "flag"]))
    got = feats.read(998, 1003)
    assert got.shape == (5, 2) and got[:, 0].tolist() == [499.0, 499.5, 500.0, 500.5, 501.0]
    assert got[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert feats.describe()["fingerprint"] == json.loads((root / "state.json").read_text())["_fingerprint"]


def test_read_without_datasets_installed_or_imported(tensors):
    """kdcore never imports `datasets`: in a fresh process the Array3D column is plain nested Arrow lists."""
    import subprocess
    import sys

    root, arr = tensors
    code = ("import sys, numpy as np; from kdcore.data.readers import open_reader; "
            "from kdcore.spec.data import DataSpec; "
            f"src = DataSpec.model_validate({{'source': {{'kind': 'hf_disk', 'path': {str(root)!r}, "
            "'tensor_column': 'arr'}}).source; r = open_reader(src); "
            "np.save(sys.stdout.buffer, r.read(1240, 1260)); assert 'datasets' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    import io

    assert np.array_equal(np.load(io.BytesIO(out.stdout)), arr[1240:1260])


def test_opening_maps_no_payload_and_holds_only_offsets_and_labels(tmp_path):
    import pyarrow as pa
    from datasets import ClassLabel, Features, Value

    _quiet()
    n, row_bytes = 400, 1 << 16  # 25 MB of payload in one shard
    blobs = [os.urandom(row_bytes) for _ in range(n)]
    ds = datasets.Dataset.from_dict({"blob": blobs, "label": [i % 3 for i in range(n)]},
                                    features=Features({"blob": Value("binary"), "label": ClassLabel(num_classes=3)}))
    ds.save_to_disk(str(tmp_path / "blob"))
    del ds
    spec = _source(path=str(tmp_path / "blob"), image_column="blob")

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set
            f.write("5")
        peak_rss = True
    except OSError:
        peak_rss = False
    before, allocated = status("VmRSS"), pa.total_allocated_bytes()
    r = open_reader(spec)
    if peak_rss:  # had the shard been read (or mapped and touched) its 25 MB would have been resident
        assert status("VmHWM") - before < 6, status("VmHWM") - before
    assert pa.total_allocated_bytes() == allocated  # nothing of the file was copied into Arrow memory
    held = {k: type(v).__module__ for k, v in vars(r).items()}
    assert not any(m.startswith("pyarrow") for k, m in held.items() if k != "_schemas"), held
    assert len(r) == n and r._b_offset.tolist()[0] > 0
    assert r.fetch(397, 400) == blobs[397:400]


def test_non_finite_rows_null_and_negative_labels_are_named(tmp_path):
    from datasets import Array2D, Features, Value

    _quiet()
    x = np.ones((10, 2, 2), np.float32)
    x[6, 1, 0] = np.nan
    features = Features({"x": Array2D(shape=(2, 2), dtype="float32"), "label": Value("int64"),
                         "bad": Value("int64"), "name": Value("string"), "rag": [Value("float32")]})
    rag = [[1.0, 2.0]] * 3 + [[1.0, 2.0, 3.0]] + [[1.0, 2.0]] * 6
    datasets.Dataset.from_dict({"x": x, "label": [0] * 10, "bad": [0, 1, -1] + [2] * 7, "name": ["a"] * 10,
                                "rag": rag}, features=features).save_to_disk(str(tmp_path / "d"))
    r = open_reader(_source(path=str(tmp_path / "d"), tensor_column="x"))
    assert r.read(0, 5).shape == (5, 2, 2)
    with pytest.raises(DataError, match=r"1 row\(s\) hold NaN or Inf values \(rows 6\)"):
        r.read(4, 10)
    with pytest.raises(DataError, match=r"label_column 'bad' holds -1 at rows \[2\].*ds.filter"):
        open_reader(_source(path=str(tmp_path / "d"), tensor_column="x", label_column="bad"))
    with pytest.raises(DataError, match=r"label_column 'name' is string; it must hold integers"):
        open_reader(_source(path=str(tmp_path / "d"), tensor_column="x", label_column="name"))
    with pytest.raises(DataError, match=r"image_column 'x' holds .*not images.*use tensor_column"):
        open_reader(_source(path=str(tmp_path / "d"), image_column="x"))
    ragged = open_reader(_source(path=str(tmp_path / "d"), tensor_column="rag"))
    assert ragged.sample_shape == (2,) and ragged.read(0, 3).shape == (3, 2)
    with pytest.raises(DataError, match=r"tensor_column 'rag': row 3 is not shaped like row 0 \(\[2\]\)"):
        ragged.read(1, 6)
    with pytest.raises(DataError, match=r"row 3 is not shaped like row 0"):
        ragged.read(3, 6)  # the odd row first in the window


def test_user_mistakes_name_the_field_and_the_fix(tmp_path, image_dict, tensors):
    root, *_ = image_dict
    img = {"image_column": "img", "image_size": SIZE}
    with pytest.raises(DataError, match="path not found.*save_to_disk"):
        open_reader(_source(path=str(tmp_path / "missing"), **img))
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"not a directory written by save_to_disk.*kind: parquet"):
        open_reader(_source(path=str(tmp_path / "pq"), **img))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train', 'test'\]; set split"):
        open_reader(_source(path=str(root), **img))
    with pytest.raises(DataError, match=r"split 'tset' is not one of its splits.*did you mean 'test'"):
        open_reader(_source(path=str(root), split="tset", **img))
    with pytest.raises(DataError, match=r"not a DatasetDict; remove split"):
        open_reader(_source(path=str(root / "train"), split="train", **img))
    with pytest.raises(DataError, match=r"label_column 'lable' is not a column; did you mean 'label'\?"):
        open_reader(_source(path=str(root), split="train", label_column="lable", **img))
    with pytest.raises(DataError, match=r"image_column 'image' is not a column; did you mean 'img'\?"):
        open_reader(_source(path=str(root), split="train", image_column="image", image_size=SIZE))
    from kdcore.errors import SpecError
    from kdcore.spec import JobSpec

    with pytest.raises(SpecError) as e:  # refused by the schema (kd validate --schema-only says so too)
        JobSpec.from_yaml(_job(tmp_path, "s3://bucket/ds"))
    assert any("data.source.hf_disk.path: must be a local (or mounted) directory" in line
               for line in e.value.lines()), e.value.lines()
    assert len(open_reader(_source(path=f"file://{root}", split="test", **img))) == N_TEST
    with pytest.raises(DataError, match=r"shape \[5, 5\] does not fit rows of 24 values"):
        open_reader(_source(path=str(tensors[0]), tensor_column="arr", shape=[5, 5])).read(0, 2)


def _job(tmp_path, root, **source):
    model = {"kind": "factory", "target": "kdcore.zoo:image_cnn"}
    src = {"kind": "hf_disk", "path": str(root), "image_column": "img", "image_size": SIZE, **source}
    job = {
        "name": "hf",
        "teacher": {"model": {**model, "kwargs": {"width": 4, "stem_stride": 2, "num_classes": 5}}, "taps": ["embed"]},
        "student": {"model": {**model, "kwargs": {"width": 2, "stem_stride": 2, "num_classes": 5}},
                    "pairs": [{"name": "feat", "student": "embed", "teacher": "embed"}]},
        "losses": [{"kind": "ce"}, {"kind": "kd"}, {"kind": "hint", "pair": "feat"}],
        "data": {"source": {**src, "split": "train", "id_column": "uid"}, "eval": {**src, "split": "test"},
                 "batch_size": 32},
        "train": {"epochs": 1, "num_workers": 0, "optimizer": {"kind": "adam", "lr": 0.003}},
    }
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job))
    return f


def test_kd_validate_and_train_local_with_the_test_split_as_eval(tmp_path, image_dict, capsys):
    from kdcore.loop import load_split
    from kdcore.spec import JobSpec
    from services.cli.main import main

    root, *_ = image_dict
    f = _job(tmp_path, root)
    split = load_split(JobSpec.from_dict(yaml.safe_load(f.read_text())))
    assert split.n_train == N_TRAIN and split.n_val == N_TEST  # every train row trains; test evaluates
    assert main(["validate", str(f)]) == 0
    assert main(["train", "--local", "--quiet", str(f), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics[-1]["epoch"] == 1 and "val/acc" in metrics[-1]
    capsys.readouterr()
    bad = _job(tmp_path, root, label_column="lable")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert "data.source" in text and "'lable'" in text and "did you mean 'label'" in text and "Traceback" not in text
    assert main(["train", "--local", "--quiet", str(bad), "--out", str(tmp_path / "run2")]) == 2
    assert "did you mean 'label'" in capsys.readouterr().err
