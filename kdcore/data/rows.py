"""The one row mapper: feature-cache row -> (training sample, view) -> augmentation -> the input the teacher
saw, and the same input again for the student.

Cache rows follow the training rows' order with each sample's views adjacent: row ``r`` is sample
``r // views``, view ``r % views``. A contiguous range of cache rows is therefore a contiguous range of
training rows, which is a contiguous source range: the cache build, the teacher replicas, the stream, the
training loader and the HTTP ``/v1/features`` endpoint all read inputs through here, in windows.

Decoded images are augmented as uint8 pixels (``RowMapper.pixels``; ``kdcore.data.augment.PIXEL_KINDS``) and
become model inputs in ``to_model`` (``normalise(pixels / 255)``), so a pipeline can carry a view as pixels (a
quarter of float32's bytes) and convert it where the model runs, to the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcore.data.augment import PIXEL_KINDS, apply_augment, apply_augment_pixels, augment_params, n_params, output_shape
from kdcore.data.images import pixels_to_float
from kdcore.data.splits import DataSplit
from kdcore.errors import DataError
from kdcore.spec.data import DataSpec


def rows_to_samples(start: int, stop: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample, view) of cache rows [start, stop)."""
    r = np.arange(start, stop, dtype=np.int64)
    return r // views, r % views


@dataclass
class Inputs:
    """Inputs of some (sample, view) pairs, as the teacher and the student see them."""

    samples: np.ndarray  # (n,) training-row indices
    views: np.ndarray  # (n,) view of each
    x: np.ndarray  # (n, ...) float32, normalised and augmented (uint8 (n, H, W, C) pixels: cache_rows(pixels=True))
    params: np.ndarray  # (n, P) float32 augmentation parameters (P = 0 without augmentation)


class RowMapper:
    """Maps samples/views/cache rows of one split to their inputs."""

    def __init__(self, split: DataSplit, data: DataSpec) -> None:
        self.split, self.data, self.aug = split, data, data.augment
        self.views = data.views
        # views are made from uint8 pixels and normalised last (to_model): decoded images, pixel-wise kinds
        self.pixels = bool(split.reader.decodes_images()) and self.aug.kind in PIXEL_KINDS
        shape = split.sample_shape
        self._hw = tuple(shape[-2:]) if len(shape) >= 3 else None
        if self.aug.kind != "none" and self._hw is None:
            raise DataError(f"data.augment.kind {self.aug.kind!r} needs image inputs (C, H, W); the inputs are "
                            f"shaped {tuple(shape)}: set data.augment.kind: none or reshape the data (data.source.shape)")

    @property
    def n_rows(self) -> int:
        """Cache rows: training samples x views."""
        return self.split.n_train * self.views

    @property
    def n_params(self) -> int:
        return n_params(self.aug)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-row shape of what the models see (after augmentation)."""
        return output_shape(self.aug, tuple(self.split.sample_shape))

    def augmentation_record(self) -> dict:
        """What the cache's manifest records of how views are made: the augmentation spec, and for resized crops
        of pixels the rounding to uint8 (a cache whose views were made in float32 does not serve this job)."""
        rec = self.aug.model_dump(mode="json")
        if self.pixels and self.aug.kind == "random_resized_crop":
            rec["replay"] = "uint8 pixels"
        return rec

    def params(self, samples: np.ndarray, views: np.ndarray | int) -> np.ndarray:
        """Augmentation parameters of each (sample, view), from the seeded stateless draw."""
        return augment_params(self.aug, self.split.ids_train[samples], views, self._hw)

    def replay(self, x: np.ndarray, params: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Apply stored parameters to normalised inputs ``x``: exactly the view the parameters describe. With
        ``rows``, output row ``i`` is the view ``params[i]`` of ``x[rows[i]]`` (a sample's views from one decode)."""
        if self.aug.kind == "none" or params.shape[1] == 0:
            return x if rows is None else x[rows]
        return apply_augment(self.aug, x, params, rows)

    def replay_pixels(self, px: np.ndarray, params: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``replay`` on uint8 pixels (B, H, W, C) (``self.pixels``): the views as uint8 pixels; ``to_model``
        turns them into the inputs the models see."""
        return apply_augment_pixels(self.aug, px, params, rows)

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """Model inputs: uint8 pixels (N, H, W, C) -> normalised float32 (N, C, H, W); float inputs pass as
        they are."""
        x = np.asarray(x)
        return self.split.norm(pixels_to_float(x), inplace=True) if x.dtype == np.uint8 else x

    def stored_views(self, stored, start: int, params: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """The views ``params`` of stored rows ``stored`` (as the reader's ``fetch`` returns them, the first being
        source row ``start``; output row ``i`` from ``stored[rows[i]]``): uint8 pixels where ``self.pixels``
        (``to_model`` converts), else normalised float32. What a Ray Data task computes of a block."""
        reader = self.split.reader
        if self.pixels:
            return self.replay_pixels(reader.decode_pixels(stored, start), params, rows)
        x = reader.finish(reader.decode(stored, start))
        x = self.split.norm(x, inplace=x.flags.owndata)  # a fresh decode is ours to overwrite, a view is not
        return self.replay(x, params, rows)

    def inputs(self, samples: np.ndarray, views: np.ndarray | int = 0, params: np.ndarray | None = None) -> Inputs:
        """Inputs of training samples ``samples`` (any order) under ``views`` (or the given ``params``)."""
        samples = np.asarray(samples, dtype=np.int64)
        views = np.broadcast_to(np.asarray(views, dtype=np.int64), samples.shape).copy()
        params = self.params(samples, views) if params is None else np.asarray(params, dtype=np.float32)
        if self.pixels:
            return Inputs(samples, views, self.to_model(self.replay_pixels(self.split.train_pixels(samples), params)),
                          params)
        x = self.replay(self.split.train_inputs(samples), params)
        return Inputs(samples, views, x, params)

    def cache_rows(self, start: int, stop: int, pixels: bool = False) -> Inputs:
        """Inputs of cache rows [start, stop): one contiguous read of their training rows. ``pixels``: where the
        views are made from pixels (``self.pixels``), ``x`` holds their uint8 pixels (``to_model`` converts)."""
        samples, views = rows_to_samples(start, stop, self.views)
        if not len(samples):
            return self.inputs(samples, views)
        s0, s1 = int(samples[0]), int(samples[-1]) + 1
        params = self.params(samples, views)
        if self.pixels:
            x = self.replay_pixels(self.split.train_pixels_window(s0, s1), params, samples - s0)
            x = x if pixels else self.to_model(x)
        else:
            x = self.replay(self.split.train_window(s0, s1), params, samples - s0)
        return Inputs(samples, views, x, params)

    def samples_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Training-row index of each sample id; a clear error names ids that are not training rows."""
        ids = np.asarray(ids, dtype=np.int64)
        known = self.split.ids_train
        order = np.argsort(known, kind="stable")
        pos = np.searchsorted(known, ids, sorter=order)
        pos = np.minimum(pos, len(known) - 1)
        found = order[pos]
        bad = known[found] != ids
        if bad.any():
            raise DataError(f"unknown sample id(s) {ids[bad][:10].tolist()}: not training rows of this dataset")
        return found
