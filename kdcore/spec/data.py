"""Datasets, splits, augmentation and the labeled subset the student may use."""

from __future__ import annotations

from typing import Annotated, Literal, Union

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
    """Parquet files (one file, a directory of shards, or an s3:// prefix), read lazily by row group.

    The input is one of: an image column (PNG/JPEG bytes, decoded on read), a tensor column (a list of
    numbers per row, reshaped to ``shape``) or numeric feature columns."""

    kind: Literal["parquet"] = Field(description="Dataset kind: Parquet file(s), read row group by row group.")
    path: str = Field(description="A .parquet file, a directory of them (read in name order), or an s3://bucket/prefix.")
    image_column: str | None = Field(default=None, description="Column of encoded image bytes (PNG/JPEG), decoded on read.")
    tensor_column: str | None = Field(default=None, description="Column holding each row's input as a list of numbers.")
    feature_columns: list[str] | None = Field(default=None, description="Numeric columns forming the input vector, in order.")
    label_column: str = Field(description="Integer label column.")
    id_column: str | None = Field(default=None, description="Optional stable integer sample id column (default: row numbers).")
    shape: list[int] | None = Field(default=None, description="Reshape each row's features to this shape, e.g. [1, 8, 8].")
    image_size: int = Field(default=32, gt=0, description="Decoded images are resized to image_size x image_size.")
    grayscale: bool = Field(default=False, description="Decode images to one channel.")
    num_classes: int | None = Field(default=None, gt=1, description="Class count, when the labels may not show every class.")
    s3_endpoint: str | None = Field(default=None, description="S3 endpoint URL for s3:// paths (e.g. MinIO); default AWS.")

    def known_size(self) -> int | None:
        return None

    @model_validator(mode="after")
    def _one_input(self) -> "ParquetData":
        given = [n for n in ("image_column", "tensor_column", "feature_columns") if getattr(self, n)]
        if len(given) != 1:
            raise_problems([Problem("image_column" if not given else given[1],
                                    "name exactly one input: image_column, tensor_column or feature_columns",
                                    given or None, "keep one of them")])
        return self


class ImageFolderData(Spec):
    """A directory tree root/<class>/<image>; only the file list is held, images are decoded on read."""

    kind: Literal["imagefolder"] = Field(description="Dataset kind: one folder per class of image files.")
    root: str = Field(description="Root directory holding one sub-folder per class.")
    image_size: int = Field(default=32, gt=0, description="Images are resized to image_size x image_size.")
    grayscale: bool = Field(default=False, description="Convert images to one channel.")

    def known_size(self) -> int | None:
        return None


class NpyDirData(Spec):
    """A directory of .npy arrays, memory-mapped: inputs (N x ...), labels (N,), optional ids (N,)."""

    kind: Literal["npy_dir"] = Field(description="Dataset kind: a directory of memory-mapped .npy files.")
    path: str = Field(description="Directory holding the arrays.")
    x_file: str = Field(default="x.npy", description="File name of the input array (N x ...), any numeric dtype.")
    y_file: str = Field(default="y.npy", description="File name of the integer label array (N,).")
    ids_file: str | None = Field(default=None, description="File name of an integer sample id array (N,); default row numbers.")
    scale: float = Field(default=1.0, gt=0.0, description="Inputs are multiplied by this on read (e.g. 1/255 for uint8 images).")

    def known_size(self) -> int | None:
        return None


