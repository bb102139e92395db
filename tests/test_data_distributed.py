"""Sharding under DDP: 2 real processes (Lightning's `ddp` strategy, gloo on CPU) each see their own part of the
data, together all of it, for a map-style Arrow dataset (Lightning's DistributedSampler) and for a streamed one
(datasets.distributed.split_dataset_by_node)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 64

SCRIPT = '''
import json, sys
import lightning as L
import torch
from lit_score.data import ImageDataModule

data_path, out = sys.argv[1:3]


class Recorder(L.LightningModule):
    """Records which images (identified by their constant grey value) this process trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += (batch[:, 0, 0, 0] * 255).round().long().tolist()
        return self.w * batch.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def record(mode, seen, world):
    with open(f"{out}/{mode}-rank{torch.distributed.get_rank()}.json", "w") as f:
        json.dump({"seen": seen, "world": world}, f)


# Map-style: Lightning injects its DistributedSampler.
model = Recorder()
datamodule = ImageDataModule(path=data_path, batch_size=4, val_size=0, random_flip=False, num_workers=0)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=out)
trainer.fit(model, datamodule)
record("map", model.seen, trainer.world_size)

# Streamed: the DataModule shards by the process group's rank (the same processes, still initialised).
stream = ImageDataModule(path=data_path, batch_size=4, val_size=0, random_flip=False, num_workers=1,
                         streaming=True)
stream.setup("fit")
seen = [round(x[0, 0, 0].item() * 255) for batch in stream.train_dataloader() for x in batch]
record("stream", seen, torch.distributed.get_world_size())
'''


@pytest.fixture(scope="module")
def arrow_dataset(tmp_path_factory) -> Path:
    """64 grey 8x8 images, image i of value 3 * i, saved with save_to_disk."""
    target = tmp_path_factory.mktemp("ddp") / "grey"
    images = [Image.new("L", (8, 8), color=3 * i) for i in range(NUM_IMAGES)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).save_to_disk(str(target))
    return target


@pytest.fixture(scope="module")
def ddp_run(arrow_dataset, tmp_path_factory) -> Path:
    """The script, run once as 2 DDP processes; returns the folder of the ranks' records."""
    out = tmp_path_factory.mktemp("ddp_run")
    (out / "train.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(out / "train.py"), str(arrow_dataset), str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["map", "stream"])
def test_two_ddp_processes_see_disjoint_shards_covering_the_data(mode, ddp_run):
    """Each rank trains on 32 distinct images; the ranks' images are disjoint and together are all 64."""
    tmp_path = ddp_run
    ranks = [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    seen = [r["seen"] for r in ranks]
    assert [len(s) for s in seen] == [NUM_IMAGES // 2] * 2
    assert all(len(set(s)) == len(s) for s in seen)
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {3 * i for i in range(NUM_IMAGES)}
