"""Tests of the score networks (lit_score.networks): FIR resampling, layers, NCSN++ / DDPM++, ScoreMLP.

All networks here are reduced-width versions (nf=16, ch_mult (1, 2), one res block, 8x8 or 16x16
images) so the file runs in seconds on a CPU; only the parameter-count test builds full-size models,
on the meta device.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_score.networks import DDPMpp, NCSNpp, ScoreMLP
from lit_score.networks.fir import (
    Downsample,
    Upsample,
    downsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
    setup_kernel,
    upfirdn2d,
    upsample_2d,
    upsample_conv_2d,
)
from lit_score.networks.layers import NIN, AttnBlockpp, conv3x3, timestep_embedding

SMALL = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))

# The four config families of Song et al. 2021 (appendix H), at reduced width.
FAMILIES = {
    # NCSN++: Fourier embedding, BigGAN blocks, FIR, output-skip pyramid + residual input pyramid
    "ncsnpp": lambda c, s, **kw: NCSNpp(c, s, **dict(SMALL, **kw), progressive="output_skip",
                                        progressive_input="residual"),
    # NCSN++ deep: more residual blocks per resolution
    "ncsnpp_deep": lambda c, s, **kw: NCSNpp(c, s, **dict(SMALL, num_res_blocks=2, **kw)),
    # DDPM++: positional embedding, BigGAN blocks, no FIR, no pyramids
    "ddpmpp": lambda c, s, **kw: DDPMpp(c, s, **dict(SMALL, **kw)),
    # DDPM++ with DDPM residual blocks (separate up/down-sampling layers)
    "ddpmpp_ddpm_blocks": lambda c, s, **kw: DDPMpp(c, s, **dict(SMALL, **kw), resblock_type="ddpm"),
}


def _labels(family: str, batch: int) -> torch.Tensor:
    """log sigma for the Fourier-embedded (VE) nets, t * 999 for the positional (VP) nets."""
    if family.startswith("ncsnpp"):
        return torch.linspace(0.05, 20.0, batch).log()
    return torch.linspace(1.0, 999.0, batch)


# --------------------------------------------------------------------------- FIR resampling
def test_fir_kernel_is_normalised_outer_product() -> None:
    """[1, 3, 3, 1] becomes the separable 4x4 kernel outer(k, k) / 64, summing to 1."""
    k = setup_kernel([1, 3, 3, 1])
    expected = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(k, torch.outer(expected, expected) / 64)
    assert math.isclose(k.sum().item(), 1.0, rel_tol=1e-6)


def test_upfirdn2d_is_a_true_convolution_hand_computed() -> None:
    """With pad 1 on both sides, upfirdn2d gives the full 2-D convolution (kernel flipped, not correlation)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    k = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = torch.tensor([[1.0, 4.0, 4.0], [6.0, 20.0, 16.0], [9.0, 24.0, 16.0]])
    assert torch.equal(upfirdn2d(x, k, pad=(1, 1))[0, 0], expected)


def test_upfirdn2d_up_and_down_hand_computed() -> None:
    """Upsampling an impulse by 2 reproduces the kernel; a 1x1 unit kernel with down=2 takes every other pixel."""
    k = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    impulse = torch.ones(1, 1, 1, 1)
    assert torch.equal(upfirdn2d(impulse, k, up=2, pad=(1, 0))[0, 0], k)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(upfirdn2d(x, torch.ones(1, 1), down=2), x[:, :, ::2, ::2])
    # output-size formula (size * up + pads - k) // down + 1, with a negative pad cropping
    assert upfirdn2d(torch.ones(2, 3, 5, 5), torch.ones(3, 3), up=2, down=2, pad=(2, -1)).shape == (2, 3, 5, 5)


