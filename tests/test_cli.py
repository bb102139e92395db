"""The `lit-score` CLI: composable experiment YAMLs, every shipped experiment resolves and builds, bad keys fail."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_score.cli.lightning_cli import ScoreCLI, run_cli
from lit_score.cli.config import ConfigError, compose, expand_config_args

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml"))
LIT_SCORE = str(Path(sys.executable).parent / "lit-score")


def test_defaults_compose_in_order_relative_to_the_file(tmp_path):
    """`defaults:` files come first (recursively, relative to the including file), the file itself last."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("model:\n  lr: 1.0\n")
    (tmp_path / "base" / "b.yaml").write_text("defaults: [a.yaml]\nmodel:\n  lr: 2.0\n")
    (tmp_path / "exp.yaml").write_text("defaults: [base/b.yaml]\nmodel:\n  warmup: 3\n")
    docs = compose(tmp_path / "exp.yaml")
    assert docs[0] == str(tmp_path / "base" / "a.yaml")
    assert [yaml.safe_load(d) for d in docs[1:]] == [{"model": {"lr": 2.0}}, {"model": {"warmup": 3}}]
    assert expand_config_args(["fit", "--config", str(tmp_path / "exp.yaml"), "--model.lr", "5"])[-2:] == ["--model.lr", "5"]


def test_compose_errors_name_the_problem(tmp_path):
    """A missing file, a cycle and a malformed defaults list each get an error that names them."""
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        compose(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        compose(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("defaults: {x: 1}\n")
    with pytest.raises(ConfigError, match="must be a list"):
        compose(tmp_path / "c.yaml")


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_resolves_with_print_config(experiment, capsys):
    """`lit-score fit --config X --print_config` resolves every interpolation and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(experiment), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "${" not in yaml.safe_dump(printed)
    assert printed["model"]["net"]["class_path"].startswith("lit_score.networks.")
    ema_rates = [cb["init_args"]["rate"] for cb in printed["trainer"]["callbacks"]
                 if cb["class_path"].endswith(".EMA") and not cb["init_args"].get("halflife_kimg")]  # EDM: half-life
    assert all(rate == printed["ema_rate"] for rate in ema_rates), (printed["ema_rate"], ema_rates)  # what runs


def instantiate(experiment: Path, tmp_path: Path) -> ScoreCLI:
    """The experiment's model, data and trainer, built as `lit-score fit` builds them, without running."""
    args = expand_config_args(["--config", str(experiment)]) + [
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    return ScoreCLI(run=False, args=args, save_config_callback=None)


@pytest.mark.parametrize("experiment", [p for p in EXPERIMENTS if p.stem.startswith("cifar10")], ids=lambda p: p.stem)
def test_cifar10_networks_build_with_the_data_shape(experiment, tmp_path):
    """The network is built with the data's channels and resolution, its denoiser maps a CIFAR-10 batch to its
    shape, and its parametrisation is score_sde's: the scaled score for VE, noise prediction for VP and sub-VP,
    the discrete levels for the SMLD objective."""
    import torch

    from lit_score.diffusion.denoiser import NoisePrediction, ScorePrediction, SMLDLevels

    cli = instantiate(experiment, tmp_path)
    model, data = cli.model, cli.datamodule
    assert model.net.data_shape == (3, 32, 32) == (data.num_channels, data.image_size, data.image_size)
    n_params = sum(p.numel() for p in model.net.parameters())
    print(f"{experiment.stem}: {n_params:,} parameters")
    assert n_params > 10_000_000
    with torch.no_grad():
        out = model.denoiser(model.net)(torch.zeros(1, 3, 32, 32), model.sde.sigma(torch.tensor([0.5])))
    assert out.shape == (1, 3, 32, 32)
    expected = (SMLDLevels if "smld" in experiment.stem else ScorePrediction if "_ve" in experiment.stem
                else NoisePrediction)
    assert type(model.precond) is expected


@pytest.mark.slow  # CLI starts in processes (~8 s); tests/test_one_line_errors.py covers the same in-process: runs in make test-slow (CI)
def test_misspelt_key_on_the_command_line_is_named():
    """`--trainer.max_stepz 3` exits non-zero with a message naming max_stepz."""
    proc = subprocess.run([LIT_SCORE, "fit", "--config", "experiments/quickstart.yaml", "--trainer.max_stepz", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr


def test_misspelt_key_in_a_yaml_is_named(tmp_path, capsys):
    """An unknown key inside an experiment YAML fails and names the key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"defaults: [{ROOT / 'experiments' / 'quickstart.yaml'}]\nmodel:\n  learning_rate: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_missing_config_file_is_named(capsys):
    """A config path that does not exist exits non-zero and names the path."""
    with pytest.raises(ConfigError, match="does_not_exist.yaml.*packaged: .*quickstart"):
        run_cli(["fit", "--config", "experiments/does_not_exist.yaml"])


@pytest.mark.parametrize("experiment", ["edm_cifar10_ddpmpp", "edm_cifar10_ncsnpp", "quickstart_edm"])
def test_edm_experiments_build_with_edm_settings(experiment, tmp_path):
    """EDM's experiments build with its objective and CIFAR-10 settings (NVlabs edm train.py: batch 512, lr 1e-3 over a
    10 Mimg ramp-up, dropout 0.13, EMA half-life 500 kimg, 200 Mimg, Heun with 18 levels), and score a batch."""
    import torch

    from lit_score.callbacks.ema import EMA
    from lit_score.diffusion.losses import EDMLoss
    from lit_score.diffusion.denoiser import EDMPrecond
    from lit_score.sampling import EDMSampler

    cli = instantiate(ROOT / "experiments" / f"{experiment}.yaml", tmp_path)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    loss = model.loss
    assert type(loss) is EDMLoss and type(model.precond) is EDMPrecond and model.precond.sigma_data == 0.5
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-1.2, 1.2, 0.5)
    assert isinstance(model.sampler, EDMSampler) and model.sampler.steps == 18 and model.sampler.S_churn == 0
    assert (model.sde.sigma_min, model.sde.sigma_max) == (0.002, 80.0)
    if experiment.startswith("edm_cifar10"):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        assert (ema.halflife_kimg, ema.rampup_ratio) == (500, 0.05)
        assert data.batch_size == 512 and trainer.max_steps * 512 >= 200_000_000 > (trainer.max_steps - 1) * 512
        assert model.hparams.lr == 1e-3 and model.hparams.warmup * 512 == pytest.approx(10_000_000, rel=1e-4)
        assert trainer.gradient_clip_val is None and model.net.data_shape == (3, 32, 32)
        assert all(m.p == 0.13 for m in model.net.modules() if isinstance(m, torch.nn.Dropout))
        print(f"{experiment}: {sum(p.numel() for p in model.net.parameters()):,} parameters")
    x = torch.zeros(1, *model.net.data_shape)
    with torch.no_grad():
        assert model.score_fn(x, torch.tensor([0.5])).shape == x.shape
