"""``ImageDataModule``: any image dataset a plugin can load, preprocessed as in the paper, batches (B, C, H, W)
(``(x, y)`` with class labels y for labelled data).

YAML::

    data:
      class_path: lit_score.data.ImageDataModule
      init_args:
        dataset: cifar10            # a preset, a plugin name, or a dotted path (default: huggingface)
        path: /data/cifar10_png     # optional for presets: a local copy (image folder or save_to_disk dir)
        batch_size: 128
        centered: false
        # label_column: fine_label  # class labels from another column; labels: false ignores them

``dataset: huggingface`` with ``path`` reads a hub dataset id (with ``config_name``, ``split``), a local image
folder (PNG, JPEG, ...; subfolders ``train/`` / ``test/`` become splits) or a ``save_to_disk`` directory.
``image_column`` is detected when not given (the one column of image type). ``streaming: true`` iterates the
dataset without materialising it (validation then needs an integer ``val_size``).

Shape: ``image_size`` and ``num_channels`` come from the preset; left unset for other data (None), they are read
from the first image at construction (its shorter side, after ``center_crop``; grayscale modes give 1 channel,
anything else 3), so the network is configured from the data. Set them to resize / convert every image.

Preprocessing overrides: ``center_crop`` (side of the central square cut before resizing; 0 = none),
``random_flip``, ``centered`` ([-1, 1] instead of [0, 1]), ``dequantize`` (uniform dequantisation, for
likelihoods). ``num_workers`` (default: min(4, CPU count)) decode in parallel, persistent across epochs;
``pin_memory`` applies when CUDA is available. ``val_size``: a fraction (float) or a count (int) of the split held out for validation, chosen by
``seed``; 0 disables validation. ``test_split`` (e.g. ``test``): ``lit-score test`` reads that whole split,
un-augmented, instead of the validation images. ``batch_size`` is per process.

Labels: a ``datasets.ClassLabel`` column named ``label`` or ``labels`` is read by itself (an image folder with one
subfolder per class has one: the sorted subfolder names are classes 0 .. K-1, as torchvision's ``ImageFolder``
numbers them; a flat folder has none); ``label_column`` names any other column: a ClassLabel, or integers or strings
whose sorted distinct values in the training split become classes 0 .. K-1, named by their ``str``. ``labels: false``
ignores labels. Labelled data declare their classes in ``data_space`` (names, and training images per class) and
their batches are ``(x, y)``, y the (B,) int64 labels (-1 where a ClassLabel gives none); unlabelled data give x
alone. A streamed dataset reads ClassLabel columns only, and its class counts are unknown (samples then draw classes
uniformly). ``class_label``: the class every predicted sample is drawn for (default: drawn per seed with the
training split's class frequencies).

Unreadable images: ``prepare_data`` (before the Trainer writes anything) and ``setup`` open every image of the
table once (its header and, where the format allows, ``PIL.Image.verify``; no pixels are decoded) and fail naming
the files that cannot be read, or, with ``skip_unreadable: true``, leave them out with one warning. The result is
kept beside the ``datasets`` cache of the folder, so the next run reads no image for it. Streamed datasets are not
checked ahead.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lit_score.errors import DataError, DataReadError
from lit_score.data.base import Classes, ScoreDataModule, collate
from lit_score.data.plugins import DatasetPlugin, Images, SourceOptions, get_plugin, load_huggingface, with_overrides
from lit_score.data.transforms import ImageTransform, channels_of
from lit_score.distributed import rank_and_world
from lit_score.callbacks.resume import ResumableDataLoader


class ImageReadError(DataReadError):
    """An image that cannot be decoded or preprocessed."""


def find_image_column(features: datasets.Features | None, columns: list[str], requested: str | None) -> str:
    """``requested`` if the table has it; else the one column of ``datasets.Image`` type."""
    if requested is not None:
        if requested not in columns:
            raise DataError(f"image column {requested!r} not found; the columns are: {', '.join(columns)}")
        return requested
    typed = [c for c in columns if features is not None and isinstance(features.get(c), datasets.Image)]
    if len(typed) == 1:
        return typed[0]
    if len(typed) > 1:
        raise DataError(f"several image columns ({', '.join(typed)}); set image_column to one of them")
    raise DataError(f"no column of image type; the columns are: {', '.join(columns)}; set image_column")


def find_label_column(features: datasets.Features | None, columns: list[str], requested: str | None) -> str | None:
    """``requested`` if the table has it; else the one ``datasets.ClassLabel`` column of two or more classes named
    ``label`` or ``labels``; None when there is none (unlabelled data)."""
    if requested is not None:
        if requested not in columns:
            raise DataError(f"label column {requested!r} not found; the columns are: {', '.join(columns)} "
                            "(or set labels: false)")
        return requested
    typed = [c for c in ("label", "labels") if c in columns and features is not None
             and isinstance(features.get(c), datasets.ClassLabel) and features[c].num_classes > 1]
    if len(typed) > 1:
        raise DataError("two class-label columns (label, labels); set label_column to one of them")
    return typed[0] if typed else None


LABEL_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "string",
                "large_string")


def _label_values(table: datasets.Dataset, name: str) -> tuple[np.ndarray, int]:
    """The values of column ``name`` in row order (numpy), and how many are missing (null)."""
    column = table.select_columns([name]).with_format("arrow")[:][name]
    return column.to_numpy(), column.null_count


@dataclass(frozen=True)
class ClassColumn:
    """A table's label column and its classes: a ClassLabel's names (its values are the class indices, -1 for an
    image without a label), or (``values`` not None) the sorted distinct values of another column, class k being
    ``values[k]``."""

    name: str
    names: tuple[str, ...]
    values: tuple | None = None

    @classmethod
    def of(cls, table: Images, name: str, where: str) -> "ClassColumn":
        """The classes of column ``name`` of the training table ``table``."""
        feature = table.features.get(name) if table.features is not None else None
        if isinstance(feature, datasets.ClassLabel):
            if not feature.num_classes:
                raise DataError(f"label column {name!r} of {where} is a ClassLabel without classes")
            return cls(name, tuple(str(n) for n in feature.names))
        if isinstance(table, datasets.IterableDataset):
            raise DataError(f"label column {name!r} of {where} is not a datasets.ClassLabel, and its classes "
                            "(its distinct values) need the whole table: set streaming: false to read labels")
        if not (isinstance(feature, datasets.Value) and feature.dtype in LABEL_DTYPES):
            kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
            raise DataError(f"label column {name!r} of {where} holds {kind} values; class labels are integers, "
                            "strings or a datasets.ClassLabel")
        raw, missing = _label_values(table, name)
        if missing:
            raise DataError(f"label column {name!r} of {where} has {missing} of {len(raw)} rows without a value")
        values = tuple(sorted(set(raw.tolist())))
        if not values:
            raise DataError(f"label column {name!r} of {where} has no labels")
        return cls(name, tuple(str(v) for v in values), values)

    def index_map(self, table: Images, where: str) -> np.ndarray | None:
        """For a ClassLabel column: the training class of each of ``table``'s class indices (by name: another
        split may have fewer classes), with -1 last (so that -1, no label, stays -1); None when they are the
        training split's own. -2: a class the training split does not have."""
        feature = table.features.get(self.name) if table.features is not None else None
        if not isinstance(feature, datasets.ClassLabel):
            raise DataError(f"label column {self.name!r} of {where} is not a datasets.ClassLabel, unlike the "
                            "training split's")
        names = tuple(str(n) for n in feature.names)
        if names == self.names:
            return None
        index = {n: k for k, n in enumerate(self.names)}
        return np.array([index.get(n, -2) for n in names] + [-1], dtype=np.int64)

    def _unknown(self, label: Any, where: str) -> DataError:
        return DataError(f"label {label!r} of {where} (column {self.name!r}) is not one of the training split's "
                         f"{len(self.names)} classes")

    def encode(self, table: datasets.Dataset, where: str) -> np.ndarray:
        """(rows,) int64: the class of every row of ``table`` (-1: a ClassLabel's missing label)."""
        if self.values is None:
            remap = self.index_map(table, where)
            column = table.select_columns([self.name]).with_format("arrow")[:][self.name]
            labels = column.fill_null(-1).to_numpy().astype(np.int64)
            if remap is None:
                return labels
            mapped = remap[labels]
            if (mapped == -2).any():
                raise self._unknown(table.features[self.name].names[labels[mapped == -2][0]], where)
            return mapped
        raw, missing = _label_values(table, self.name)
        if missing:
            raise DataError(f"label column {self.name!r} of {where} has {missing} of {len(raw)} rows without a value")
        index = {v: k for k, v in enumerate(self.values)}
        labels = np.fromiter((index.get(v, -2) for v in raw.tolist()), dtype=np.int64, count=len(raw))
        if (labels == -2).any():
            raise self._unknown(raw[labels == -2][0], where)
        return labels