class HFDiskData(Spec):
    """A Hugging Face ``datasets`` directory written by ``save_to_disk`` (Arrow IPC stream shards), read
    memory-mapped with pyarrow alone, record batch by record batch; ``datasets`` need not be installed.

    The input is one of: an image column (HF ``Image``: {bytes, path}, or plain binary), a tensor column (HF
    ``Array2D``/``Array3D`` or nested lists of numbers, optionally reshaped to ``shape``) or numeric feature
    columns. A ``DatasetDict`` directory (``dataset_dict.json``) needs ``split``."""

    kind: Literal["hf_disk"] = Field(description="Dataset kind: a Hugging Face dataset saved with save_to_disk, "
                                     "memory-mapped.")
    path: str = Field(description="Local directory written by Dataset.save_to_disk (state.json, dataset_info.json, "
                      "data-*.arrow) or DatasetDict.save_to_disk (dataset_dict.json, one sub-directory per split).")
    split: str | None = Field(default=None, description="The split to read when path is a DatasetDict, e.g. train "
                              "or test (data.eval may name the test split of the same directory).")
    image_column: str | None = Field(default=None, description="Column of images (HF Image, or encoded PNG/JPEG "
                                     "bytes), decoded on read.")
    tensor_column: str | None = Field(default=None, description="Column holding each row's input as an HF "
                                      "Array2D/Array3D or (nested) lists of numbers; every row the same shape.")
    feature_columns: list[str] | None = Field(default=None, description="Numeric columns forming the input vector, "
                                              "in order.")
    label_column: str = Field(default="label", description="Integer label column (HF ClassLabel or an integer "
                              "Value).")
    id_column: str | None = Field(default=None, description="Optional stable integer sample id column (default: row "
                                  "numbers).")
    shape: list[int] | None = Field(default=None, description="Reshape each row's values to this shape, e.g. [1, 28, "
                                    "28] for a flat list column (default: the column's own nesting).")
    scale: float = Field(default=1.0, gt=0.0, description="Tensor and feature values are multiplied by this on read "
                         "(e.g. 1/255 for uint8 arrays); images are always read in [0, 1].")
    image_size: int = Field(default=32, gt=0, description="Decoded images are resized to image_size x image_size.")
    grayscale: bool = Field(default=False, description="Decode images to one channel.")
    num_classes: int | None = Field(default=None, gt=1, description="Class count (default: the number of names of "
                                    "the label column's ClassLabel in dataset_info.json, else the labels').")

    def known_size(self) -> int | None:
        return None

    @model_validator(mode="after")
    def _one_input(self) -> "HFDiskData":
        problems = []
        given = [n for n in ("image_column", "tensor_column", "feature_columns") if getattr(self, n)]
        if len(given) != 1:
            problems.append(Problem("image_column" if not given else given[1],
                                    "name exactly one input: image_column, tensor_column or feature_columns",
                                    given or None, "keep one of them"))
        if "://" in self.path and not self.path.startswith("file://"):
            problems.append(Problem("path", "must be a local (or mounted) directory", self.path,
                                    "copy the dataset there, or write it as Parquet shards (ds.to_parquet) and use "
                                    "kind: parquet, which reads s3://"))
        raise_problems(problems)
        return self


class FactoryData(FactoryModel):
    """A dataset returned by a Python function: (x, y) arrays, or a map-style dataset read by row ranges.

    A map-style dataset has ``__len__``, ``rows(start, stop) -> (x, y)`` and optionally ``labels()`` (all
    labels, cheap) and ``ids()``; it is read lazily, in contiguous windows."""

    kind: Literal["factory"] = Field(description="Dataset kind: a factory returning (x, y) arrays or a map-style dataset.")  # type: ignore[assignment]

    def known_size(self) -> int | None:
        return None


DataSource = Annotated[
    Union[SklearnDigits, NpzData, ParquetData, ImageFolderData, NpyDirData, HFDiskData, FactoryData],
    Field(discriminator="kind"),
]


