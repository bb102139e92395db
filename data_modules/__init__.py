"""DataModules serving batches in the model's data space, and the dataset plugins behind them.

- ``ImageDataModule``: any image dataset (presets cifar10, celeba64, celebahq256, ffhq256, lsun_bedroom,
  lsun_church; ``huggingface`` for hub ids, image folders and save_to_disk directories; the embedded ``digits``;
  third-party plugins by entry point or dotted path), batches (B, C, H, W).
- ``CachedImageDataModule``: the same for small datasets, decoded once to a uint8 tensor and augmented on the device.
- ``DigitsDataModule``: the quickstart's embedded digits, upsampled on tensors.
- ``Toy2DDataModule``: the embedded 2-D toy densities (``TOY_DENSITIES``), batches (B, 2).

Labelled data (the digits; an image folder with one subfolder per class; a table's ClassLabel ``label``/``labels``
column or its ``label_column``) declare their classes in ``data_space`` and give batches ``(x, y)``, y the (B,)
int64 class labels; predict's seeds then come as ``(seeds, labels)`` (``class_label``: one class for all).
"""
from lit_score.data import presets
from lit_score.data.base import ScoreDataModule
from lit_score.data.cached import CachedImageDataModule
from lit_score.data.digits import DigitsDataModule
from lit_score.data.image import ImageDataModule
from lit_score.data.plugins import DATASETS, DatasetPlugin, SourceOptions, get_plugin
from lit_score.data.toy2d import Toy2DDataModule
from lit_score.diffusion.densities import TOY_DENSITIES

__all__ = ["CachedImageDataModule", "DATASETS", "TOY_DENSITIES", "DatasetPlugin", "DigitsDataModule", "ImageDataModule", "ScoreDataModule",
           "SourceOptions", "Toy2DDataModule", "get_plugin", "presets"]