def decode_image(cell: Any) -> Image.Image:
    """A PIL image from a table cell: a PIL image, ``{"bytes", "path"}``, a file path, or encoded bytes."""
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        cell = data if data is not None else path
    if isinstance(cell, (bytes, bytearray)):
        image = Image.open(io.BytesIO(cell))
    elif isinstance(cell, (str, os.PathLike)):
        image = Image.open(cell)
    else:
        raise TypeError(f"expected an image, bytes or a file path, got {type(cell).__name__}")
    image.load()
    return image


def _cell_name(cell: Any) -> str | None:
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
    return os.fspath(path) if path else None


def read_image(cell: Any, where: str, transform: ImageTransform | None = None) -> Any:
    """The decoded (and transformed) image; any failure is an ImageReadError naming ``where`` and the file."""
    try:
        image = decode_image(cell)
        return transform(image) if transform is not None else image
    except Exception as err:
        name = _cell_name(cell)
        place = f"{name!r} ({where})" if name else where
        raise ImageReadError(f"cannot read image {place}: {type(err).__name__}: {err}") from err


def conversion_counts(images: datasets.Dataset, column: str, size: int, channels: int,
                      limit: int = 10_000) -> dict[str, Any]:
    """Of the first ``limit`` images (headers only): how many have a shorter side other than ``size`` (resized),
    and how many have another channel count than ``channels`` (converted), with an example of each."""
    counts: dict[str, Any] = {"checked": 0, "resized": 0, "converted": 0, "example_size": None, "example_mode": None}
    for start in range(0, min(len(images), limit), 1000):
        for cell in images[start:min(start + 1000, len(images), limit)][column]:
            try:
                with _open_lazily(cell) as image:
                    shape, mode = image.size, image.mode
            except Exception:  # noqa: BLE001 - unreadable images are reported by name when they are read
                continue
            counts["checked"] += 1
            if min(shape) != size:
                counts["resized"] += 1
                counts["example_size"] = counts["example_size"] or f"{shape[0]}x{shape[1]}"
            if channels_of(mode) != channels:
                counts["converted"] += 1
                counts["example_mode"] = counts["example_mode"] or mode
    return counts


