"""Datasets, splits, augmentation and the labeled subset the student may use."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from kdcore.errors import Problem
from kdcore.spec.base import Spec, raise_problems
from kdcore.spec.models import FactoryModel


class SklearnDigits(Spec):
    """scikit-learn's 8x8 handwritten digits (1797 rows, 10 classes); ships with the package."""

    kind: Literal["sklearn_digits"] = Field(description="Dataset kind: scikit-learn's digits, built in.")

    def known_size(self) -> int | None:
        return 1797


class NpzData(Spec):
    """Arrays in a NumPy .npz file."""

    kind: Literal["npz"] = Field(description="Dataset kind: a NumPy .npz file.")
    path: str = Field(description="Path of the .npz file.")
    x_key: str = Field(default="x", description="Name of the input array (N x ...).")
    y_key: str = Field(default="y", description="Name of the integer label array (N,).")

    def known_size(self) -> int | None:
        return None


class ParquetData(Spec):
    """A Parquet table read with pyarrow: feature columns and a label column."""

    kind: Literal["parquet"] = Field(description="Dataset kind: a Parquet file or directory.")
    path: str = Field(description="Path of the Parquet file or dataset directory.")
    feature_columns: list[str] = Field(min_length=1, description="Numeric columns forming the input vector, in order.")
    label_column: str = Field(description="Integer label column.")
    shape: list[int] | None = Field(default=None, description="Reshape each row's features to this shape, e.g. [1, 8, 8].")

    def known_size(self) -> int | None:
        return None


class ImageFolderData(Spec):
    """A directory tree root/<class>/<image>; images are resized to image_size."""

    kind: Literal["imagefolder"] = Field(description="Dataset kind: one folder per class of image files.")
    root: str = Field(description="Root directory holding one sub-folder per class.")
    image_size: int = Field(default=32, gt=0, description="Images are resized to image_size x image_size.")
    grayscale: bool = Field(default=False, description="Convert images to one channel.")

    def known_size(self) -> int | None:
        return None


class FactoryData(FactoryModel):
    """A dataset returned by a Python function as (x, y) arrays."""

    kind: Literal["factory"] = Field(description="Dataset kind: a factory returning (x, y) NumPy arrays.")  # type: ignore[assignment]

    def known_size(self) -> int | None:
        return None


DataSource = Annotated[
    Union[SklearnDigits, NpzData, ParquetData, ImageFolderData, FactoryData], Field(discriminator="kind")
]


class AugmentSpec(Spec):
    """Seeded, replayable augmentation: each (sample, view) gets its own parameters."""

    kind: Literal["none", "shift_noise", "crop_flip"] = Field(
        default="none",
        description="none; shift_noise: integer shifts + Gaussian noise (small images); crop_flip: padded random "
        "crop + horizontal flip (CIFAR-style).",
    )
    max_shift: int = Field(default=1, ge=0, description="Largest shift / crop offset in pixels.")
    noise_std: float = Field(default=0.0, ge=0.0, description="Std of additive Gaussian noise (shift_noise).")
    flip: bool = Field(default=False, description="Random horizontal flips (crop_flip).")
    seed: int = Field(default=0, description="Seed of the augmentation parameters; with the view index it fixes them.")


class DataSpec(Spec):
    """Where the rows come from and how they are split, augmented, batched and labeled."""

    source: DataSource = Field(description="The dataset.")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Held-out fraction for evaluation, in (0, 1).")
    split_seed: int = Field(default=0, description="Seed of the train/validation split.")
    batch_size: int = Field(default=64, gt=0, description="Rows per training batch (per worker).")
    eval_batch_size: int = Field(default=256, gt=0, description="Rows per evaluation batch.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="Training-time augmentation.")
    views: int = Field(default=1, ge=1, description="Augmented views cached per sample (1 = the plain input).")
    labeled_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Fraction of training rows whose labels the student may use (transfer set); all rows get the "
        "teacher's signal.",
    )
    labeled_rows: list[int] | None = Field(
        default=None, description="Explicit training-row indices whose labels the student may use (overrides labeled_fraction)."
    )
    labeled_seed: int = Field(default=0, description="Seed choosing the labeled rows when labeled_fraction < 1.")
    normalize: bool = Field(default=True, description="Scale inputs to zero mean, unit variance (stats from train rows).")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra options passed to factory datasets.")

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        if self.labeled_rows is not None and any(i < 0 for i in self.labeled_rows):
            raise_problems([Problem("labeled_rows", "row indices must be >= 0",
                                    [i for i in self.labeled_rows if i < 0][:5], "use training-row indices from 0")])
        return self
