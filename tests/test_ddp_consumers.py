"""`lit-score test` bits/dim, the prediction writer and ImageDataModule under real DDP (2 gloo processes) against
one process: bits/dim seeded by image index are the same for any number of processes and batch size, the writer
gathers uint8 images to rank 0 only, and the image folder is read in setup, not at construction."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_score.callbacks.prediction_writer import PredictionWriter
from ddp_consumers import NUM_TEST, VECTORS, Seeds, bits_per_dim, image_model, trainer, vector_data, vector_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """tests/ddp_consumers.py run as 2 DDP processes (one thread each) over a folder of 6 grey 6x6 PNGs."""
    out = tmp_path_factory.mktemp("ddp_consumers")
    folder = out / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("L", (6, 6), color=40 * i).save(folder / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_consumers.py"), str(out), str(folder)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]}


@pytest.mark.slow  # ~20 s: runs with make test-slow (in CI)
def test_bits_per_dim_are_the_same_for_one_and_two_processes_and_any_batch_size(two_processes, one_thread, tmp_path):
    """Property: image i is dequantised and probed with seed i, whatever process and batch it lands in, so the
    per-image values of 1 process with batches of 2 and 3 and of 2 processes with batches of 2 (the last one
    padded by DDP with a repeat, dropped again) all equal those of each image evaluated alone; the logged test/bpd
    is their mean over the 5 images, on every rank."""
    model, x = vector_model(), vector_data()
    alone = [float(model.likelihood.bits_per_dim(model.score_fn, model.sde, x[i:i + 1], [i], VECTORS)[0])
             for i in range(NUM_TEST)]
    runs = {"1 process, batch 2": bits_per_dim(1, 2, str(tmp_path)), "1 process, batch 3": bits_per_dim(1, 3, str(tmp_path))}
    runs |= {f"2 processes, rank {r}": rank["bpd"] for r, rank in enumerate(two_processes["ranks"])}
    for name, run in runs.items():
        assert run["num_images"] == NUM_TEST, name
        # Batch-mates change the last bits of the network's matmuls, and so dopri5's accepted steps: measured up to
        # 5e-4 bits/dim at rtol = atol = 1e-5. Reseeding an image (rank 2^31 + ..., the old rule) moves its
        # bits/dim by 0.15 to 0.7 (the probe and the dequantisation noise): 5e-3 separates the two.
        np.testing.assert_allclose(run["per_image"], alone, rtol=0, atol=5e-3, err_msg=name)
        assert run["logged"] == pytest.approx(float(np.mean(run["per_image"])), abs=1e-6), name
    reference = runs["1 process, batch 2"]["per_image"]
    assert runs["2 processes, rank 0"]["per_image"] == runs["2 processes, rank 1"]["per_image"]
    np.testing.assert_allclose(runs["2 processes, rank 0"]["per_image"], reference, rtol=0, atol=5e-3)


@pytest.mark.slow  # ~25 s with the fixture's 2 processes (make test-slow, in CI)
def test_prediction_writer_gathers_uint8_images_to_rank_zero_only(two_processes, one_thread, tmp_path):
    """Each rank keeps uint8 images (a quarter of float32's bytes); rank 0 receives both ranks' shares, rank 1
    nothing; samples.npz holds every seed once, sorted, with the images of one process, which are those of the
    model's EMA network (a model holding only those weights), not of its trained one."""
    gathers = [rank["gather"] for rank in two_processes["ranks"]]
    assert [len(g) for g in gathers] == [1, 1]
    assert [g[0]["local_dtype"] for g in gathers] == ["torch.uint8"] * 2
    assert [g[0]["received"] for g in gathers] == [2, None]
    assert sorted(set(gathers[0][0]["local_seeds"]) | set(gathers[1][0]["local_seeds"])) == list(range(NUM_TEST))
    only_ema, only_net = image_model(ema=False), image_model(ema=False)
    only_ema.net.load_state_dict(image_model().ema.state_dict())
    for name, model in (("one", image_model()), ("only_ema", only_ema), ("only_net", only_net)):
        one = trainer(1, str(tmp_path))
        one.callbacks.append(PredictionWriter(output_dir=str(tmp_path / name)))
        one.predict(model, Seeds(), return_predictions=False)
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(two_processes["out"] / "two" / "samples.npz") as b:
        assert b["seeds"].tolist() == list(range(NUM_TEST)) and a["seeds"].tolist() == b["seeds"].tolist()
        assert b["samples"].dtype == np.uint8 and b["samples"].shape == (NUM_TEST, 4, 4, 1)
        assert np.array_equal(a["samples"], b["samples"]) and int(a["nfe"]) == int(b["nfe"]) == 3
        with np.load(tmp_path / "only_ema" / "samples.npz") as e, np.load(tmp_path / "only_net" / "samples.npz") as n:
            assert np.array_equal(e["samples"], b["samples"]) and not np.array_equal(n["samples"], b["samples"])


@pytest.mark.slow  # shares the fixture's 2 processes (make test-slow, in CI)
def test_image_folder_is_read_in_setup_not_at_construction(two_processes):
    """Construction (every rank, as the CLI builds the DataModule) streams only the first image for the shape;
    the folder's table is read once per rank in setup, and once more in prepare_data on rank 0 alone."""
    for rank, record in enumerate(two_processes["ranks"]):
        assert record["image_shape"] == [1, 6]
        assert record["loads_at_init"] == [{"caller": "_first_image", "streaming": True}], rank
        full = [load["caller"] for load in record["loads"] if not load["streaming"]]
        assert sorted(full) == (["prepare_data", "setup"] if rank == 0 else ["setup"]), rank
