"""``ImageDataModule``: any image dataset a plugin can load, preprocessed as in the paper, batches (B, C, H, W).

YAML::

    data:
      class_path: lit_score.data.ImageDataModule
      init_args:
        dataset: cifar10            # a preset, a plugin name, or a dotted path (default: huggingface)
        path: /data/cifar10_png     # optional for presets: a local copy (image folder or save_to_disk dir)
        batch_size: 128
        centered: false

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
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lit_score.errors import DataError
from lit_score.data.base import ScoreDataModule
from lit_score.data.plugins import DatasetPlugin, Images, SourceOptions, get_plugin, with_overrides
from lit_score.data.transforms import ImageTransform, channels_of
from lit_score.distributed import rank_and_world
from lit_score.callbacks.resume import ResumableDataLoader


class ImageReadError(DataError):
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
    """Rows ``rows`` of an Arrow table's image column, decoded and transformed on access (in the workers)."""

    def __init__(self, table: datasets.Dataset, column: str, rows: np.ndarray, transform: ImageTransform,
                 source: str) -> None:
        self.table, self.column, self.rows = table, column, np.asarray(rows, dtype=np.int64)
        self.transform, self.source = transform, source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        rows = self.rows[indices].tolist()
        cells = self.table[rows][self.column]
        return [read_image(c, f"row {r} of {self.source}", self.transform) for c, r in zip(cells, rows)]

    def __getitem__(self, index: int) -> Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.__getitems__([index])[0]


class StreamingImages(IterableDataset):
    """A streamed table's image column, decoded and transformed; reshuffled (``set_epoch``) on every pass."""

    def __init__(self, stream: datasets.IterableDataset, column: str, transform: ImageTransform, source: str,
                 reshuffle: bool = False) -> None:
        self.stream, self.column, self.transform, self.source = stream, column, transform, source
        self.reshuffle, self.epoch = reshuffle, 0

    def __iter__(self) -> Iterator[Tensor]:
        if self.reshuffle:
            self.stream.set_epoch(self.epoch)
            self.epoch += 1
        info = torch.utils.data.get_worker_info()
        worker = f", worker {info.id}" if info is not None else ""
        for i, example in enumerate(self.stream):
            yield read_image(example[self.column], f"example {i} of {self.source} stream{worker}", self.transform)


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
                 skip_unreadable: bool = False) -> None:
        super().__init__(num_samples, sample_batch_size, first_seed)
        self.save_hyperparameters()
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
            plugin, split=split, image_column=image_column, image_size=image_size, num_channels=num_channels,
            center_crop=center_crop, random_flip=random_flip)
        self.streaming, self.centered, self.dequantize = streaming, centered, dequantize
        self.batch_size, self.val_size, self.seed, self.num_workers = batch_size, val_size, seed, num_workers
        self.pin_memory, self.shuffle_buffer = pin_memory, shuffle_buffer
        self.test_split, self.skip_unreadable = test_split, skip_unreadable
        self._warned_unreadable: set[str] = set()
        self.image_size, self.num_channels = self._data_shape()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

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
        configured mode) with only the image column, left undecoded, and that column's name."""
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
        images = images.select_columns([column])
        if images.features is not None and isinstance(images.features.get(column), datasets.Image):
            images = images.cast_column(column, datasets.Image(decode=False))
        return images, column

    def prepare_data(self) -> None:
        """Build the table (once per node) and check that every image can be read, before the Trainer writes
        anything."""
        if not self.streaming:
            self._readable(*self.load(), self.source_name)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, column = self.load()
        name = self.source_name
        if isinstance(images, datasets.IterableDataset):
            self._setup_stream(images, column, name)
            return
        if len(images) == 0:
            raise DataError(f"{name} has no images")
        images = self._readable(images, column, name)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed)).numpy()
        n_val = _held_out(len(images), self.val_size)
        train_rows, val_rows = np.sort(order[n_val:]), np.sort(order[:n_val])
        if len(train_rows) < self.batch_size:
            raise DataError(f"{name} leaves {len(train_rows)} training images, fewer than batch_size="
                             f"{self.batch_size}")
        self._warn_conversions(images, column)
        self.train_set = ArrowImages(images, column, train_rows, self.transform(augment=True), name)
        self.val_set = ArrowImages(images, column, val_rows, self.transform(augment=False), name) if n_val else None

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

    def _setup_stream(self, stream: datasets.IterableDataset, column: str, name: str) -> None:
        from datasets.distributed import split_dataset_by_node

        rank, world = rank_and_world()
        if world > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        n_val = int(self.val_size)
        train = stream.skip(n_val) if n_val else stream
        train = train.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        self.train_set = StreamingImages(train, column, self.transform(augment=True), name, reshuffle=True)
        self.val_set = StreamingImages(stream.take(n_val), column, self.transform(augment=False), name) \
            if n_val else None

    def full_dataset(self, augment: bool = False, split: str | None = None) -> Dataset:
        """Every image of ``split`` (default: the training split, no held-out part), by default without flips
        or dequantisation noise."""
        images, column = self.load(split)
        transform = self.transform(augment)
        name = self.source_name if split is None else f"{self.source_name} [split {split!r}]"
        if isinstance(images, datasets.IterableDataset):
            return StreamingImages(images, column, transform, name)
        images = self._readable(images, column, name)
        return ArrowImages(images, column, np.arange(len(images)), transform, name)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.num_workers
        common = dict(batch_size=self.batch_size, drop_last=train, num_workers=workers,
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
