"""Progress of long computations: every sampler's planned NFE is the NFE it runs, the bar counts images and
evaluations with an ETA, and predict, the sample-grid and FID callbacks, reference statistics, bits/dim and
lit-score-eval all draw one."""
from __future__ import annotations

import io
import re

import pytest
import torch
from conftest import ScoreDenoiser

from lit_score.diffusion.denoiser import Counted
from lit_score.progress import Progress, planned_nfe
from lit_score.sampling import (IPNDM, ConsistencySampler, DPMSolverPP, DPMSolverPP3M, DPMSolverPPSDE, EDMSampler,
                                EulerSampler, ODESampler, PCSampler, UniPC)
from lit_score.diffusion.sdes import VESDE, VPSDE

FIXED = {
    "pc_rd_langevin_2": PCSampler("reverse_diffusion", "langevin", n_steps_each=2, steps=7),
    "pc_em_only": PCSampler("euler_maruyama", "none", steps=9),
    "pc_ald_only": PCSampler("none", "ald", n_steps_each=3, steps=4),
    "pc_ancestral_langevin": PCSampler("ancestral_sampling", "langevin", steps=5),
    "edm_heun": EDMSampler(steps=5),
    "edm_churn": EDMSampler(steps=4, S_churn=10),
    "dpm_2m": DPMSolverPP(steps=6),
    "dpm_3m": DPMSolverPP3M(steps=6),
    "dpm_sde": DPMSolverPPSDE(steps=6, order=3),
    "unipc": UniPC(steps=6),
    "ipndm": IPNDM(steps=6),
    "consistency": ConsistencySampler(steps=3),
    "euler": EulerSampler(steps=6),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_planned_nfe_is_the_number_of_score_calls(name):
    """Property: the NFE a sampler announces before sampling (the bar's ETA rests on it) equals the calls of the
    model (its denoiser or its score) counted from outside, and the NFE the sampler reports."""
    sampler = FIXED[name]
    sde = VESDE(N=20) if name.startswith("pc") else VPSDE(N=20)
    D = Counted(ScoreDenoiser(lambda x, t: -x, sde))
    result = sampler.sample(D, sde, (2,), [0, 1])
    assert planned_nfe(sampler, sde) == D.nfe == result.nfe


def test_adaptive_samplers_announce_no_nfe():
    assert planned_nfe(ODESampler(), VPSDE()) is None


def _final_line(text: str, start: str = "") -> str:
    """The last state of the bar whose line starts with ``start``."""
    return [line for line in re.split(r"[\r\n]+", text) if line and line.startswith(start)][-1]


def test_bar_counts_images_and_evaluations_with_an_eta():
    """Property: per evaluation the bar moves by batch / NFE images, the batch completes in batch_done, and the
    last line states images done / total, the NFE per image and an ETA."""
    out = io.StringIO()
    progress = Progress("predict", 6, nfe_per_image=3, enabled=True, file=out)
    wrapped = progress.wrap(lambda x, t: x, 4)
    for _ in range(3):
        wrapped(torch.zeros(4), torch.zeros(4))
    assert progress.nfe == 3 and 0 < progress.bar.n < 4 and progress.done == 0
    progress.batch_done(4, 3)
    assert progress.bar.n == pytest.approx(4) and progress.done == 4
    wrapped = progress.wrap(lambda x, t: x, 2)
    wrapped(torch.zeros(2), torch.zeros(2))
    assert "images 4/6, NFE 1/3 per image" in progress.bar.status
    wrapped(torch.zeros(2), torch.zeros(2)), wrapped(torch.zeros(2), torch.zeros(2))
    progress.batch_done(2, 3)
    progress.close()
    last = _final_line(out.getvalue())
    assert last.startswith("predict: 100%") and "images 6/6, NFE 3 per image" in last and "ETA 00:00" in last


def test_bar_of_an_adaptive_sampler_learns_the_nfe_from_the_first_batch():
    out = io.StringIO()
    progress = Progress("ode", 4, enabled=True, file=out)
    wrapped = progress.wrap(lambda x, t: x, 2)
    for _ in range(5):
        wrapped(torch.zeros(2), torch.zeros(2))
    assert progress.bar.n == 0 and "NFE 5 per image" in progress.bar.status
    progress.batch_done(2, 5)
    wrapped = progress.wrap(lambda x, t: x, 2)
    wrapped(torch.zeros(2), torch.zeros(2))
    assert "NFE 1/5 per image" in progress.bar.status and progress.bar.n == pytest.approx(2.4)
    progress.batch_done(2, 5)
    progress.close()
    assert "images 4/4, NFE 5 per image" in _final_line(out.getvalue())


def test_only_rank_zero_draws():
    out = io.StringIO()
    with Progress("x", 2, enabled=False, file=out) as progress:
        progress.advance(2)
    assert out.getvalue() == ""


TINY_NET = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)


