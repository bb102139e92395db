"""CachedImageDataModule: the training split decoded once to uint8, served by index, augmented on the device.

The reference is ImageDataModule's own un-augmented pipeline (PIL decode, resize, x / 255) on the same images.
"""
import math

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_score.data import ImageDataModule
from lit_score.data.cached import CachedImageDataModule


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_SCORE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i:02d}.png")
    return tmp_path / "images"


def _modules(folder, **kw):
    opts = dict(path=str(folder), image_size=8, batch_size=6, val_size=4, num_workers=0, centered=True, **kw)
    cached = CachedImageDataModule(**opts)
    cached.setup("fit")
    plain = ImageDataModule(**opts)
    plain.setup("fit")
    return cached, plain


def test_cached_pixels_are_the_decoded_training_split(folder):
    cached, plain = _modules(folder, random_flip=False)
    assert cached.pixels.dtype == torch.uint8 and cached.pixels.shape == (20, 3, 8, 8)
    served = cached.serve(torch.arange(20))
    want = torch.stack([plain.train_set[i] for i in range(20)])
    assert torch.equal(served, want)


def test_flips_depend_on_index_and_epoch_only(folder):
    cached, plain = _modules(folder, random_flip=True)
    plain_ref = ImageDataModule(path=str(folder), image_size=8, batch_size=6, val_size=4, num_workers=0,
                                centered=True, random_flip=False)
    plain_ref.setup("fit")
    ref = torch.stack([plain_ref.train_set[i] for i in range(20)])
    flips = []
    for epoch in range(10):
        full = cached.serve(torch.arange(20), epoch)
        for i in range(20):
            same, flipped = torch.equal(full[i], ref[i]), torch.equal(full[i], ref[i].flip(-1))
            assert same or flipped, (epoch, i)
            flips.append(flipped and not same)
        part = cached.serve(torch.tensor([7, 3]), epoch)
        assert torch.equal(part, full[[7, 3]])  # whatever the batch
    p = sum(flips) / len(flips)
    assert abs(p - 0.5) < 5 * math.sqrt(0.25 / len(flips))


def test_dequantisation_noise_is_uniform_per_pixel(folder):
    cached, _ = _modules(folder, random_flip=False, dequantize=True)
    x = cached.serve(torch.arange(20), epoch=3)
    u = (x + 1) / 2 * 256 - cached.pixels.double()
    assert float(u.min()) >= 0 and float(u.max()) < 1
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert not torch.equal(x, cached.serve(torch.arange(20), epoch=4))


def test_cache_file_is_reused(folder, monkeypatch):
    cached, _ = _modules(folder, random_flip=False)
    files = list((folder.parent / "cache" / "images").glob("*.pt"))
    assert len(files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr("lit_score.data.cached.ArrowImages", no_decoding)
    again = CachedImageDataModule(path=str(folder), image_size=8, batch_size=6, val_size=4, num_workers=0,
                                  centered=True, random_flip=False)
    again.setup("fit")
    assert torch.equal(again.pixels, cached.pixels)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch.detach().clone())
        return (self.w - batch.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainer_gets_augmented_float_batches(folder):
    cached, _ = _modules(folder, random_flip=False)
    model = _Recorder()
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=cached)
    assert len(model.batches) == 3
    allowed = {tuple(r.flatten().tolist()) for r in cached.serve(torch.arange(20))}
    for b in model.batches:
        assert b.dtype == torch.float32 and b.shape == (6, 3, 8, 8)
        assert all(tuple(img.flatten().tolist()) in allowed for img in b)


def test_bad_inputs_are_named(folder):
    with pytest.raises(ValueError, match="streaming"):
        CachedImageDataModule(path=str(folder), streaming=True, val_size=0, num_workers=0)
    too_big = CachedImageDataModule(path=str(folder), image_size=8, batch_size=6, val_size=4, num_workers=0,
                                    max_cache_gb=1e-9)
    with pytest.raises(ValueError, match="max_cache_gb"):
        too_big.setup("fit")