def _open_lazily(cell: Any) -> Image.Image:
    """The image of a cell, opened without decoding its pixels (size and mode come from the header)."""
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, dict):
        cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
    return Image.open(io.BytesIO(cell) if isinstance(cell, (bytes, bytearray)) else cell)


class ArrowImages(Dataset):
    """Rows ``rows`` of an Arrow table's image column, decoded and transformed on access (in the workers); with
    ``labels`` (one int64 class per row of ``rows``), (image, label) pairs."""

    def __init__(self, table: datasets.Dataset, column: str, rows: np.ndarray, transform: ImageTransform,
                 source: str, labels: np.ndarray | None = None) -> None:
        self.table, self.column, self.rows = table, column, np.asarray(rows, dtype=np.int64)
        self.transform, self.source = transform, source
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != self.rows.shape:
            raise ValueError(f"labels must have one entry per row ({len(self.rows)}), got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        rows = self.rows[indices].tolist()
        cells = self.table[rows][self.column]
        images = [read_image(c, f"row {r} of {self.source}", self.transform) for c, r in zip(cells, rows)]
        if self.labels is None:
            return images
        return list(zip(images, self.labels[indices].tolist()))

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.__getitems__([index])[0]


class StreamingImages(IterableDataset):
    """A streamed table's image column, decoded and transformed; reshuffled (``set_epoch``) on every pass; with
    ``label_column`` (a ClassLabel), (image, label) pairs."""

    def __init__(self, stream: datasets.IterableDataset, column: str, transform: ImageTransform, source: str,
                 reshuffle: bool = False, label_column: str | None = None, remap: np.ndarray | None = None) -> None:
        self.stream, self.column, self.transform, self.source = stream, column, transform, source
        self.reshuffle, self.epoch, self.label_column, self.remap = reshuffle, 0, label_column, remap

    def __iter__(self) -> Iterator[Any]:
        if self.reshuffle:
            self.stream.set_epoch(self.epoch)
            self.epoch += 1
        info = torch.utils.data.get_worker_info()
        worker = f", worker {info.id}" if info is not None else ""
        for i, example in enumerate(self.stream):
            image = read_image(example[self.column], f"example {i} of {self.source} stream{worker}", self.transform)
            if self.label_column is None:
                yield image
            else:
                label = example[self.label_column]
                label = -1 if label is None else int(label)
                if self.remap is not None:
                    if self.remap[label] == -2:
                        raise DataError(f"class {label} of example {i} of {self.source} stream is not one of the "
                                        "training split's classes")
                    label = int(self.remap[label])
                yield image, label


UNREADABLE_CACHE = "lit_score_unreadable.json"
_unreadable_memo: dict[str, list[tuple[int, str, str]]] = {}


def _problem(err: Exception, name: str | None) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    text = str(err).replace(repr(name), "").replace(str(name), "").strip(" :") if name else str(err)
    return (text or type(err).__name__)[:60]


def _check_cell(cell: Any) -> None:
    if isinstance(cell, Image.Image):
        return
    with _open_lazily(cell) as image:
        image.verify()


def _cache_file(images: datasets.Dataset) -> Path | None:
    """The file that keeps the check of ``images``: beside its table in the ``datasets`` cache (whose folder
    changes when a file of the image folder does); None for a table elsewhere (e.g. a save_to_disk directory)."""
    files = [Path(f["filename"]) for f in images.cache_files or []]
    cache = Path(datasets.config.HF_DATASETS_CACHE).expanduser().resolve()
    if not files or not files[0].resolve().is_relative_to(cache):
        return None
    return files[0].parent / UNREADABLE_CACHE


def unreadable_images(images: datasets.Dataset, column: str) -> list[tuple[int, str, str]]:
    """(row, file or row name, problem) of every image of ``images[column]`` that PIL cannot open and verify (a
    non-image, a truncated file, ...), without decoding the pixels. Kept per table, in memory and beside the
    table's ``datasets`` cache."""
    key = f"{images._fingerprint}:{column}"
    if key in _unreadable_memo:
        return _unreadable_memo[key]
    cache = _cache_file(images)
    try:
        found = json.loads(cache.read_text())[key] if cache is not None else None
    except (OSError, ValueError, KeyError):
        found = None
    if found is None:
        found = []
        for start in range(0, len(images), 1000):
            for row, cell in enumerate(images[start:start + 1000][column], start):
                try:
                    _check_cell(cell)
                except Exception as err:  # noqa: BLE001 - whatever PIL raises, the image cannot be read
                    name = _cell_name(cell)
                    found.append((row, name or f"row {row}", _problem(err, name)))
        if cache is not None:
            try:
                tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({key: found}))
                os.replace(tmp, cache)
            except OSError:
                pass
    _unreadable_memo[key] = [tuple(f) for f in found]
    return _unreadable_memo[key]


