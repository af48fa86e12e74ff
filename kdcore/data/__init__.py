"""Datasets as row readers (digits, npz, Parquet shards, image folders, .npy directories, factories), splits
as row indices, seeded replayable augmentation, and the one row mapper of the feature cache."""

from kdcore.data.augment import apply_augment, augment_params, n_params
from kdcore.data.datasets import Arrays, load_arrays
from kdcore.data.readers import RowReader, open_reader
from kdcore.data.splits import DataSplit, Normalizer, make_split

__all__ = ["Arrays", "load_arrays", "RowReader", "open_reader", "DataSplit", "Normalizer", "make_split",
           "augment_params", "apply_augment", "n_params"]
