"""Synthetic checkerboards (24x24 RGB, square size 1 to 12 pixels) as a lit-score dataset plugin."""
from __future__ import annotations

import datasets
import numpy as np
from PIL import Image

from lit_score.data.plugins import DatasetPlugin, SourceOptions

NUM_IMAGES = 48


def checkerboard(index: int, size: int = 24) -> Image.Image:
    """Image ``index``: squares of side 1 + index % 12, colour from the index."""
    side = 1 + index % 12
    ys, xs = np.mgrid[:size, :size]
    mask = ((ys // side + xs // side) % 2).astype(np.uint8)[..., None]
    colour = np.array([(37 * index) % 256, (91 * index) % 256, 255], dtype=np.uint8)
    return Image.fromarray(mask * colour)


def load(options: SourceOptions) -> datasets.Dataset:
    """All NUM_IMAGES checkerboards; ``split`` must be 'train'."""
    if options.split != "train":
        raise ValueError(f"checkerboards has only the split 'train', not {options.split!r}")
    images = [checkerboard(i) for i in range(NUM_IMAGES)]
    return datasets.Dataset.from_dict({"pattern": images, "index": list(range(NUM_IMAGES))},
                                      features=datasets.Features({"pattern": datasets.Image(),
                                                                  "index": datasets.Value("int64")}))


CHECKERBOARDS = DatasetPlugin(load=load, image_size=24, num_channels=3, random_flip=True,
                              description="synthetic checkerboards")
