"""What a run shows in TensorBoard and other loggers: the custom-scalars layout and the hyper-parameters read back
with TensorBoard's own event reader, and sample grids in every logger that takes images (and always on disk)."""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as layout_metadata
from tensorboard.plugins.hparams import metadata as hparams_metadata

from lit_score.callbacks import EMA, FID, Dashboard, SampleGrid
from lit_score.data import DigitsDataModule
from lit_score.metrics import RandomConvFeatures
from lit_score.sampling import DPMSolverPP, EDMSampler
from test_progress import tiny_model


class ImageLogger(Logger):
    """A logger with the ``log_image(key, images, step)`` method of Weights & Biases' (no network needed)."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, int, tuple[int, int]]] = []

    name, version = "images", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images += [(key, step, image.size) for image in images]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of a tiny model with a TensorBoard, a CSV and an image-taking logger together."""
    import torch

    tmp = tmp_path_factory.mktemp("dashboard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loggers = [TensorBoardLogger(tmp, name="tb", default_hp_metric=False), CSVLogger(tmp, name="csv"), ImageLogger()]
    callbacks = [EMA(rate=0.99), LearningRateMonitor(logging_interval="step"),
                 SampleGrid(every_n_steps=2, num_samples=4, sampler=EDMSampler(steps=2), batch_size=4),
                 FID(RandomConvFeatures(num_features=4, width=2), num_samples=6, every_n_steps=2, batch_size=3,
                     sampler=DPMSolverPP(steps=3), cache_dir=str(tmp / "cache")), Dashboard()]
    data = DigitsDataModule(image_size=8, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=loggers, callbacks=callbacks, max_steps=2,
                        log_every_n_steps=1, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    try:
        trainer.fit(tiny_model(EDMSampler(steps=4)), data)
    finally:
        torch.set_num_threads(threads)
    events = EventAccumulator(loggers[0].log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {"trainer": trainer, "loggers": loggers, "events": events, "data": data}


def test_custom_scalars_layout_names_fid_n_sampler_and_reference(run):
    """Property: the layout TensorBoard reads holds loss with val loss in one chart, FID@6 against the step with
    n, sampler, NFE and the reference set in its title, and grad norm, EMA decay and learning rate; every tag it
    charts was logged."""
    events = run["events"]
    [config] = events.Tensors(layout_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert [c.title for c in layout.category] == ["1. score model", "2. optimisation"]
    assert charts["loss and val loss"] == ["train/loss", "val/loss"]
    n = len(run["data"].train_dataloader().dataset)
    [fid] = [t for t in charts if t.startswith("val/fid@6")]
    assert fid.startswith("val/fid@6: 6 EMA samples, DPMSolverPP(steps=3") and fid.endswith("(RandomConvFeatures)")
    assert "3 NFE" in fid and f"vs {n} training images" in fid and charts[fid] == ["val/fid@6"]
    assert charts["grad norm"] == ["train/grad_norm"] and charts["EMA decay"] == ["train/ema_decay"]
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/fid@6", "train/grad_norm", "train/ema_decay", "train/lr"} <= scalars
    assert "train/lr" in charts["learning rate"]


def test_hparams_hold_data_batch_devices_ema_sde_sampler_and_fid_metric(run):
    """Property: TensorBoard's HParams tab reads the data set, image size, batch size, devices, EMA rate, SDE,
    sampler and NFE, and the FID tag as metric, whose scalar holds the final FID."""
    events = run["events"]
    content = events.PluginTagToContent("hparams")
    start = hparams_metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    hp = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.hparams.items()}
    assert hp["data/dataset"] == "DigitsDataModule" and hp["data/image_size"] == 8 and hp["data/batch_size"] == 4
    assert hp["data/global_batch_size"] == 4 and hp["trainer/devices"] == 1 and hp["trainer/world_size"] == 1
    assert hp["ema/rate"] == pytest.approx(0.99) and hp["sde"] == "VPSDE" and hp["sde/N"] == 20
    assert hp["sampler"].startswith("EDMSampler(steps=4") and hp["sampler/nfe"] == 7
    assert hp["val/fid@6/sampler"].startswith("DPMSolverPP(steps=3") and hp["val/fid@6/nfe"] == 3
    experiment = hparams_metadata.parse_experiment_plugin_data(content["_hparams_/experiment"])
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics[0] == "val/fid@6" and {"val/loss", "train/loss"} <= set(metrics)
    fid = run["trainer"].callbacks[3]
    assert events.Scalars("val/fid@6")[-1].value == pytest.approx(fid.last_value, rel=1e-6)


def test_sample_grids_reach_every_logger_that_takes_images_and_the_run_directory(run):
    """Property: the grid of step 2 is in TensorBoard and in the image-taking logger, the CSV logger has its
    metrics, and the PNG is in the run directory; all the same size."""
    tb, csv_logger, images = run["loggers"]
    tb_images = run["events"].Images("samples")
    assert [e.step for e in tb_images] == [0, 2]
    assert [(k, s) for k, s, _ in images.images] == [("samples", 0), ("samples", 2)]
    size = (tb_images[-1].width, tb_images[-1].height)
    assert images.images[-1][2] == size
    run_dir = Path(run["trainer"].log_dir)
    from PIL import Image

    assert Image.open(run_dir / "samples" / "step_00000002.png").size == size
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    assert any(r.get("val/fid@6") for r in rows) and any(r.get("train/loss") for r in rows)


def test_toy_score_field_reaches_every_logger_that_takes_images(tmp_path):
    """The toy demo's picture is in TensorBoard as toy2d/score_field, in the image-taking logger, and on disk."""
    from lit_score.data.toy2d import Toy2DDataModule
    from lit_score.runtime.module import ScoreModel
    from lit_score.networks import ScoreMLP
    from lit_score.sampling import PCSampler
    from lit_score.diffusion.sdes import VESDE
    from lit_score.callbacks.toy2d import Toy2DFigure

    tb, images = TensorBoardLogger(tmp_path, name="tb"), ImageLogger()
    model = ScoreModel(ScoreMLP(hidden=8, depth=1), VESDE(sigma_min=0.01, sigma_max=10.0, N=10),
                       sampler=PCSampler("euler_maruyama", "none", steps=5), warmup=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=[tb, images], callbacks=[Toy2DFigure(num_samples=20)],
                        max_steps=1, limit_val_batches=0, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False)
    trainer.fit(model, Toy2DDataModule(num_train=64, num_val=8, batch_size=32))
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    [event] = events.Images("toy2d/score_field")
    [(key, step, size)] = images.images
    assert key == "toy2d/score_field" and step == event.step == 1 and size == (event.width, event.height)
    assert (Path(tb.log_dir) / "toy2d.png").is_file()
