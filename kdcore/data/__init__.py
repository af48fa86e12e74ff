"""Datasets (built-in digits, npz, parquet, image folders, factories), splits and augmentation."""

from kdcore.data.augment import augment_params, apply_augment, n_params
from kdcore.data.datasets import Arrays, load_arrays
from kdcore.data.splits import DataSplit, make_split

__all__ = ["Arrays", "load_arrays", "DataSplit", "make_split", "augment_params", "apply_augment", "n_params"]
