"""Class-conditional networks (EDM's map_label, label dropout for classifier-free guidance) and the model's checks of
labels against its data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_score.data_space import DataSpace
from lit_score.diffusion.denoiser import EDMPrecond
from lit_score.diffusion.losses import EDMLoss
from lit_score.diffusion.sdes import VESDE
from lit_score.networks import DDPMpp, NCSNpp, ScoreMLP
from lit_score.networks.cond import NULL_CLASS
from lit_score.runtime.module import ScoreModel

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL_COUNTS = json.loads((ROOT / "tests/reference/edm_param_counts.json").read_text())
CONFIG_F = dict(nf=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.13, fir=False)


def tiny(**kw) -> DDPMpp:
    """A small DDPM++ whose output layer is not zero (init_scale 0 zeroes it)."""
    return DDPMpp(num_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  init_scale=1.0, **kw)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("augment_dim", [0, 9])
def test_conditional_config_f_has_the_official_parameter_count(arch, augment_dim):
    """NVlabs edm's conditional networks (label_dim 10; tests/reference/make_edm_param_counts.py ran the official
    code): map_label is a biased linear map into the noise embedding. Our NCSN++ also holds score_sde's 128 frozen
    Fourier weights, which EDM keeps as a buffer."""
    cls, extra = (DDPMpp, {}) if arch == "ddpmpp" else (NCSNpp, {"fir": True, "resblock_type": "biggan",
                                                                 "progressive_input": "residual"})
    with torch.device("meta"):
        net = cls(num_channels=3, image_size=32, augment_dim=augment_dim, num_classes=10, **{**CONFIG_F, **extra})
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == OFFICIAL_COUNTS[f"{arch}_augment{augment_dim}_label10"]


def test_null_class_and_labels_reach_the_output():
    torch.manual_seed(0)
    net = tiny(num_classes=3).eval()
    with torch.no_grad():  # map_label's weights are xavier-initialised; give the bias a value too
        net.map_label.linear.bias.normal_()
    x, c = torch.randn(4, 1, 8, 8), torch.rand(4)
    outs = {y: net(x, c, {"class_labels": torch.full((4,), y)}) for y in (NULL_CLASS, 0, 1, 2)}
    for a in outs:
        for b in outs:
            assert a == b or not torch.allclose(outs[a], outs[b])
    # the null class is the zero one-hot vector: only map_label's bias joins the embedding
    with torch.no_grad():
        net.map_label.linear.bias.zero_()
        plain = tiny()
        plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("map_label")})
        assert torch.equal(net(x, c, {"class_labels": torch.full((4,), NULL_CLASS)}), plain.eval()(x, c))


def test_label_dropout_drops_labels_at_its_rate_in_training_only():
    p, n = 0.3, 4000
    net = ScoreMLP(num_channels=2, num_classes=5, label_dropout=p)
    emb = net.map_label
    with torch.no_grad():
        emb.linear.bias.zero_()
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    dropped = (emb(labels).abs().sum(1) == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    emb.eval()
    assert (emb(labels).abs().sum(1) > 0).all()


def test_labels_a_network_cannot_take_are_refused_in_one_line():
    x, c = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="takes no class labels.*set model.net.init_args.num_classes"):
        tiny()(x, c, {"class_labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="needs cond\\['class_labels'\\]"):
        tiny(num_classes=3)(x, c)
    with pytest.raises(ValueError, match="in 0..2"):
        tiny(num_classes=3)(x, c, {"class_labels": torch.tensor([0, 3])})
    with pytest.raises(ValueError, match="integers of shape"):
        tiny(num_classes=3)(x, c, {"class_labels": torch.zeros(2)})
    with pytest.raises(ValueError, match="needs num_classes > 0"):
        tiny(label_dropout=0.1)


def model(net, space: DataSpace | None, **kw) -> ScoreModel:
    return ScoreModel(net, VESDE(0.002, 80.0), EDMLoss(), EDMPrecond(), data_space=space, **kw)


def test_the_model_checks_its_classes_against_the_data():
    labelled = DataSpace((1, 8, 8), True, num_classes=3, class_counts=(1, 2, 3))
    assert model(tiny(), labelled).data_space == labelled.unlabelled()  # an unconditional model ignores labels
    assert model(tiny(num_classes=3), labelled).data_space == labelled
    from lit_score.runtime.module import _classes_checked

    unlabelled = DataSpace((1, 8, 8), True)
    with pytest.raises(ValueError, match="class-conditional model needs labelled data.*or set model.net.init_args"):
        _classes_checked(unlabelled, tiny(num_classes=3), EDMLoss(), None, strict=True)  # what fit's setup runs
    with pytest.raises(ValueError, match="takes 4 classes but the data have 3: set model.net.init_args.num_classes 3"):
        model(tiny(num_classes=4), labelled)
    from lit_score.diffusion.guidance import ClassifierFreeGuidance

    with pytest.raises(ValueError, match="ClassifierFreeGuidance needs a class-conditional network"):
        model(tiny(), labelled, guidance=ClassifierFreeGuidance(2.0))


def test_a_conditional_model_trains_on_the_batch_labels_and_refuses_unlabelled_batches():
    """The loss sees the batch's labels: with the same noise, relabelling the batch changes the loss."""
    labelled = DataSpace((1, 8, 8), True, num_classes=3)
    m = model(tiny(num_classes=3), labelled)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])

    def loss(labels):
        torch.manual_seed(3)
        return float(m.training_step((x, labels), 0))

    assert loss(y) == loss(y) and loss(y) != loss((y + 1) % 3)
    with pytest.raises(ValueError, match="the batch has no labels"):
        m.training_step(x, 0)