def _held_out(n: int, val_size: int | float) -> int:
    count = int(round(n * val_size)) if isinstance(val_size, float) else int(val_size)
    if count >= n:
        raise DataError(f"val_size={val_size} holds out {count} of {n} images, leaving none to train on")
    return count


class ImageDataModule(ScoreDataModule):
    """Images of a dataset plugin as (B, C, H, W) floats in [0, 1] (or [-1, 1] when ``centered``).

    See the module docstring for the YAML shape and every argument.
    """

    def __init__(self, dataset: str = "huggingface", path: str | None = None, config_name: str | None = None,
                 split: str | None = None, image_column: str | None = None, streaming: bool = False,
                 image_size: int | None = None, num_channels: int | None = None, center_crop: int | None = None,
                 random_flip: bool | None = None, centered: bool = False, dequantize: bool = False,
                 batch_size: int = 128, val_size: int | float = 0.01, seed: int = 0, num_workers: int | None = None,
                 pin_memory: bool = True, shuffle_buffer: int = 10_000, num_samples: int = 64,
                 sample_batch_size: int = 64, first_seed: int = 0, test_split: str | None = None,
                 skip_unreadable: bool = False, label_column: str | None = None, labels: bool = True,
                 class_label: int | None = None) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed, class_label)
        self.save_hyperparameters()
        if label_column is not None and not labels:
            raise DataError(f"label_column {label_column!r} is set but labels is false; leave one of them out")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if image_size is not None and image_size < 1:
            raise DataError(f"image_size must be positive (or null: from the first image), got {image_size}")
        if num_channels not in (None, 1, 3):
            raise DataError(f"num_channels must be 1 (grayscale), 3 (RGB) or null (from the first image), "
                            f"got {num_channels}")
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
            raise DataError(f"val_size must be in [0, 1) as a fraction (or a count of images), got {val_size}")
        if val_size < 0:
            raise DataError(f"val_size must be >= 0, got {val_size}")
        if streaming and isinstance(val_size, float) and val_size > 0:
            raise DataError(f"a streamed dataset has no known length: give val_size as a number of images "
                             f"(e.g. 500) or 0, not the fraction {val_size}")
        if center_crop is not None and center_crop < 0:
            raise DataError(f"center_crop must be a side length, 0 for none, or null for the preset's; "
                             f"got {center_crop}")
        self.dataset_name = dataset
        plugin = get_plugin(dataset)
        if path is not None or config_name is not None:
            plugin = with_overrides(plugin, path=path, config_name=config_name or "")
        self.plugin: DatasetPlugin = with_overrides(
            plugin, split=split, image_column=image_column, label_column=label_column, image_size=image_size,
            num_channels=num_channels, center_crop=center_crop, random_flip=random_flip)
        if self.plugin.label_column is not None and self.plugin.label_column == self.plugin.image_column:
            raise DataError(f"label_column and image_column are both {self.plugin.label_column!r}")
        self.labels = bool(labels)
        self._classes: tuple[ClassColumn | None, Classes | None] | None = None
        self._data_read = False  # prepare_data or setup ran: the classes may be read from the data
        self.streaming, self.centered, self.dequantize = streaming, centered, dequantize
        self.batch_size, self.val_size, self.seed, self.num_workers = batch_size, val_size, seed, num_workers
        self.pin_memory, self.shuffle_buffer = pin_memory, shuffle_buffer
        self.test_split, self.skip_unreadable = test_split, skip_unreadable
        self._warned_unreadable: set[str] = set()
        self.image_size, self.num_channels = self._data_shape()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        if class_label is not None:  # the classes are read from the data only when asked for
            self.check_class_label()

    @property
    def options(self) -> SourceOptions:
        p = self.plugin
        return SourceOptions(path=p.path, config_name=p.config_name or None, split=p.split, streaming=self.streaming)

    def _split_options(self, split: str | None) -> SourceOptions:
        options = self.options
        return options if split is None else SourceOptions(options.path, options.config_name, split, options.streaming)

    @property
    def crop(self) -> int | None:
        return self.plugin.center_crop or None

    def transform(self, augment: bool = True) -> ImageTransform:
        """The preprocessing; without ``augment``, no random flip and no dequantisation noise."""
        return ImageTransform(self.image_size, self.num_channels, self.crop,
                              random_flip=augment and self.plugin.random_flip, centered=self.centered,
                              dequantize=augment and self.dequantize)

    def _data_shape(self) -> tuple[int, int]:
        size, channels = self.plugin.image_size, self.plugin.num_channels
        if size is None or channels is None:
            first = self._first_image()
            if channels is None:
                channels = channels_of(first.mode)
            if size is None:
                size = self.crop or min(first.size)
        if channels not in (1, 3):
            raise DataError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if size < 1:
            raise DataError(f"image_size must be positive, got {size}")
        return size, channels

    def _first_image(self) -> Image.Image:
        """The first image alone, streamed: construction runs on every process (the CLI reads the data's shape
        before anything else), so it reads no more than that; the tables are read in prepare_data and setup."""
        images, column = self.load(streaming=True)
        examples = iter(images) if isinstance(images, datasets.IterableDataset) else (
            images[i] for i in range(len(images)))
        for example in examples:
            try:
                return read_image(example[column], f"first image of {self.source_name}")
            except ImageReadError:
                if self.skip_unreadable:
                    continue
                if not self.streaming:  # name every unreadable image, not just this one
                    self._readable(*self.load(streaming=False), self.source_name)
                raise
        raise DataError(f"{self.source_name} has no {'readable ' if self.skip_unreadable else ''}images")

    @property
    def source_name(self) -> str:
        p = self.plugin
        where = p.path or self.dataset_name
        return f"{where} (split {p.split!r})" if p.path else f"dataset {where!r} (split {p.split!r})"

    def load(self, split: str | None = None, streaming: bool | None = None) -> tuple[Images, str]:
        """The plugin's table (of ``split``, default the configured one; streamed with ``streaming``, default the
        configured mode) with only the image column, left undecoded, (and the label column, if any), and the image
        column's name."""
        images, column, _ = self.load_labelled(split, streaming)
        return images, column

    def load_labelled(self, split: str | None = None,
                      streaming: bool | None = None) -> tuple[Images, str, str | None]:
        """As ``load``, and the name of the label column (None: unlabelled, or ``labels`` false)."""
        options = self._split_options(split)
        if streaming is not None:
            options = replace(options, streaming=streaming)
        images = self.plugin.load(options)
        if not isinstance(images, (datasets.Dataset, datasets.IterableDataset)):
            raise TypeError(f"dataset plugin {self.dataset_name!r} returned a {type(images).__name__}; it must "
                            f"return a datasets.Dataset or datasets.IterableDataset")
        columns = list(images.column_names or (images.features or {}).keys() or [])
        if not columns and isinstance(images, datasets.IterableDataset):
            columns = list(next(iter(images), {}).keys())
        column = find_image_column(images.features, columns, self.plugin.image_column)
        label = find_label_column(images.features, columns, self.plugin.label_column) if self.labels else None
        if label == column:
            raise DataError(f"label column {label!r} is the image column; set label_column to another")
        images = images.select_columns([column] + ([label] if label is not None else []))
        if images.features is not None and isinstance(images.features.get(column), datasets.Image):
            images = images.cast_column(column, datasets.Image(decode=False))
        return images, column, label

    def _class_column(self) -> ClassColumn | None:
        """The label column of the training split and its classes; None for unlabelled data."""
        return self._read_classes()[0]

    def classes(self) -> Classes | None:
        """The class names and the training images per class (None when streamed), read from the label column;
        None for unlabelled data. Before ``prepare_data`` or ``setup`` only the declared classes
        (``_declared_classes``); the model takes the counts in its own ``setup``."""
        if self._classes is None and not self._data_read:
            return self._declared_classes()
        return self._read_classes()[1]

    def _declared_classes(self) -> Classes | None:
        """The classes known without reading the table (the DataModule is built on every process): the plugin's
        ``class_names``, else a local dataset's ClassLabel names (its features, streamed), counts unknown; a
        named plain label column of a local dataset is read (its values are the classes)."""
        if not self.labels:
            return None
        if self.plugin.class_names is not None:
            return tuple(self.plugin.class_names), None
        if not self._local():
            return None
        images, _, label = self.load_labelled(streaming=True)
        feature = None if label is None else (images.features or {}).get(label)
        if label is None or isinstance(feature, datasets.ClassLabel):
            return None if label is None else (tuple(feature.names), None)
        return self._read_classes()[1]  # a named plain column: its values are the classes

    def _local(self) -> bool:
        """Whether the data can be read without the network: a local path, or a plugin's own loader."""
        path = self.plugin.path
        return self.plugin.load is not load_huggingface or path is not None and Path(path).expanduser().exists()

    def _read_classes(self) -> tuple[ClassColumn | None, Classes | None]:
        if self._classes is None:
            # whether there are labels: from the streamed table's columns (its features), without building the table
            images, column, label = self.load_labelled(streaming=True)
            if label is not None and not self.streaming:
                images, column, label = self.load_labelled()
            if label is None:
                self._classes = None, None
                return self._classes
            classes = ClassColumn.of(images, label, self.source_name)
            if isinstance(images, datasets.IterableDataset):
                self._classes = classes, (classes.names, None)
                return self._classes
            if self.skip_unreadable:  # the training rows are drawn among the readable images
                images = self._readable(images, column, self.source_name)
            if len(images) == 0:
                raise DataError(f"{self.source_name} has no images")
            train_rows, _ = self._split(len(images))
            labels = classes.encode(images, self.source_name)[train_rows]
            counts = np.bincount(labels[labels >= 0], minlength=len(classes.names))
            if not counts.sum():
                raise DataError(f"no training image of {self.source_name} has a label (column {label!r}); "
                                "set labels: false to train without them")
            self._classes = classes, (classes.names, tuple(int(c) for c in counts))
        return self._classes

    def _labels_of(self, images: Images, label: str | None, where: str) -> np.ndarray | None:
        """The classes of every row of ``images`` (None: unlabelled, or not the training split's label column)."""
        classes = self._class_column() if label is not None else None
        if classes is None or classes.name != label:
            return None
        return classes.encode(images, where)

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of ``n`` images, sorted, drawn with ``seed``."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).numpy()
        n_val = _held_out(n, self.val_size)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def prepare_data(self) -> None:
        """Build the table (once per node) and check that every image can be read, before the Trainer writes
        anything."""
        self._data_read = True
        if not self.streaming:
            self._readable(*self.load(), self.source_name)

    def setup(self, stage: str | None = None) -> None:
        self._data_read = True
        if self.train_set is not None:
            return
        images, column, label = self.load_labelled()
        name = self.source_name
        if isinstance(images, datasets.IterableDataset):
            self._setup_stream(images, column, name, label if self._class_column() is not None else None)
            return
        if len(images) == 0:
            raise DataError(f"{name} has no images")
        images = self._readable(images, column, name)
        train_rows, val_rows = self._split(len(images))
        if len(train_rows) < self.batch_size:
            raise DataError(f"{name} leaves {len(train_rows)} training images, fewer than batch_size="
                             f"{self.batch_size}")
        self._warn_conversions(images, column)
        labels = self._labels_of(images, label, name)
        train_labels, val_labels = (None, None) if labels is None else (labels[train_rows], labels[val_rows])
        self.train_set = ArrowImages(images, column, train_rows, self.transform(augment=True), name, train_labels)
        self.val_set = ArrowImages(images, column, val_rows, self.transform(augment=False), name,
                                   val_labels) if len(val_rows) else None

    def _readable(self, images: datasets.Dataset, column: str, name: str) -> datasets.Dataset:
        """``images`` when every one can be read; else an ImageReadError naming the unreadable ones, or, with
        ``skip_unreadable``, ``images`` without them and a warning."""
        bad = unreadable_images(images, column)
        if not bad:
            return images
        root = os.path.abspath(os.path.expanduser(self.plugin.path or "")) + os.sep
        names = [n[len(root):] if n.startswith(root) else n for _, n, _ in bad[:3]]
        listed = ", ".join(f"{n} ({problem})" for n, (_, _, problem) in zip(names, bad)) + \
            (", ..." if len(bad) > 3 else "")
        if not self.skip_unreadable:
            raise ImageReadError(f"{len(bad)} of {len(images)} images of {name} cannot be read: {listed}; repair or "
                                 "delete them, or set data.init_args.skip_unreadable true to leave them out")
        if name not in self._warned_unreadable:
            self._warned_unreadable.add(name)
            rank_zero_warn(f"{name}: leaving out the {len(bad)} of {len(images)} images that cannot be read "
                           f"(skip_unreadable): {listed}", category=UserWarning)
        if len(bad) == len(images):
            raise DataError(f"{name} has no readable images ({listed})")
        unreadable = {row for row, _, _ in bad}
        return images.select([i for i in range(len(images)) if i not in unreadable])

    def _warn_conversions(self, images: datasets.Dataset, column: str) -> None:
        """Once: how many images the shape read from the first image makes the transform resize or convert."""
        check_size, check_channels = self.plugin.image_size is None, self.plugin.num_channels is None
        if not (check_size or check_channels):
            return
        counts = conversion_counts(images, column, self.crop or self.image_size, self.num_channels)
        notes = []
        if check_size and counts["resized"]:
            notes.append(f"{counts['resized']} have a shorter side other than {self.crop or self.image_size} px "
                         f"(e.g. {counts['example_size']}) and are resized")
        if check_channels and counts["converted"]:
            kind = "grayscale" if self.num_channels == 1 else "RGB"
            notes.append(f"{counts['converted']} are not {kind} (e.g. mode {counts['example_mode']}) and are "
                         f"converted to {kind}")
        if notes:
            rank_zero_warn(f"{self.source_name}: of the first {counts['checked']} images, {'; '.join(notes)}: "
                           f"image_size {self.image_size} and num_channels {self.num_channels} come from the first "
                           "image; set data.init_args.image_size / num_channels to choose them", category=UserWarning)

    def _setup_stream(self, stream: datasets.IterableDataset, column: str, name: str, label: str | None) -> None:
        from datasets.distributed import split_dataset_by_node

        rank, world = rank_and_world()
        if world > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        n_val = int(self.val_size)
        train = stream.skip(n_val) if n_val else stream
        train = train.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        self.train_set = StreamingImages(train, column, self.transform(augment=True), name, reshuffle=True,
                                         label_column=label)
        self.val_set = StreamingImages(stream.take(n_val), column, self.transform(augment=False), name,
                                       label_column=label) if n_val else None

    def full_dataset(self, augment: bool = False, split: str | None = None) -> Dataset:
        """Every image of ``split`` (default: the training split, no held-out part), by default without flips
        or dequantisation noise; (image, label) pairs for labelled data (when the split has the label column)."""
        images, column, label = self.load_labelled(split)
        transform = self.transform(augment)
        name = self.source_name if split is None else f"{self.source_name} [split {split!r}]"
        if isinstance(images, datasets.IterableDataset):
            classes = self._class_column() if label is not None else None
            if classes is None or classes.name != label:
                return StreamingImages(images, column, transform, name)
            return StreamingImages(images, column, transform, name, label_column=label,
                                   remap=classes.index_map(images, name))
        images = self._readable(images, column, name)
        return ArrowImages(images, column, np.arange(len(images)), transform, name,
                           self._labels_of(images, label, name))

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.num_workers
        common = dict(batch_size=self.batch_size, drop_last=train, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0, pin_memory=self.pin_memory and torch.cuda.is_available())
        if train and not isinstance(dataset, IterableDataset):  # resumes mid-epoch from a checkpoint
            return ResumableDataLoader(dataset, shuffle=True, seed=self.seed, **common)
        return DataLoader(dataset, **common)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            raise RuntimeError("call setup() before val_dataloader()")
        return self._loader(self.val_set, train=False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader | list:
        """The whole ``test_split`` when one is set (e.g. CIFAR-10's 10k test images), else the validation split."""
        if self.test_split is None:
            return self.val_dataloader()
        return self._loader(self.full_dataset(augment=False, split=self.test_split), train=False)

    def cache_key(self) -> str:
        """Dataset identity and deterministic preprocessing (not flips, scaling or dequantisation), file-name safe."""
        p = self.plugin
        where = p.path or ""
        if where and os.path.exists(os.path.expanduser(where)):
            where = os.path.realpath(os.path.expanduser(where))
        identity = (f"{self.dataset_name}|{where}|{p.config_name or ''}|{p.split}|{p.image_column or ''}|"
                    f"size={self.image_size}|crop={self.crop}|channels={self.num_channels}")
        digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
        label = os.path.basename(where.rstrip("/")) if where else self.dataset_name
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "data"
        colour = "gray" if self.num_channels == 1 else "rgb"
        return f"{label}-{self.image_size}px-{colour}-{digest}"
