"""A first run on your own images shows progress: the folder experiments sample, validate and checkpoint early, and
the common intervals are top-level options (``--sample_every``, ``--checkpoint_every``, ``--val_every``,
``--fid_every``) that every experiment YAML interpolates, instead of indices into a callbacks list."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from lit_score.cli.config import compose
from lit_score.cli.lightning_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
INTERVALS = ("val_every", "checkpoint_every", "sample_every", "fid_every")
PAPER = {"val_every": 5000, "checkpoint_every": 50000, "sample_every": 50000, "fid_every": 50000}


def composed(experiment: Path) -> OmegaConf:
    """The experiment's YAML documents merged as the CLI merges them (later ones win, lists replaced)."""
    docs = [yaml.safe_load(Path(d).read_text() if "\n" not in d else d) for d in compose(experiment)]
    return OmegaConf.merge(*[OmegaConf.create(d or {}) for d in docs])


def intervals_in_use(config: OmegaConf) -> dict[str, list]:
    """Each interval as the trainer and its callbacks receive it, resolved."""
    plain = OmegaConf.to_container(config, resolve=True)
    trainer = plain.get("trainer") or {}
    used: dict[str, list] = {"val_every": [trainer.get("val_check_interval")], "checkpoint_every": [],
                             "sample_every": [], "fid_every": []}
    for callback in trainer.get("callbacks") or []:
        name, args = callback["class_path"].rsplit(".", 1)[-1], callback.get("init_args") or {}
        if name == "ModelCheckpoint":
            used["checkpoint_every"].append(args.get("every_n_train_steps"))
        elif name == "SampleGrid":
            used["sample_every"].append(args.get("every_n_steps"))
        elif name == "FID":
            used["fid_every"].append(args.get("every_n_steps"))
    return used


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_takes_its_intervals_from_the_top_level_options(experiment):
    """Property: in every experiment, validation, checkpoints, sample grids and FID run at the top-level
    ``val_every``, ``checkpoint_every``, ``sample_every`` and ``fid_every`` (changing one changes what the callbacks
    get); the paper experiments keep score_sde's intervals, and the small folder experiment's first grid,
    validation and checkpoint come by step 100."""
    config = composed(experiment)
    assert all(key in config for key in INTERVALS), [key for key in INTERVALS if key not in config]
    for key in INTERVALS:
        changed = config.copy()
        changed[key] = 7
        assert all(v == 7 for v in intervals_in_use(changed)[key]), (key, intervals_in_use(changed)[key])
    used = intervals_in_use(config)
    assert all(v == config[key] for key in INTERVALS for v in used[key]), used
    if experiment.stem.startswith(("cifar10", "celeba", "ffhq", "lsun", "edm_")):
        assert {key: config[key] for key in INTERVALS} == PAPER
    if experiment.stem == "imagefolder_small":
        assert max(config.val_every, config.checkpoint_every, config.sample_every) <= 100


def test_the_intervals_are_options_and_one_below_one_is_refused_when_parsed(capsys):
    """Property: ``--sample_every 3`` is an option of fit (its value reaches the config), and ``--sample_every 0``
    stops at parse time naming the option as an invalid value, not an unknown one."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", "quickstart", "--sample_every", "3", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [cb["init_args"]["every_n_steps"] for cb in printed["trainer"]["callbacks"]
            if cb["class_path"].endswith("SampleGrid")] == [3]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", "quickstart", "--sample_every", "0", "--print_config"])
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None)
    assert "sample_every" in err and "unrecognized" not in err.lower(), err[-500:]


def png_folder(folder: Path, n: int = 12, size: int = 8) -> Path:
    """``n`` random RGB PNGs of ``size`` x ``size``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_a_folder_run_draws_grids_and_checkpoints_at_the_intervals_given(tmp_path):
    """Property: `lit-score fit --config experiments/imagefolder_small.yaml --sample_every 2 --checkpoint_every 2
    --val_every 2` on a folder of PNGs, 4 steps, writes sample grids at steps 0, 2 and 4, a checkpoint at steps 2 and
    4 and validates at steps 2 and 4 (no callbacks list copied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = png_folder(tmp_path / "images")
    tiny = ["--model.net.init_args.nf", "8", "--model.net.init_args.ch_mult", "[1, 2]",
            "--model.net.init_args.attn_resolutions", "[]", "--data.init_args.image_size", "8",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.val_size", "2", "--trainer.limit_val_batches", "1", "--trainer.max_steps", "4",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"]
    small = str(ROOT / "experiments" / "imagefolder_small.yaml")
    cli = run_cli(["fit", "--config", small, "--data.init_args.path", str(folder), *tiny, "--sample_every", "2",
                   "--checkpoint_every", "2", "--val_every", "2", "--trainer.logger.init_args.save_dir",
                   str(tmp_path / "runs")])
    assert cli.trainer.global_step == 4
    run = tmp_path / "runs" / "imagefolder_small" / "version_0"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [f"step_{s:08d}.png" for s in (0, 2, 4)]
    steps = sorted(torch.load(p, weights_only=True)["global_step"] for p in (run / "checkpoints").glob("*step=*.ckpt"))
    assert steps == [2, 4]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert len(events.Scalars("val/loss")) == 2  # after steps 2 and 4
