"""The noise-conditional classifier of classifier guidance (NoiseClassifierNet, ClassifierLoss, classifier_logits):
its shapes and head, its cross-entropy recomputed independently, and that it learns a toy problem at small noise and
knows nothing at sigma 80, where the two classes are indistinguishable."""
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lit_score.diffusion.denoiser import EDMPrecond, NetworkDenoiser
from lit_score.diffusion.losses import ClassifierLoss, classifier_logits
from lit_score.diffusion.sdes import VESDE
from lit_score.networks import NoiseClassifierNet

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def small_net(num_classes=10, **kw):
    options = dict(num_channels=1, image_size=16, nf=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                   dropout=0.0)
    options.update(kw)
    return NoiseClassifierNet(num_classes, **options)


def tiny_net(**kw):
    torch.manual_seed(0)
    return NoiseClassifierNet(2, num_channels=1, image_size=8, nf=8, ch_mult=[1, 2], num_res_blocks=1,
                              attn_resolutions=[], dropout=0.0, **kw)


def halves(n: int, generator: torch.Generator, amplitude: float = 0.5, pixel_noise: float = 0.2):
    """8x8 images, class 0 bright (+a) on the left half and dark (-a) on the right, class 1 the mirror image, plus
    N(0, pixel_noise^2) per pixel; labels balanced."""
    y = torch.arange(n) % 2
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    pattern = torch.stack([2 * left - 1, 1 - 2 * left])  # (2, 8, 8) in {-1, 1}
    x = amplitude * pattern[y] + pixel_noise * torch.randn(n, 8, 8, generator=generator)
    return x[:, None], y


@pytest.mark.parametrize("resblock_type,embedding_type", [("biggan", "positional"), ("ddpm", "fourier")])
def test_logits_shape_and_data_shape(resblock_type, embedding_type):
    net = small_net(resblock_type=resblock_type, embedding_type=embedding_type)
    assert net.output == "logits" and net.data_shape == (1, 16, 16)
    out = net(torch.randn(5, 1, 16, 16), torch.linspace(-1, 1, 5))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert net(torch.randn(3, 1, 16, 16), torch.tensor(0.3)).shape == (3, 10)  # a scalar noise label broadcasts


def test_num_classes_changes_only_the_head():
    a, b = small_net(num_classes=3), small_net(num_classes=10)
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    shapes_b = {k: v.shape for k, v in b.state_dict().items()}
    assert shapes_a.keys() == shapes_b.keys()
    differ = sorted(k for k in shapes_a if shapes_a[k] != shapes_b[k])
    assert differ == ["head.bias", "head.weight"]
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(b) - count(a) == 7 * (a.feature_dim + 1)


def test_refuses_class_labels_and_too_few_classes():
    net = small_net()
    x, c = torch.randn(2, 1, 16, 16), torch.zeros(2)
    with pytest.raises(ValueError, match="predicts class labels and takes none"):
        net(x, c, {"class_labels": torch.tensor([0, 1])})
    assert net(x, c, {"class_labels": None}).shape == (2, 10)  # no labels: as without cond
    for bad in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            NoiseClassifierNet(bad)
    with pytest.raises(ValueError, match="expects input of shape"):
        net(torch.randn(2, 3, 16, 16), c)


