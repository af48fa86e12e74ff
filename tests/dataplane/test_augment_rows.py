"""Replayable augmentation (RandomResizedCrop, flips, per-channel normalisation) and the one row mapper."""

from __future__ import annotations

import numpy as np

from kdcore.data.augment import augment_params
from kdcore.data.rows import RowMapper
from kdcore.data.splits import make_split
from kdcore.data.synth import write_parquet_images
from kdcore.spec.data import AugmentSpec, DataSpec


def _split(tmp_path, **data):
    write_parquet_images(tmp_path / "pq", 300, size=24, shards=2, rows_per_group=50)
    spec = DataSpec.model_validate({"source": {"kind": "parquet", "path": str(tmp_path / "pq"), "image_column": "image",
                                               "label_column": "label", "id_column": "id", "image_size": 24}, **data})
    return spec, make_split(spec)


def test_random_resized_crop_params_are_a_stateless_draw_within_the_image():
    spec = AugmentSpec(kind="random_resized_crop", size=16, flip=True, seed=3)
    ids, views = np.arange(200), np.r_[np.zeros(20, int), np.ones(180, int)]
    p = augment_params(spec, ids, views, (24, 24))
    assert np.array_equal(p, augment_params(spec, ids, views, (24, 24)))  # same (seed, id, view) -> same box
    top, left, h, w, flip = p.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 24).all() and (left + w <= 24).all()
    assert np.array_equal(p[:20], np.tile([4, 4, 16, 16, 0], (20, 1)))  # view 0: the centre crop
    area = h[20:] * w[20:] / 576
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0 and 0.3 < flip[20:].mean() < 0.7
    assert len({tuple(r) for r in p[20:]}) > 150
    other = augment_params(spec.model_copy(update={"seed": 4}), ids, views, (24, 24))
    assert not np.array_equal(p[20:], other[20:])


def test_the_student_replays_the_teachers_view_pixel_for_pixel(tmp_path):
    data, split = _split(tmp_path, views=3, normalize=True, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
                         augment={"kind": "random_resized_crop", "size": 16, "flip": True, "seed": 1})
    mapper = RowMapper(split, data)
    assert mapper.input_shape == (3, 16, 16) and mapper.n_rows == 3 * split.n_train
    teacher = mapper.cache_rows(30, 90)  # what the cache build computes on: 20 samples x 3 views, one read
    assert teacher.x.shape == (60, 3, 16, 16)
    assert np.array_equal(teacher.samples, np.repeat(np.arange(10, 30), 3))
    # the student reads (sample, params) back from the cache, in another order, and replays them
    order = np.random.default_rng(0).permutation(60)
    student = mapper.inputs(teacher.samples[order], params=teacher.params[order])
    assert np.array_equal(student.x, teacher.x[order])
    # view 0 is the normalised centre crop
    raw = split.reader.read(int(split.train_rows[10]), int(split.train_rows[10]) + 1)[0]
    expected = (raw - np.array([0.5, 0.4, 0.3])[:, None, None]) / np.array([0.2, 0.25, 0.3])[:, None, None]
    assert np.allclose(teacher.x[0], expected[:, 4:20, 4:20], atol=1e-6)


def test_views_of_decoded_images_are_made_from_pixels_and_normalised_last(tmp_path):
    import torch
    import torch.nn.functional as F

    data, split = _split(tmp_path, views=3, normalize=True, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
                         augment={"kind": "random_resized_crop", "size": 16, "flip": True, "seed": 1})
    mapper = RowMapper(split, data)
    assert mapper.pixels and mapper.augmentation_record()["replay"] == "uint8 pixels"
    px = mapper.cache_rows(30, 90, pixels=True)
    assert px.x.dtype == np.uint8 and px.x.shape == (60, 16, 16, 3)  # what the pipelines carry: a quarter of float32
    x = mapper.cache_rows(30, 90).x
    assert x.dtype == np.float32 and np.array_equal(mapper.to_model(px.x), x)
    # each view: the crop of the sample's pixels, resized by torch's uint8 antialiased kernel, flipped, normalised
    src = split.reader.read_pixels(int(split.train_rows[10]), int(split.train_rows[30]) + 1)
    src = src[split.train_rows[10:30] - split.train_rows[10]]
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
    resized = 0
    for i in range(60):
        top, left, h, w, flip = px.params[i].astype(int)
        crop = torch.from_numpy(src[i // 3]).permute(2, 0, 1)[None, :, top:top + h, left:left + w]
        if (h, w) != (16, 16):
            crop, resized = F.interpolate(crop, size=(16, 16), mode="bilinear", antialias=True), resized + 1
        want = (crop.flip(-1) if flip else crop)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(px.x[i], want)
        as_float = (want.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean[:, None, None]) / std[:, None, None]
        assert np.allclose(x[i], as_float, atol=1e-5)
    assert resized > 20
    # the float path (resizing normalised floats) differs by the uint8 kernel's fixed-point rounding: a level at most
    floats = RowMapper(split, data)
    floats.pixels = False
    ref = floats.cache_rows(30, 90).x
    assert np.abs((x - ref) * std[:, None, None]).max() <= 1 / 255 + 1e-6
    assert np.array_equal(x[::3], ref[::3])  # view 0, a centre crop without resizing: the same numbers


def test_without_augmentation_pixels_give_the_float_paths_numbers_and_the_cache_record_is_unchanged(tmp_path):
    data, split = _split(tmp_path, views=1, normalize=True, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    mapper = RowMapper(split, data)
    assert mapper.pixels and "replay" not in mapper.augmentation_record()
    x = mapper.cache_rows(0, 50).x
    assert np.array_equal(x, split.train_window(0, 50))  # decode / 255, normalised: bit for bit
    assert np.array_equal(mapper.inputs(np.array([7, 3])).x, x[[7, 3]])
    shifted = RowMapper(split, data.model_copy(update={"augment": AugmentSpec(kind="crop_flip", max_shift=2)}))
    assert not shifted.pixels  # crop_flip fills with 0 after normalisation: made from floats, as before


def test_ids_map_back_to_training_rows(tmp_path):
    data, split = _split(tmp_path)
    mapper = RowMapper(split, data)
    pick = np.array([5, 0, 17])
    assert np.array_equal(mapper.samples_of_ids(split.ids_train[pick]), pick)
    import pytest

    from kdcore.errors import DataError

    with pytest.raises(DataError, match="unknown sample id"):
        mapper.samples_of_ids(np.array([-1]))


def test_views_cut_from_one_decode_by_row_index_equal_views_of_copied_rows():
    from kdcore.data.augment import apply_augment

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 24, 24)).astype(np.float32)
    rows = np.array([0, 0, 3, 1, 3, 3, 4])  # a sample's views point at its one decoded image
    ids = rng.integers(0, 1000, size=len(rows))
    for spec in (AugmentSpec(kind="random_resized_crop", size=16, flip=True, seed=1),
                 AugmentSpec(kind="crop_flip", max_shift=2, flip=True, seed=1),
                 AugmentSpec(kind="shift_noise", max_shift=2, noise_std=0.1, seed=1), AugmentSpec(kind="none")):
        params = augment_params(spec, ids, np.arange(len(rows)) % 2, (24, 24))
        assert np.array_equal(apply_augment(spec, x, params, rows), apply_augment(spec, x[rows], params)), spec.kind