def test_fir_up_then_down_keeps_a_constant_image() -> None:
    """FIR up- then down-sampling of a constant image gives the constant back (away from the zero-padded border),
    and the round trip keeps the size."""
    c = torch.full((1, 2, 8, 8), 3.5)
    up = upsample_2d(c, [1, 3, 3, 1])
    assert up.shape == (1, 2, 16, 16)
    assert torch.allclose(up[..., 1:-1, 1:-1], torch.full_like(up[..., 1:-1, 1:-1], 3.5))
    back = downsample_2d(up, [1, 3, 3, 1])
    assert back.shape == c.shape
    assert torch.allclose(back[..., 1:-1, 1:-1], c[..., 1:-1, 1:-1])
    # the parameter-free modules do the same; the naive (nearest / average) ones keep it everywhere
    assert torch.allclose(Downsample(fir=True)(Upsample(fir=True)(c))[..., 1:-1, 1:-1], c[..., 1:-1, 1:-1])
    assert torch.equal(naive_downsample_2d(naive_upsample_2d(c)), c)


def test_fir_kernel_1_1_is_nearest_and_average_pooling() -> None:
    """FIR kernel [1, 1] gives nearest-neighbour upsampling and 2x2 average pooling."""
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(upsample_2d(x, [1, 1]), naive_upsample_2d(x))
    assert torch.allclose(downsample_2d(x, [1, 1]), F.avg_pool2d(x, 2))