def test_classifier_loss_equals_an_independent_recomputation():
    net = small_net().eval()
    sde = VESDE(SIGMA_MIN, SIGMA_MAX)
    D = NetworkDenoiser(net, EDMPrecond(), sde)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    y = torch.tensor([0, 3, 9, 3, 1, 7])
    eps = 1e-3
    loss = ClassifierLoss(eps=eps)(D, x, torch.Generator().manual_seed(5), {"class_labels": y})

    generator = torch.Generator().manual_seed(5)
    t = torch.rand(6, generator=generator) * (1 - eps) + eps
    n = torch.randn(x.shape, generator=generator)
    sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
    x_hat = x + sigma[:, None, None, None] * n
    c_in = 1 / torch.sqrt(sigma**2 + 0.25)  # EDM's, sigma_data 0.5
    with torch.no_grad():
        expected = F.cross_entropy(net(c_in[:, None, None, None] * x_hat, sigma.log() / 4), y)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (loss, expected)
    # the logits function guidance calls: the same logits, differentiable in x_hat
    x_hat.requires_grad_(True)
    logits = classifier_logits(net, EDMPrecond(), sde, x_hat, sigma)
    assert torch.allclose(F.cross_entropy(logits, y), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(logits.log_softmax(1)[torch.arange(6), y].sum(), x_hat)
    assert grad.shape == x_hat.shape and grad.abs().sum() > 0


def test_classifier_loss_needs_labels():
    loss = ClassifierLoss()
    assert loss.needs_labels is True and isinstance(loss.default_precond(VESDE()), EDMPrecond)
    D = NetworkDenoiser(small_net(), EDMPrecond(), VESDE(SIGMA_MIN, SIGMA_MAX))
    x = torch.randn(2, 1, 16, 16)
    for cond in (None, {}, {"augment": None}):
        with pytest.raises(ValueError, match="needs labelled data"):
            loss(D, x, cond=cond)
    with pytest.raises(ValueError, match=r"class labels must be in 0\.\.9"):
        loss(D, x, cond={"class_labels": torch.tensor([0, 10])})
    with pytest.raises(ValueError, match="eps"):
        ClassifierLoss(eps=0.0)


def bayes_accuracy(sigma: float, amplitude: float = 0.5) -> float:
    """Accuracy of the Bayes classifier of the halves problem at noise sigma: the class means differ by 2a on each of
    the 64 pixels, |mu_1 - mu_0| = 16 a, against noise of std sqrt(sigma^2 + 0.2^2) along that direction, so
    Phi(|mu_1 - mu_0| / (2 std))."""
    return 0.5 * (1 + math.erf(16 * amplitude / (2 * math.hypot(sigma, 0.2)) / math.sqrt(2)))


def test_tiny_classifier_learns_at_small_sigma_and_knows_nothing_at_sigma_80():
    """150 Adam steps of ClassifierLoss on the toy halves problem, evaluated on N = 4000 new images at fixed sigma.
    Bayes accuracies: 1.000 at sigma 0.01, 0.788 at 5, 0.520 at 80. No classifier beats them by more than 4 binomial
    standard deviations (sqrt(0.25 / N) = 0.008): a check that the images are as noisy as claimed. The classifier
    reaches > 0.9 at sigma 0.01; at sigma 80 its accuracy is within 0.5 +- (0.020 + 4 * 0.008) of chance, as any
    classifier's; at sigma 5 it is within 0.1 of Bayes (it learnt the noise levels between; 0.73-0.77 over seeds);
    and at sigma 80 its cross-entropy is within 0.06 of log 2 (0.697-0.700 over seeds), where a classifier trained at
    small noise only is overconfident (2.9)."""
    torch.manual_seed(0)
    net = tiny_net()
    sde, precond = VESDE(SIGMA_MIN, SIGMA_MAX), EDMPrecond()
    D = NetworkDenoiser(net, precond, sde)
    loss_fn = ClassifierLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    data_gen, noise_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    losses = []
    for _ in range(150):
        x, y = halves(64, data_gen)
        loss = loss_fn(D, x, noise_gen, {"class_labels": y})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < sum(losses[:10]) / 10  # it learnt something

    N = 4000
    x, y = halves(N, torch.Generator().manual_seed(3))
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    net.eval()
    accuracy, cross_entropy = {}, {}
    with torch.no_grad():
        for sigma in (0.01, 5.0, SIGMA_MAX):
            logits = classifier_logits(net, precond, sde, x + sigma * n, sigma)
            accuracy[sigma] = (logits.argmax(1) == y).float().mean().item()
            cross_entropy[sigma] = F.cross_entropy(logits, y).item()
    binomial = 4 * math.sqrt(0.25 / N)
    for sigma, value in accuracy.items():
        assert value < bayes_accuracy(sigma) + binomial, (sigma, value)
    assert accuracy[0.01] > 0.9, accuracy
    assert abs(accuracy[SIGMA_MAX] - 0.5) < bayes_accuracy(SIGMA_MAX) - 0.5 + binomial, accuracy
    assert accuracy[5.0] > bayes_accuracy(5.0) - 0.1, accuracy
    assert abs(cross_entropy[SIGMA_MAX] - math.log(2)) < 0.06, cross_entropy


class _Labelled(L.LightningDataModule):
    """A tiny labelled image DataModule: (x, y) batches of the toy halves problem."""

    def __init__(self):
        super().__init__()
        x, y = halves(64, torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=32)


def test_score_model_trains_a_classifier(tmp_path):
    """ScoreModel(net=NoiseClassifierNet, loss=ClassifierLoss) constructs and fits a few steps with validation, the
    labels of (x, y) batches reaching the loss; the EMA callback and a checkpoint work as for score networks."""
    from lit_score.callbacks import EMA
    from lit_score.data_space import DataSpace
    from lit_score.runtime.module import ScoreModel

    space = DataSpace((1, 8, 8), centered=True, num_classes=2)  # what lit-score passes from a labelled DataModule
    model = ScoreModel(net=tiny_net(), sde=VESDE(SIGMA_MIN, SIGMA_MAX), loss=ClassifierLoss(), precond=EDMPrecond(),
                       lr=1e-3, warmup=0, data_space=space)
    assert model.data_shape == (1, 8, 8)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[EMA(rate=0.9)],
                        val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=_Labelled())
    assert trainer.global_step == 5 and model.ema is not None
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    # the checkpoint reloads (EMA weights included) to the same classifier
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    loaded = ScoreModel.load_from_checkpoint(path, net=tiny_net(), sde=VESDE(SIGMA_MIN, SIGMA_MAX),
                                             loss=ClassifierLoss(), precond=EDMPrecond()).eval()
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 5.0, 80.0])
    with torch.no_grad():
        expected = classifier_logits(model.eval().sampling_net, EDMPrecond(), model.sde, x, sigma)
        assert torch.equal(classifier_logits(loaded.sampling_net, loaded.precond, loaded.sde, x, sigma), expected)