class AugmentSpec(Spec):
    """Seeded, replayable augmentation: each (sample, view) gets its own parameters; view 0 is the clean input."""

    kind: Literal["none", "shift_noise", "crop_flip", "random_resized_crop"] = Field(
        default="none",
        description="none; shift_noise: integer shifts + Gaussian noise (small images); crop_flip: padded random "
        "crop + horizontal flip (CIFAR recipe); random_resized_crop: a random area/aspect crop resized to `size`, "
        "+ optional flip (ImageNet recipe).",
    )
    max_shift: int = Field(default=1, ge=0, description="Largest shift / crop offset in pixels (shift_noise, crop_flip).")
    noise_std: float = Field(default=0.0, ge=0.0, description="Std of additive Gaussian noise (shift_noise).")
    flip: bool = Field(default=False, description="Random horizontal flips (crop_flip, random_resized_crop).")
    size: int | None = Field(default=None, gt=0, description="Output side of random_resized_crop (default: the input's); "
                             "view 0 is then a centre crop of this size.")
    scale: tuple[float, float] = Field(default=(0.08, 1.0), description="Range of the crop's area fraction "
                                       "(random_resized_crop), 0 < lo <= hi <= 1.")
    ratio: tuple[float, float] = Field(default=(3 / 4, 4 / 3), description="Range of the crop's aspect ratio w/h "
                                       "(random_resized_crop), 0 < lo <= hi.")
    seed: int = Field(default=0, description="Seed of the augmentation parameters; with the view index it fixes them.")

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentSpec":
        problems = []
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            problems.append(Problem("scale", "needs 0 < lo <= hi <= 1", list(self.scale), "e.g. [0.08, 1.0]"))
        if not (0 < self.ratio[0] <= self.ratio[1]):
            problems.append(Problem("ratio", "needs 0 < lo <= hi", list(self.ratio), "e.g. [0.75, 1.333]"))
        raise_problems(problems)
        return self


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
    eval: DataSource | None = Field(default=None, description="A separate evaluation source (e.g. the dataset's test "
                                    "set); when given, every row of `source` trains and val_fraction is not used.")
    split_block: int | None = Field(default=None, gt=0, description="The validation split takes whole blocks of this "
                                    "many consecutive rows, so reads stay contiguous (default 1 for in-memory "
                                    "sources: digits, npz, factory arrays; else 256, fewer for datasets under "
                                    "16384 rows so that there are at least 64 blocks).")
    read_window: int | None = Field(default=None, gt=0, description="Online and stream modes read training rows in "
                                    "contiguous windows of this many rows, in shuffled window order (default 1 for "
                                    "in-memory sources: a full shuffle; 256 for the others). Cache mode reads cache chunks.")
    mix_windows: int = Field(default=4, gt=0, description="Rows of this many consecutive windows are shuffled among "
                             "themselves.")
    read_buffer_mb: int = Field(default=64, gt=0, description="Online and stream modes decode at most about this many "
                                "MB of inputs at once (whole batches).")
    normalize: bool = Field(default=True, description="Scale inputs to zero mean, unit variance: with `mean`/`std` "
                            "given, per channel; else one mean/std from the training rows (a bounded sample of "
                            "contiguous windows for large sources).")
    mean: list[float] | None = Field(default=None, description="Per-channel means subtracted when normalize is on, e.g. "
                                     "ImageNet's [0.485, 0.456, 0.406] (inputs in [0, 1]).")
    std: list[float] | None = Field(default=None, description="Per-channel stds divided by when normalize is on, e.g. "
                                    "ImageNet's [0.229, 0.224, 0.225].")
    stats_rows: int = Field(default=2048, gt=0, description="At most this many training rows are read to compute "
                            "mean/std when they are not given.")

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        problems = []
        if self.labeled_rows is not None and any(i < 0 for i in self.labeled_rows):
            problems.append(Problem("labeled_rows", "row indices must be >= 0",
                                    [i for i in self.labeled_rows if i < 0][:5], "use training-row indices from 0"))
        if (self.mean is None) != (self.std is None):
            problems.append(Problem("mean" if self.mean is None else "std", "mean and std go together", None,
                                    "give both (one value per channel) or neither"))
        elif self.mean is not None and len(self.mean) != len(self.std or []):
            problems.append(Problem("std", f"has {len(self.std or [])} values but mean has {len(self.mean)}",
                                    self.std, "give one value per channel in both"))
        elif self.std is not None and any(v <= 0 for v in self.std):
            problems.append(Problem("std", "every std must be > 0", self.std, "use positive values"))
        raise_problems(problems)
        return self

    def window(self) -> int:
        """Rows per read window (see ``read_window``)."""
        if self.read_window is not None:
            return self.read_window
        return 1 if self.source.kind in ("sklearn_digits", "npz", "factory") else 256

    def block(self, n_rows: int | None = None) -> int:
        """Rows per split block (see ``split_block``); the default leaves at least 64 blocks of ``n_rows``."""
        if self.split_block is not None:
            return self.split_block
        if self.source.kind in ("sklearn_digits", "npz", "factory"):
            return 1
        return 256 if n_rows is None else max(1, min(256, n_rows // 64))
