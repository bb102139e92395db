"""Image preprocessing: crops, resizing, channels, scaling and dequantisation, and each preset's pipeline on
synthetic images of the preset dataset's real size, read through ImageDataModule from a local copy."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_score.data import DATASETS, ImageDataModule
from lit_score.data.transforms import ImageTransform, center_crop, channels_of, resize_short_side, scale, to_channels


def noise_image(width: int, height: int, seed: int = 0, block: int = 1) -> Image.Image:
    """Random RGB pixels, constant over block x block tiles (large images then encode quickly)."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (-(-height // block), -(-width // block), 3), dtype=np.uint8)
    return Image.fromarray(tiles.repeat(block, 0).repeat(block, 1)[:height, :width])


def test_center_crop_takes_the_central_window():
    """A 4x2 crop of a 10x6 image is columns 3..6 and rows 2..3 of the pixel array."""
    image = noise_image(10, 6)
    expected = np.asarray(image)[2:4, 3:7]
    assert np.array_equal(np.asarray(center_crop(image, 4, 2)), expected)
    with pytest.raises(ValueError, match="cannot center-crop 12x12 from a 10x6 image"):
        center_crop(image, 12)


@pytest.mark.parametrize("size, expected", [((178, 218), (64, 78)), ((342, 256), (342, 256)), ((300, 600), (256, 512)),
                                            ((512, 384), (341, 256)), ((32, 32), (32, 32))])
def test_resize_short_side_keeps_the_aspect_ratio(size, expected):
    """The shorter side becomes the target; the longer one scales by the same factor (rounded)."""
    target = min(expected)
    assert resize_short_side(noise_image(*size), target).size == expected


def test_channels_from_modes_and_conversion():
    """Grayscale modes count as 1 channel, colour and palette modes as 3; conversion gives L or RGB."""
    assert [channels_of(m) for m in ("L", "1", "LA", "I;16", "RGB", "RGBA", "P", "CMYK")] == [1, 1, 1, 1, 3, 3, 3, 3]
    rgba = noise_image(5, 5).convert("RGBA")
    assert to_channels(rgba, 3).mode == "RGB" and to_channels(rgba, 1).mode == "L"
    with pytest.raises(ValueError, match="num_channels must be 1 .* or 3"):
        to_channels(rgba, 2)


def test_scaling_ranges_and_uniform_dequantisation():
    """x/255 spans [0, 1], centered spans [-1, 1]; dequantised (x + u)/256 stays inside pixel x's bin."""
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    assert scale(x).min() == 0 and scale(x).max() == 1
    assert scale(x, centered=True).min() == -1 and scale(x, centered=True).max() == 1
    d = scale(x, dequantize=True, generator=torch.Generator().manual_seed(0))
    lower = x.float() / 256
    assert torch.all(d >= lower) and torch.all(d < lower + 1 / 256)
    assert len(torch.unique(d * 256 - x.float())) > 200  # the noise varies per pixel


def test_random_flip_is_a_horizontal_mirror_drawn_from_torch_rng():
    """Each output is the image or its mirror; both occur; the same torch seed repeats the same flips."""
    transform = ImageTransform(image_size=8, num_channels=3, random_flip=True)
    image = noise_image(8, 8)
    plain = scale(transform.pixels(image))
    torch.manual_seed(3)
    outs = [transform(image) for _ in range(32)]
    flipped = [bool(torch.equal(o, plain.flip(-1))) for o in outs]
    assert all(torch.equal(o, plain) or f for o, f in zip(outs, flipped))
    assert 0 < sum(flipped) < 32
    torch.manual_seed(3)
    assert all(torch.equal(o, transform(image)) for o in outs)


def test_transform_rejects_bad_settings():
    """Impossible sizes or channel counts fail at construction, naming the setting."""
    with pytest.raises(ValueError, match="image_size"):
        ImageTransform(image_size=0, num_channels=3)
    with pytest.raises(ValueError, match="num_channels"):
        ImageTransform(image_size=8, num_channels=4)
    with pytest.raises(ValueError, match="center_crop"):
        ImageTransform(image_size=8, num_channels=3, center_crop=-2)


def reference_pixels(image: Image.Image, crop: int | None, size: int) -> np.ndarray:
    """The official pipeline written out: central crop (numpy slicing), shorter side to size, central square."""
    array = np.asarray(image.convert("RGB"))
    if crop:
        h, w = array.shape[:2]
        array = array[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop]
    image = Image.fromarray(array)
    w, h = image.size
    new = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    image = image.resize(new, Image.BILINEAR) if min(w, h) != size else image
    w, h = image.size
    array = np.asarray(image)[(h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]
    return array.transpose(2, 0, 1)


# (preset, its size, real image sizes (width, height) of the dataset, crop)
PRESETS = [
    ("cifar10", 32, [(32, 32)], None),
    ("celeba64", 64, [(178, 218)], 140),
    ("celebahq256", 256, [(256, 256), (1024, 1024)], None),
    ("ffhq256", 256, [(256, 256), (1024, 1024)], None),
    ("lsun_bedroom", 256, [(342, 256), (256, 384)], None),
    ("lsun_church", 256, [(256, 256), (341, 256)], None),
]


@pytest.mark.parametrize("name, size, real_sizes, crop", PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_preprocessing_on_images_of_the_real_size(name, size, real_sizes, crop, tmp_path: Path):
    """A preset pointed at a local folder gives (3, size, size) images in [0, 1] equal to the official
    crop/resize pipeline, flips some of them, and declares its shape before loading anything."""
    originals = [noise_image(w, h, seed=i, block=1 + w // 64) for i, (w, h) in enumerate(real_sizes * 2)]
    for i, image in enumerate(originals):
        image.save(tmp_path / f"{i}.png")
    assert DATASETS[name].random_flip and DATASETS[name].center_crop == crop
    datamodule = ImageDataModule(name, path=str(tmp_path), batch_size=len(originals), val_size=0, num_workers=0)
    assert (datamodule.num_channels, datamodule.image_size) == (3, size)
    full = datamodule.full_dataset()
    expected = [torch.from_numpy(reference_pixels(im, crop, size).copy()).float() / 255 for im in originals]
    assert all(torch.equal(full[i], expected[i]) for i in range(len(originals)))
    datamodule.setup("fit")
    torch.manual_seed(0)
    batches = [next(iter(datamodule.train_dataloader())) for _ in range(4)]
    assert batches[0].shape == (len(originals), 3, size, size) and batches[0].dtype == torch.float32
    flips = [any(torch.equal(x, e.flip(-1)) for e in expected) for b in batches for x in b]
    assert any(flips) and not all(flips)
