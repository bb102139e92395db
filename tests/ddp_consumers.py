"""Shared by tests/test_ddp_consumers.py and the DDP script it launches: a tiny score model on quantised 4-D vectors
(bits/dim), a tiny image model (predict), and their DataModules. Not a test module (no test_ prefix)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_score.data.base import SeedDataset
from lit_score.data_space import DataSpace
from lit_score.diffusion.likelihood import Likelihood
from lit_score.runtime.module import ScoreModel
from lit_score.networks import ScoreMLP
from lit_score.sampling import EDMSampler
from lit_score.diffusion.sdes import VPSDE

NUM_TEST = 5  # odd: DDP pads the last batch of 2 processes with a repeat
VECTORS = DataSpace((4,), centered=False, num_levels=256)
IMAGES = DataSpace((1, 4, 4), centered=True)


def vector_data() -> Tensor:
    """NUM_TEST quantised vectors k / 255 in [0, 1]^4."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(NUM_TEST, 4, generator=g) * 255).round() / 255


class Vectors(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(vector_data()), batch_size=self.batch_size)


def vector_model() -> ScoreModel:
    torch.manual_seed(0)
    return ScoreModel(ScoreMLP(num_channels=4, hidden=16, depth=1), VPSDE(), data_space=VECTORS,
                      likelihood=Likelihood(rtol=1e-5, atol=1e-5, eps=1e-3))


class TinyImageNet(nn.Module):
    """A conv 'score network' on 1x4x4 images in [-1, 1]."""

    data_shape = (1, 4, 4)
    centered = True

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        return self.conv(x)


class Seeds(L.LightningDataModule):
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(SeedDataset(NUM_TEST), batch_size=2)


def image_model(ema: bool = True) -> ScoreModel:
    """The tiny image model; with ``ema``, an EMA network unlike its trained one (the weights to sample with)."""
    torch.manual_seed(0)
    model = ScoreModel(TinyImageNet(), VPSDE(), sampler=EDMSampler(steps=2), data_space=IMAGES)
    if ema:
        with torch.no_grad():
            model.add_ema().conv.weight.mul_(-0.5)
    return model


def trainer(devices: int, root: str, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root, **kwargs)


def bits_per_dim(devices: int, batch_size: int, root: str) -> dict:
    """`lit-score test`'s path: the per-image bits/dim (image order) and the logged test/bpd, on every rank."""
    model = vector_model()
    run = trainer(devices, root)
    run.test(model, Vectors(batch_size), verbose=False)
    return {"per_image": model.test_bpd.tolist(), "logged": float(run.callback_metrics["test/bpd"]),
            "num_images": float(run.callback_metrics["test/num_images"])}


if __name__ == "__main__":  # python ddp_consumers.py OUT IMAGE_FOLDER: 2 gloo processes
    out, folder = Path(sys.argv[1]), sys.argv[2]
    import lit_score.callbacks.prediction_writer as writer_module
    from lit_score.callbacks.prediction_writer import PredictionWriter
    from lit_score.data.image import ImageDataModule

    loads: list[dict] = []
    original_load = ImageDataModule.load_labelled  # what every read of the table goes through (load too)

    def counted_load(self, split=None, streaming=None):
        frame = sys._getframe(1)
        while frame.f_code.co_name == "load":
            frame = frame.f_back
        loads.append({"caller": frame.f_code.co_name, "streaming": self.streaming if streaming is None else streaming})
        return original_load(self, split, streaming)

    ImageDataModule.load_labelled = counted_load
    image_data = ImageDataModule(path=folder, batch_size=2, val_size=0, num_workers=0)  # as the CLI: on every rank
    at_init = list(loads)

    record = {"bpd": bits_per_dim(2, 2, str(out))}
    gathered: list = []
    original_gather = writer_module.gather_to_zero

    def recorded_gather(local):
        result = original_gather(local)
        gathered.append({"local_dtype": str(local[1].dtype), "local_seeds": local[0].tolist(),
                         "received": None if result is None else len(result)})
        return result

    writer_module.gather_to_zero = recorded_gather
    predict = trainer(2, str(out))
    predict.callbacks.append(PredictionWriter(output_dir=str(out / "two")))
    predict.predict(image_model(), Seeds(), return_predictions=False)
    record["gather"] = gathered

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return self.w * batch.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    fit = trainer(2, str(out), max_steps=1)
    fit.fit(Recorder(), image_data)
    record |= {"loads_at_init": at_init, "loads": loads, "image_shape": [image_data.num_channels, image_data.image_size]}
    (out / f"rank{predict.global_rank}.json").write_text(json.dumps(record))