def test_fused_upsample_conv_matches_upsample_then_conv_in_the_interior() -> None:
    """The fused (transposed-conv) FIR upsample+conv equals upsample_2d followed by a 'same' 3x3 conv,
    except on the border where the fused op pads only once."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 3, 3)
    fused = upsample_conv_2d(x, w, [1, 3, 3, 1])
    separate = F.conv2d(upsample_2d(x, [1, 3, 3, 1]), w, padding=1)
    assert fused.shape == (2, 5, 16, 16)
    assert torch.allclose(fused[..., 2:-2, 2:-2], separate[..., 2:-2, 2:-2], atol=1e-5)


# --------------------------------------------------------------------------- layers
def test_variance_scaling_and_zero_init_scale() -> None:
    """Convs use the uniform fan_avg variance-scaling init (|w| <= sqrt(3 / fan_avg)); init_scale=0 means 1e-10."""
    conv = conv3x3(16, 32)
    bound = math.sqrt(3.0 / ((16 * 9 + 32 * 9) / 2))
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(conv.bias) == 0
    tiny = conv3x3(16, 32, init_scale=0.0)
    assert 0 < tiny.weight.abs().max() <= bound * math.sqrt(1e-10)


def test_nin_is_a_per_pixel_dense_layer() -> None:
    """NIN(x)[b, :, i, j] = x[b, :, i, j] @ W + b, with W of shape (in, out) as in the official code."""
    nin = NIN(4, 6)
    with torch.no_grad():
        nin.b.normal_()
    x = torch.randn(2, 4, 3, 5)
    expected = torch.einsum("bchw,co->bohw", x, nin.W) + nin.b[None, :, None, None]
    assert torch.allclose(nin(x), expected, atol=1e-6)


def test_attention_matches_explicit_softmax_attention() -> None:
    """AttnBlockpp is single-head softmax attention over pixels with scale 1/sqrt(C), residual and /sqrt(2)."""
    torch.manual_seed(0)
    block = AttnBlockpp(8, skip_rescale=True, init_scale=1.0)
    x = torch.randn(2, 8, 4, 4)
    h = block.GroupNorm_0(x)
    q, k, v = block.NIN_0(h), block.NIN_1(h), block.NIN_2(h)
    w = torch.softmax(torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 4, 4, 16) / math.sqrt(8), -1)
    out = torch.einsum("bhwn,bcn->bchw", w, v.reshape(2, 8, 16))
    expected = (x + block.NIN_3(out)) / math.sqrt(2)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_timestep_embedding_shape_and_values() -> None:
    """The positional embedding is [sin(t f), cos(t f)] with f_0 = 1; odd sizes are zero-padded."""
    t = torch.tensor([0.0, 5.0])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (2, 7)
    assert torch.allclose(emb[1, 0], torch.sin(torch.tensor(5.0)))
    assert torch.allclose(emb[1, 3], torch.cos(torch.tensor(5.0)))
    assert torch.all(emb[:, -1] == 0)


# --------------------------------------------------------------------------- NCSN++ / DDPM++
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("channels", [1, 3])
def test_output_has_input_shape(family: str, channels: int) -> None:
    """Every config family maps (B, C, H, W) to (B, C, H, W), for grayscale and RGB, with finite values."""
    size = 8 if channels == 1 else 16
    attn = (8,) if size == 16 else (4,)
    net = FAMILIES[family](channels, size, **({"attn_resolutions": attn} if size == 8 else {}))
    x = torch.randn(2, channels, size, size)
    out = net(x, _labels(family, 2))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(progressive="residual", progressive_input="residual"),  # fused FIR upsample-conv pyramid
        dict(progressive="output_skip", progressive_input="input_skip", progressive_combine="cat"),
        dict(resblock_type="ddpm", fir=True, progressive="output_skip", progressive_input="input_skip"),
        dict(resblock_type="ddpm", resamp_with_conv=False, fir=False),
        dict(conditional=False, skip_rescale=False, nonlinearity="elu"),
        dict(image_size=24, attn_resolutions=(12,)),  # not a power of two, but divisible by 2
    ],
    ids=["residual-pyramids", "skip-cat", "ddpm-blocks-fir", "ddpm-blocks-noconv", "unconditional", "size24"],
)
def test_other_switch_combinations_run(kwargs: dict) -> None:
    """Less common switch combinations build and map (B, C, H, W) to (B, C, H, W)."""
    kwargs = dict(SMALL, **kwargs)
    size = kwargs.pop("image_size", 16)
    net = NCSNpp(3, size, **kwargs)
    x = torch.randn(2, 3, size, size)
    assert net(x, torch.tensor([0.1, 5.0])).shape == x.shape


@pytest.mark.parametrize("family", list(FAMILIES))
def test_noise_label_conditions_the_output(family: str) -> None:
    """The output depends on the noise label (init_scale=1 so the residual branches are not ~0 at init)."""
    torch.manual_seed(0)
    net = FAMILIES[family](3, 16, init_scale=1.0).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    labels = _labels(family, 2)
    out = net(x, labels)
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_trainable_parameter_gets_a_gradient(family: str) -> None:
    """A backward pass reaches every trainable parameter (no dead branches); the Fourier W stays frozen."""
    net = FAMILIES[family](3, 16)
    net(torch.randn(2, 3, 16, 16), _labels(family, 2)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(not p.requires_grad for n, p in net.named_parameters() if n.endswith(".W") and p.ndim == 1)


@pytest.mark.parametrize("family", ["ncsnpp", "ddpmpp_ddpm_blocks"])
def test_channels_last_and_bf16_autocast(family: str) -> None:
    """channels_last input gives the same output as contiguous; under CPU bf16 autocast it runs and stays close."""
    torch.manual_seed(0)
    net = FAMILIES[family](3, 16, init_scale=1.0).eval()
    x, labels = torch.randn(2, 3, 16, 16), _labels(family, 2)
    with torch.no_grad():
        ref = net(x, labels)
        cl = net(x.contiguous(memory_format=torch.channels_last), labels)
        net_cl = net.to(memory_format=torch.channels_last)
        cl2 = net_cl(x.contiguous(memory_format=torch.channels_last), labels)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = net(x, labels)
    assert torch.allclose(cl, ref, atol=1e-4, rtol=1e-4) and torch.allclose(cl2, ref, atol=1e-4, rtol=1e-4)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).norm() / ref.norm() < 0.1


def test_centered_false_maps_to_minus_one_one_and_the_fourier_label_is_embedded_as_given() -> None:
    """centered=False feeds 2x - 1 to the same network; the Fourier embedding takes c_noise itself (no log inside):
    its first layer's output is [sin(2 pi W c), cos(2 pi W c)] of the label given."""
    torch.manual_seed(0)
    base = NCSNpp(3, 16, **SMALL, init_scale=1.0).eval()
    shifted = NCSNpp(3, 16, **SMALL, init_scale=1.0, centered=False).eval()
    shifted.load_state_dict(base.state_dict())
    x, c_noise = torch.rand(2, 3, 16, 16), torch.tensor([0.5, 4.0]).log()
    with torch.no_grad():
        assert torch.allclose(shifted(x, c_noise), base(2 * x - 1, c_noise), atol=1e-5)
        W = base.all_modules[0].W.double()
        angles = 2 * math.pi * c_noise.double()[:, None] * W[None, :]
        expected = torch.cat([angles.sin(), angles.cos()], 1).float()
        # float32 angles of up to |2 pi W c| ~ 500 rad carry ~3e-5 of round-off
        torch.testing.assert_close(base.all_modules[0](c_noise), expected, rtol=0, atol=1e-4)