@pytest.mark.slow  # ~70 s on 2 cores: the quickstart classifier as the YAML gives it
@pytest.mark.timeout(1800)
def test_quickstart_classifier_trains_on_the_digits(tmp_path):
    """`lit-score fit --config experiments/quickstart_classifier.yaml` (1000 steps): the EMA classifier of last.ckpt
    tells the validation digits apart at small noise (> 0.9) and is at chance at sigma 80, over 10 noise draws of the
    180 validation digits: 0.1 +- 0.05 (4 binomial standard deviations of 1800 near-independent draws, 0.028, and a
    Bayes accuracy at sigma 80 at most 0.02 above chance: class means of 16x16 digits in [-1, 1] lie well within 16
    of each other, d' / 2 < 0.1); with 10 classes, a calibrated classifier's cross-entropy there is near log 10.
    Measured: accuracy 0.994 at sigma 0.002 and 0.1, 0.92 at 1, 0.097 at 80 (cross-entropy 2.312; log 10 = 2.303);
    the largest distance between two class means is 9.6."""
    import subprocess
    import sys
    from pathlib import Path

    from lit_score.data import DigitsDataModule
    from lit_score.runtime.module import ScoreModel

    root = Path(__file__).resolve().parents[1]
    lit_score = str(Path(sys.executable).parent / "lit-score")
    cmd = [lit_score, "fit", "--config", "experiments/quickstart_classifier.yaml",
           "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = ScoreModel.load_from_checkpoint(tmp_path / "quickstart_classifier" / "version_0" / "checkpoints" /
                                            "last.ckpt", map_location="cpu").eval()
    data = DigitsDataModule(image_size=16, centered=True)
    data.setup("validate")
    x, y = map(torch.stack, zip(*(data.val_set[i] for i in range(len(data.val_set)))))
    x, y = x.repeat(10, 1, 1, 1), y.long().repeat(10)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    accuracy, cross_entropy = {}, {}
    with torch.no_grad():
        for sigma in (0.002, 0.1, 1.0, 80.0):
            logits = classifier_logits(model.sampling_net, model.precond, model.sde, x + sigma * n, sigma)
            accuracy[sigma] = (logits.argmax(1) == y).float().mean().item()
            cross_entropy[sigma] = F.cross_entropy(logits, y).item()
    print(accuracy, cross_entropy)
    assert accuracy[0.002] > 0.9 and accuracy[0.1] > 0.9, accuracy
    assert abs(accuracy[80.0] - 0.1) < 0.05, accuracy
    assert abs(cross_entropy[80.0] - math.log(10)) < 0.1, cross_entropy
