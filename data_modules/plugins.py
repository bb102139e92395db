"""Dataset plugins: named ways to get a table of images, with the preprocessing they are trained with.

A plugin is a :class:`DatasetPlugin`: a ``load(SourceOptions) -> datasets.Dataset | datasets.IterableDataset``
function plus defaults (location, split, image column, label column, resolution, crop, flip).
``ImageDataModule(dataset=...)`` finds a plugin by name, in this order:

1. the ``DATASETS`` registry (built-in presets, ``huggingface``, ``digits``; ``@DATASETS.register`` adds more);
2. the ``lit_score.datasets`` entry-point group of installed packages, e.g. in a plugin's pyproject.toml::

       [project.entry-points."lit_score.datasets"]
       my_faces = "my_package.data:MY_FACES"      # a DatasetPlugin, or a bare load function

3. a dotted path ``my_package.data.MY_FACES`` to a DatasetPlugin or a load function.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Iterator, Union

import datasets

from lit_score.errors import DataError, MissingDataError
from lit_score.registry import Registry

ENTRY_POINT_GROUP = "lit_score.datasets"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tar")

Images = Union[datasets.Dataset, datasets.IterableDataset]


class DatasetUnavailableError(DataError, RuntimeError):
    """A dataset that cannot be found or reached."""


@dataclass(frozen=True)
class SourceOptions:
    """Where a plugin's images are: a hub id or local directory, the hub config, the split, streaming or not."""

    path: str | None = None
    config_name: str | None = None
    split: str = "train"
    streaming: bool = False


@dataclass(frozen=True)
class DatasetPlugin:
    """``load`` returns the images of ``SourceOptions``; the other fields are defaults a YAML may override.

    ``image_size`` / ``num_channels`` None: read from the first image. ``center_crop``: side of the central
    square cut before resizing. ``random_flip``: the training-time augmentation of the paper's setup.
    ``label_column``: the column of class labels; None: a ``datasets.ClassLabel`` column named ``label`` or
    ``labels`` when the table has one, else unlabelled. ``class_names``: the classes of a hub dataset, known before
    it is downloaded (a model is built before the data are read).
    """

    load: Callable[[SourceOptions], Images]
    path: str | None = None
    config_name: str | None = None
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    class_names: tuple[str, ...] | None = None
    image_size: int | None = None
    num_channels: int | None = None
    center_crop: int | None = None
    random_flip: bool = False
    description: str = ""


DATASETS: Registry[DatasetPlugin] = Registry("dataset")


def _plugin_from(obj: object, origin: str) -> DatasetPlugin:
    if isinstance(obj, DatasetPlugin):
        return obj
    if callable(obj):
        return DatasetPlugin(load=obj, description=origin)
    raise TypeError(f"{origin} is a {type(obj).__name__}, not a DatasetPlugin or a load function")


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_plugin_names() -> list[str]:
    """Registered names and installed entry-point names."""
    return sorted(set(DATASETS.names()) | set(_entry_points()))


def get_plugin(name: str) -> DatasetPlugin:
    """The plugin called ``name``: registered, installed as an entry point, or a dotted import path."""
    if name in DATASETS:
        return DATASETS[name]
    eps = _entry_points()
    if name in eps:
        return _plugin_from(eps[name].load(), f"entry point {name!r} ({eps[name].value})")
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise DataError(f"dataset {name!r}: cannot import module {module_name!r} ({err})") from None
        if not hasattr(module, attr):
            raise DataError(f"dataset {name!r}: module {module_name!r} has no attribute {attr!r}")
        return _plugin_from(getattr(module, attr), f"dataset {name!r}")
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(known_plugin_names())} "
                     f"(or give a dotted path such as my_package.module.MY_PLUGIN)")


def with_overrides(plugin: DatasetPlugin, **overrides: object) -> DatasetPlugin:
    """The plugin with every non-None override applied."""
    return replace(plugin, **{k: v for k, v in overrides.items() if v is not None})


def _looks_local(path: str) -> bool:
    return os.path.exists(path) or path.startswith(("/", ".", "~"))


def _load_saved(path: Path, options: SourceOptions) -> Images:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if options.split not in saved:
            raise DataError(f"{path} has splits {sorted(saved)}, not {options.split!r}; set split")
        saved = saved[options.split]
    return saved.to_iterable_dataset(num_shards=min(len(saved), 64) or 1) if options.streaming else saved


def _load_local(path: Path, options: SourceOptions) -> Images:
    if not path.is_dir():
        raise MissingDataError(f"no such directory: {path} (path must be a folder of images, a directory "
                                f"written by datasets' save_to_disk, or a hub dataset id)")
    if any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        return _load_saved(path, options)
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
    if not has_images and not any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in path.rglob("*")):
        raise MissingDataError(f"folder {path} contains no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    builder = "imagefolder" if has_images else str(path)
    kwargs = {"data_dir": str(path), **_split_files(path, options.split)} if has_images else {}
    with quiet_progress_bars():  # datasets says "Downloading data" while it reads local files
        return datasets.load_dataset(builder, options.config_name, split=options.split, streaming=options.streaming,
                                     **kwargs)


def _split_files(path: Path, split: str) -> dict:
    """``data_files`` of an image folder's ``split`` alone (the patterns ``datasets`` finds for it, e.g. ``train/**``),
    so that its class labels come from that split's files only: one subfolder per class (two or more, every image
    at the same depth) gives a ``label`` ClassLabel of the sorted subfolder names, as torchvision's ``ImageFolder``;
    a flat split has none. (Given the whole folder, ``datasets`` pools the folder names of every split, so that
    flat ``train/`` and ``test/`` folders become the classes 'test' and 'train', set on the test images only.)"""
    from datasets.data_files import get_data_patterns

    try:
        patterns = {str(k): v for k, v in get_data_patterns(str(path)).items()}
    except Exception:  # noqa: BLE001 - datasets then reports the folder as it does without this
        return {}
    return {"data_files": {split: patterns[split]}} if split in patterns else {}


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """datasets' progress bars off inside the block (as they were after)."""
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.logging.enable_progress_bar()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    opened: list[bool] = []

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set: the hub is not asked, the local cache is used."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_huggingface(options: SourceOptions) -> Images:
    """Images from ``datasets``: a local image folder, a ``save_to_disk`` directory, or a hub dataset id."""
    if not options.path:
        raise DataError("dataset 'huggingface' needs a path: a hub dataset id, a folder of images, "
                         "or a directory written by save_to_disk")
    if _looks_local(options.path):
        return _load_local(Path(options.path).expanduser(), options)
    try:
        if not hub_offline() and not hub_reachable():  # else datasets retries for minutes before failing
            from huggingface_hub import constants

            raise ConnectionError(f"the hub ({constants.ENDPOINT}) cannot be reached")
        return datasets.load_dataset(options.path, options.config_name, split=options.split,
                                     streaming=options.streaming)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DatasetUnavailableError(
            f"cannot load hub dataset {options.path!r} (config={options.config_name!r}, split={options.split!r}): "
            f"{err}\nTo use a local copy, set data.init_args.path to a folder of images or to a directory "
            f"written by `datasets.load_dataset({options.path!r}, ...).save_to_disk(DIR)` on a machine that "
            f"can reach the hub (if it is already in the local Hugging Face cache, HF_HUB_OFFLINE=1 uses that).") from err


DATASETS.register("huggingface")(DatasetPlugin(
    load=load_huggingface,
    description="any hub dataset id, local image folder, or save_to_disk directory (set path)"))