def test_seed_labels_follow_the_class_frequencies_and_do_not_depend_on_the_batch():
    space = DataSpace((1, 8, 8), True, num_classes=3, class_counts=(10, 30, 60))
    seeds = list(range(6000))
    labels = space.labels_for(seeds)
    freq = torch.bincount(labels, minlength=3).double() / len(seeds)
    expected = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    assert ((freq - expected).abs() < 5 * (expected * (1 - expected) / len(seeds)).sqrt()).all()
    assert torch.equal(torch.cat([space.labels_for(seeds[i:i + 7]) for i in range(0, 6000, 7)]), labels)
    assert (space.labels_for(seeds[:5], class_label=2) == 2).all()
    with pytest.raises(ValueError, match="class_label must be in 0..2"):
        space.labels_for(seeds[:5], class_label=3)


def test_an_unconditional_model_guided_by_a_classifier_draws_the_classifiers_classes():
    """ClassifierGuidance of an unconditional model: the labels are the classifier's classes (class-balanced in the
    callbacks and lit-score-eval, seed-drawn otherwise), and the guided samples differ from the unguided ones."""
    from lit_score.diffusion.guidance import ClassifierGuidance
    from lit_score.diffusion.losses import ClassifierLoss
    from lit_score.networks import NoiseClassifierNet
    from lit_score.sampling import EDMSampler

    torch.manual_seed(0)
    classes = DataSpace((1, 8, 8), True, num_classes=3, class_counts=(1, 1, 2))
    classifier = ScoreModel(NoiseClassifierNet(num_classes=3, num_channels=1, image_size=8, nf=8, ch_mult=(1, 2),
                                               num_res_blocks=1, attn_resolutions=(), init_scale=1.0),
                            VESDE(0.002, 80.0), ClassifierLoss(), EDMPrecond(), data_space=classes)
    plain = model(tiny(), DataSpace((1, 8, 8), True)).eval()
    guided = model(tiny(), DataSpace((1, 8, 8), True), guidance=ClassifierGuidance(classifier, 4.0)).eval()
    guided.load_state_dict(plain.state_dict())
    assert guided.label_space == classes and not plain.labelled
    result = guided.sample([0, 1, 2, 3], EDMSampler(steps=3))
    assert result.labels.tolist() == classes.labels_for([0, 1, 2, 3]).tolist() and result.network_evaluations == 10
    assert not torch.allclose(result.samples, plain.sample([0, 1, 2, 3], EDMSampler(steps=3)).samples)
    with pytest.raises(ValueError, match="noise-conditional classifier: it draws no samples"):
        classifier.sample([0])