def tiny_model(sampler=None):
    from lit_score.diffusion.likelihood import Likelihood
    from lit_score.runtime.module import ScoreModel
    from lit_score.networks import DDPMpp

    return ScoreModel(DDPMpp(num_channels=1, image_size=8, **TINY_NET), VPSDE(N=20), sampler=sampler,
                      likelihood=Likelihood(rtol=0.1, atol=0.1), warmup=1)


def tiny_trainer(tmp_path, callbacks=(), **kw):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                     num_sanity_val_steps=0, **kw)


def test_predict_and_test_show_images_nfe_and_eta(tmp_path, capsys, one_thread):
    """`lit-score predict` and `lit-score test` (the Trainer's predict and test): the sampling bar reaches all
    images with the sampler's NFE, the bits/dim bar all test images with the ODE's NFE."""
    from lit_score.data import DigitsDataModule

    data = DigitsDataModule(image_size=8, batch_size=4, num_samples=6, sample_batch_size=4)
    model = tiny_model(EDMSampler(steps=3))
    outputs = tiny_trainer(tmp_path).predict(model, data)
    err = capsys.readouterr().err
    last = _final_line(err, "predict: ")
    assert "images 6/6, NFE 5 per image" in last and "ETA 00:00" in last
    assert [o["nfe"] for o in outputs] == [5, 5]
    tiny_trainer(tmp_path, limit_test_batches=1).test(model, data)
    err = capsys.readouterr().err
    nfe = int(tiny_trainer(tmp_path, limit_test_batches=1, enable_progress_bar=False).test(
        model, data)[0]["test/nfe"])
    last = _final_line(err, "test/bpd: ")
    assert f"images 4/4, NFE {nfe} per image" in last and "ETA 00:00" in last
    assert "test/bpd" not in capsys.readouterr().err  # no bar without the Trainer's progress bar


def test_sample_grid_fid_and_reference_statistics_show_progress(tmp_path, capsys, one_thread):
    """The callbacks' bars during fit: the grid's and FID's images with their sampler's NFE, and the training
    images of the FID reference statistics, each with an ETA."""
    from lit_score.callbacks import FID, SampleGrid
    from lit_score.data import DigitsDataModule
    from lit_score.metrics import RandomConvFeatures

    data = DigitsDataModule(image_size=8, batch_size=4)
    grid = SampleGrid(every_n_steps=1, num_samples=3, sampler=EDMSampler(steps=2), batch_size=2)
    fid = FID(RandomConvFeatures(num_features=4, width=2), num_samples=5, every_n_steps=1, batch_size=2,
              sampler=DPMSolverPP(steps=4), cache_dir=str(tmp_path / "cache"))
    tiny_trainer(tmp_path, [grid, fid], max_steps=1, limit_val_batches=0).fit(tiny_model(), data)
    err = capsys.readouterr().err
    lines = {key: _final_line(err, key) for key in
             ("sample grid at step 1: ", "val/fid@5 at step 1: ", "FID reference statistics of ")}
    assert "images 3/3, NFE 3 per image" in lines["sample grid at step 1: "]
    assert "images 5/5, NFE 4 per image" in lines["val/fid@5 at step 1: "]
    reference = lines["FID reference statistics of "]
    n = len(data.train_dataloader().dataset)
    assert reference.startswith(f"FID reference statistics of {n} training images: 100%")
    assert f"images {n}/{n}" in reference
    assert all("ETA 00:00" in line for line in lines.values()), lines


def test_tqdm_disable_silences_the_bar():
    """TQDM_DISABLE=1 in the environment (read when tqdm is imported) turns off even an enabled bar."""
    import os
    import subprocess
    import sys

    code = ("from lit_score.progress import Progress\n"
            "with Progress('x', 2, enabled=True) as p:\n    p.advance(2)\n")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "images" not in proc.stderr, proc.stderr[-500:]  # shown without: tests above