def test_networks_refuse_cond_they_cannot_take() -> None:
    """cond has its place in every network's signature; a network says in one line what it cannot take (a bare
    tensor, a key it does not know, augmentation labels without augment_dim) instead of ignoring it."""
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="cond must be a dict"):
        NCSNpp(3, 16, **SMALL)(x, torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cond keys"):
        NCSNpp(3, 16, **SMALL)(x, torch.ones(2), {"class": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="augment_dim"):
        ScoreMLP(num_channels=2)(torch.randn(2, 2), torch.ones(2), {"augment": torch.zeros(2, 9)})


def test_zero_init_scale_makes_a_ddpmpp_output_start_near_zero() -> None:
    """With init_scale=0 the output conv's weights are scaled by sqrt(1e-10), so a fresh network outputs ~0
    (while with init_scale=1 it does not)."""
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    assert DDPMpp(3, 16, **SMALL)(x, t).abs().max() < 1e-3
    assert DDPMpp(3, 16, **SMALL, init_scale=1.0)(x, t).abs().max() > 1e-1


def test_wrong_input_shape_raises_value_error_naming_both_shapes() -> None:
    """Wrong channels, wrong spatial size or a mis-shaped label give a ValueError with expected and received shapes."""
    net = NCSNpp(3, 16, **SMALL)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\).*\(2, 1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\).*\(2, 3, 32, 32\)"):
        net(torch.randn(2, 3, 32, 32), torch.ones(2))
    with pytest.raises(ValueError, match=r"c_noise.*\(2,\).*\(3,\)"):
        net(torch.randn(2, 3, 16, 16), torch.ones(3))


def test_invalid_configuration_raises_value_error() -> None:
    """image_size not divisible by 2**(len(ch_mult)-1), a never-occurring attention resolution, or an
    unknown option name are rejected when the network is built."""
    with pytest.raises(ValueError, match="divisible"):
        NCSNpp(3, 10, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match=r"attn_resolutions.*\[7\].*\[16, 8\]"):
        NCSNpp(3, 16, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(7,))
    with pytest.raises(ValueError, match="progressive"):
        NCSNpp(3, 16, **SMALL, progressive="bogus")


def test_defaults_follow_the_official_cifar10_configs() -> None:
    """NCSNpp defaults = official NCSN++ cont. (VE) CIFAR-10 architecture; DDPMpp = DDPM++ cont. (VP)."""
    with torch.device("meta"):
        ve, vp = NCSNpp(), DDPMpp()
    assert (ve.resblock_type, ve.progressive, ve.progressive_input, ve.embedding_type) == (
        "biggan", "none", "residual", "fourier")
    assert (vp.resblock_type, vp.progressive, vp.progressive_input, vp.embedding_type) == (
        "biggan", "none", "none", "positional")
    assert vp.centered


# Figures obtained by instantiating the official yang-song/score_sde_pytorch NCSNpp with the official
# configs (configs/ve/cifar10_ncsnpp_continuous.py, ..._deep_..., configs/vp/cifar10_ddpmpp_continuous.py,
# ..._deep_..., configs/ve/{ffhq_256,celebahq_256,church,bedroom}_ncsnpp_continuous.py); counts include
# the frozen Fourier-feature W (128 values) as `sum(p.numel() for p in model.parameters())` does.
OFFICIAL_COUNTS = {
    "ncsnpp_cont_ve": (dict(), 62_758_915),
    "ncsnpp_deep_cont_ve": (dict(num_res_blocks=8), 107_587_075),
    "ddpmpp_cont_vp": (dict(fir=False, progressive_input="none", embedding_type="positional"), 61_804_419),
    "ddpmpp_deep_cont_vp": (dict(num_res_blocks=8, fir=False, progressive_input="none",
                                 embedding_type="positional"), 106_632_579),
    "ncsnpp_256_ve": (dict(image_size=256, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, dropout=0.0,
                           progressive="output_skip", progressive_input="input_skip"), 65_574_549),
}


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_parameter_count_equals_the_official_model(name: str) -> None:
    """Full-size official configs have exactly the official parameter counts (built on the meta device)."""
    kwargs, expected = OFFICIAL_COUNTS[name]
    with torch.device("meta"):
        net = NCSNpp(**kwargs)
    count = sum(p.numel() for p in net.parameters())
    print(f"{name}: {count:,} parameters")
    assert count == expected


def test_state_dict_uses_the_official_flat_key_layout() -> None:
    """Keys follow the official flat all_modules layout and names (the conversion of official checkpoints, with
    their 'module.' prefix and 'sigmas' buffer, is tests/test_convert.py's)."""
    net = NCSNpp(3, 16, **SMALL)
    keys = set(net.state_dict())
    for key in ["all_modules.0.W", "all_modules.1.weight", "all_modules.2.bias", "all_modules.3.weight",
                "all_modules.4.GroupNorm_0.weight", "all_modules.4.Conv_0.weight", "all_modules.4.Dense_0.weight",
                "all_modules.4.GroupNorm_1.bias", "all_modules.4.Conv_1.weight",  # level-0 res block
                "all_modules.5.Conv_2.weight",  # BigGAN down block (1x1 shortcut)
                "all_modules.6.Conv2d_0.weight", "all_modules.6.Conv2d_0.bias",  # FIR input-pyramid downsample
                "all_modules.7.Conv_2.weight",  # level-1 res block 16 -> 32 channels
                "all_modules.8.GroupNorm_0.weight", "all_modules.8.NIN_0.W", "all_modules.8.NIN_3.b"]:  # attention
        assert key in keys, key
    assert all(k.startswith("all_modules.") for k in keys)


# --------------------------------------------------------------------------- ScoreMLP
@pytest.mark.parametrize("embedding_type", ["fourier", "positional"])
def test_score_mlp_shape_and_conditioning(embedding_type: str) -> None:
    """ScoreMLP maps (B, D) to (B, D), and its output depends on the noise label."""
    torch.manual_seed(0)
    net = ScoreMLP(num_channels=2, hidden=32, depth=2, embedding_type=embedding_type)
    x = torch.randn(1, 2).expand(2, -1)
    labels = torch.tensor([0.1, 10.0]) if embedding_type == "fourier" else torch.tensor([5.0, 900.0])
    out = net(x, labels)
    assert out.shape == (2, 2)
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert ScoreMLP(num_channels=5)(torch.randn(3, 5), torch.ones(3)).shape == (3, 5)


def test_score_mlp_wrong_shape_raises_value_error() -> None:
    """A wrong data dimension gives a ValueError naming the expected and received shapes."""
    with pytest.raises(ValueError, match=r"\(B, 2\).*\(4, 3\)"):
        ScoreMLP()(torch.randn(4, 3), torch.ones(4))
