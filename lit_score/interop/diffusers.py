"""diffusers interop: lit-score networks to and from diffusers' ``UNet2DModel`` with its scheduler.

    lit-score export-diffusers CKPT_OR_EXPORT_DIR OUT_DIR     # a diffusers pipeline folder (unet/, scheduler/)
    lit-score import-diffusers DIFFUSERS_DIR OUT_DIR          # a lit-score export folder (see lit_score.interop.export)

NCSN++ (VE) maps to UNet2DModel's score-SDE blocks (``SkipDownBlock2D``, ``AttnSkipDownBlock2D``,
``SkipUpBlock2D``, ``AttnSkipUpBlock2D``: BigGAN ResNets with FIR resampling, the ``input_skip`` / ``output_skip``
image pyramids, Fourier features of log sigma, the output divided by sigma) with ``ScoreSdeVeScheduler``: the
UNet2DModel of sigma is the score, which is the lit-score network under ``ScorePrediction(scale_by_sigma=True,
log_label=True)`` (it gets log sigma from the preconditioning and does not divide; the preconditioning does).
A DDPM-type network under the VP SDE (``resblock_type='ddpm'``, ``skip_rescale=False``, attention only in the
middle) maps to its plain ``DownBlock2D`` / ``UpBlock2D`` with ``DDPMScheduler``: its UNet2DModel predicts the
noise from the timestep as it is, which is the lit-score network under ``NoisePrediction(log_label=False)``. The
official DDPM++ (BigGAN ResNets, skip_rescale) has no UNet2DModel form. Several settings are fixed in diffusers' code (3 image channels in
the skip blocks, 32 attention groups, one norm-group count, ...): :func:`diffusers_problems` names every option
of a network that does not fit, and why.

Weights map one to one (NIN weights transposed into Linear / 1x1 Conv2d ones); every key and shape is checked.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from lit_score.interop.export import lit_score_version, model_card, write_file
from lit_score.runtime.pretrained import (CARD_NAME, CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, Pretrained,
                                         PretrainedError, load_pretrained)
from lit_score.diffusion.denoiser import NoisePrediction, Preconditioning, ScorePrediction

NCSNPP, DDPMPP = "lit_score.networks.NCSNpp", "lit_score.networks.DDPMpp"
VESDE, VPSDE = "lit_score.diffusion.sdes.VESDE", "lit_score.diffusion.sdes.VPSDE"
# the preconditionings under which the lit-score network computes what UNet2DModel does (config.json's "precond")
SCORE_PREDICTION = {"class_path": "lit_score.diffusion.denoiser.ScorePrediction",
                    "init_args": {"scale_by_sigma": True, "log_label": True}}
NOISE_PREDICTION = {"class_path": "lit_score.diffusion.denoiser.NoisePrediction", "init_args": {"log_label": False}}
LABEL_STEPS = 1000  # NoisePrediction's label is 999 t: DDPMScheduler's timesteps for N = 1000
FIR_KERNEL = (1, 3, 3, 1)  # diffusers' ResnetBlock2D(kernel="fir") and Fir{Up,Down}sample2D hard-code it
RESNET = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj", "GroupNorm_1": "norm2",
          "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
ATTENTION = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v", "NIN_3": "to_out.0"}


def _groups(channels: int) -> int:
    return min(channels // 4, 32)


def is_plain(args: dict[str, Any]) -> bool:
    """DDPM-style U-Net (no image pyramids): UNet2DModel's plain DownBlock2D / UpBlock2D; else its skip blocks."""
    return args["progressive"] == "none" and args["progressive_input"] == "none"


def diffusers_problems(args: dict[str, Any]) -> list[str]:
    """Why UNet2DModel cannot express the NCSNpp / DDPMpp of ``args`` (its full init_args); empty when it can.
    What the network's output means is the model's preconditioning: see :func:`precond_problems`."""
    problems = _plain_problems(args) if is_plain(args) else _skip_problems(args)
    if args.get("augment_dim"):
        problems.append(f"augment_dim={args['augment_dim']}: UNet2DModel has no input for augmentation labels "
                        "(EDM's map_augment)")
    if args.get("num_classes"):
        problems.append(f"num_classes={args['num_classes']}: UNet2DModel adds its class embedding after the noise "
                        "embedding's MLP, where EDM's map_label (ours) joins before it: no weights of UNet2DModel "
                        "compute the same network")
    return problems


def precond_problems(precond: Preconditioning, plain: bool) -> list[str]:
    """Why the network under ``precond`` does not compute what UNet2DModel does (``plain``: the DDPM-type form with
    DDPMScheduler, else the score-SDE form with ScoreSdeVeScheduler); empty when it does."""
    if plain:
        if type(precond) is NoisePrediction and not precond.log_label:
            return []
        return [f"the preconditioning {precond!r}: UNet2DModel with DDPMScheduler predicts the noise (epsilon) "
                "from the timestep 999 t as it is, which is NoisePrediction(log_label=False)"]
    if type(precond) is ScorePrediction and precond.scale_by_sigma and precond.log_label:
        return []
    return [f"the preconditioning {precond!r}: UNet2DModel's score-SDE form (ScoreSdeVeScheduler) computes the "
            "score, embedding log sigma with Fourier features and dividing its output by sigma, which is "
            "ScorePrediction(scale_by_sigma=True, log_label=True)"]


def _norm_groups(args: dict[str, Any]) -> set[int]:
    from lit_score.networks import NCSNpp

    with torch.device("meta"):
        net = NCSNpp(**args)
    return {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}


def _plain_problems(args: dict[str, Any]) -> list[str]:
    p: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            p.append(what)

    need(args["resblock_type"] == "ddpm",
         f"resblock_type={args['resblock_type']!r}: the resampling BigGAN ResNets have a 1x1 shortcut that the "
         "resampling ResNets of diffusers' ResnetDownsampleBlock2D / ResnetUpsampleBlock2D lack; UNet2DModel's "
         "DownBlock2D / UpBlock2D express resblock_type='ddpm' (resampling by convolutions)")
    need(not args["skip_rescale"], "skip_rescale=True: UNet2DModel's plain blocks add residuals without the "
                                   "1/sqrt(2) (it passes them no output scale factor)")
    need(args["resamp_with_conv"] and not args["fir"],
         f"the resampling (resamp_with_conv={args['resamp_with_conv']}, fir={args['fir']}): DownBlock2D / UpBlock2D "
         "resample with a convolution, without FIR")
    need(not args["attn_resolutions"],
         f"attention at {list(args['attn_resolutions'])}: diffusers' AttnUpBlock2D attends after every up ResNet, "
         "DDPM++ once per level (only the middle attention is expressible)")
    need(args["embedding_type"] == "positional" and args["conditional"],
         f"the noise conditioning (embedding_type={args['embedding_type']!r}, conditional={args['conditional']}): "
         "UNet2DModel's positional form embeds the timestep with sinusoidal positions")
    need(args["nonlinearity"] in ("swish", "silu"), f"nonlinearity={args['nonlinearity']!r}: UNet2DModel uses SiLU")
    need(list(args["ch_mult"])[0] == 1, f"ch_mult={list(args['ch_mult'])}: UNet2DModel ties the time embedding and "
                                        "the first convolution to the first level's channels, so ch_mult[0] must be 1")
    if not p:
        groups = sorted(_norm_groups(args))
        need(len(groups) == 1, f"the norm groups {groups}: UNet2DModel's plain blocks use one group count for every "
                               "norm, DDPM++ min(channels // 4, 32) (equal for 128 channels or more)")
    return p


def _skip_problems(args: dict[str, Any]) -> list[str]:
    p: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            p.append(what)

    ch_mult, nf = list(args["ch_mult"]), args["nf"]
    need(args["resblock_type"] == "biggan" and args["progressive"] == "output_skip"
         and args["progressive_input"] == "input_skip" and args["progressive_combine"] == "sum",
         f"the U-Net path (resblock_type={args['resblock_type']!r}, progressive={args['progressive']!r}, "
         f"progressive_input={args['progressive_input']!r}, progressive_combine={args['progressive_combine']!r}): "
         "UNet2DModel's score-SDE blocks are BigGAN ResNets with output_skip, input_skip and sum; its plain blocks "
         "(progressive and progressive_input 'none') need resblock_type='ddpm' and skip_rescale=False, so the "
         "official DDPM++ (BigGAN, skip_rescale) cannot be expressed")
    need(args["embedding_type"] == "fourier" and args["conditional"],
         f"the noise conditioning (embedding_type={args['embedding_type']!r}, conditional={args['conditional']}): "
         "UNet2DModel's score-SDE form embeds log sigma with Fourier features")
    need(args["fir"] and tuple(args["fir_kernel"]) == FIR_KERNEL,
         f"the resampling (fir={args['fir']}, fir_kernel={list(args['fir_kernel'])}): diffusers' skip blocks use FIR "
         f"resampling with the kernel {list(FIR_KERNEL)}, fixed in its code")
    need(args["skip_rescale"], "skip_rescale=False: the skip blocks divide every residual sum by sqrt(2)")
    need(args["nonlinearity"] in ("swish", "silu"),
         f"nonlinearity={args['nonlinearity']!r}: the time embedding of UNet2DModel uses SiLU (swish)")
    need(args["num_channels"] == 3,
         f"num_channels={args['num_channels']}: the skip blocks' pyramid convolutions have 3 image channels, fixed "
         "in diffusers' code")
    need(ch_mult[0] == 1, f"ch_mult={ch_mult}: UNet2DModel ties the Fourier features and the first convolution to "
                          "the first level's channels, so ch_mult[0] must be 1")
    outer, inner = _groups(nf), _groups(nf * ch_mult[-1])
    need(outer == inner, f"the norm groups: UNet2DModel uses one group count for the output norm ({outer} for "
                         f"nf={nf}) and the middle ResNets ({inner} for {nf * ch_mult[-1]} channels); they must be equal")
    resolutions = [args["image_size"] // 2**i for i in range(len(ch_mult))]
    small = [r for r, m in zip(resolutions, ch_mult) if r in args["attn_resolutions"] and nf * m < 128]
    need(not small, f"attention at resolution(s) {small} with fewer than 128 channels: diffusers' attention skip "
                    "blocks normalise with 32 groups, fixed in its code, NCSN++ with min(channels // 4, 32)")
    return p


def unet_config(args: dict[str, Any]) -> dict[str, Any]:
    """UNet2DModel arguments of the NCSNpp of ``args`` (checked with :func:`diffusers_problems`)."""
    problems = diffusers_problems(args)
    if problems:
        raise PretrainedError("diffusers' UNet2DModel cannot express this network: " + "; ".join(problems))
    ch_mult, nf = list(args["ch_mult"]), args["nf"]
    if is_plain(args):
        groups = _norm_groups(args).pop()
        return {
            "sample_size": args["image_size"], "in_channels": args["num_channels"],
            "out_channels": args["num_channels"], "center_input_sample": not args["centered"],
            "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
            "down_block_types": ["DownBlock2D"] * len(ch_mult), "up_block_types": ["UpBlock2D"] * len(ch_mult),
            "block_out_channels": [nf * m for m in ch_mult], "layers_per_block": args["num_res_blocks"],
            "mid_block_scale_factor": 1.0, "downsample_padding": 0, "dropout": args["dropout"], "act_fn": "silu",
            "attention_head_dim": None, "norm_num_groups": groups, "attn_norm_num_groups": groups, "norm_eps": 1e-6,
        }
    resolutions = [args["image_size"] // 2**i for i in range(len(ch_mult))]
    attn = [r in args["attn_resolutions"] for r in resolutions]
    return {
        "sample_size": args["image_size"], "in_channels": 3, "out_channels": 3,
        "center_input_sample": not args["centered"], "time_embedding_type": "fourier",
        "down_block_types": ["AttnSkipDownBlock2D" if a else "SkipDownBlock2D" for a in attn],
        "up_block_types": ["AttnSkipUpBlock2D" if a else "SkipUpBlock2D" for a in reversed(attn)],
        "block_out_channels": [nf * m for m in ch_mult], "layers_per_block": args["num_res_blocks"],
        "mid_block_scale_factor": math.sqrt(2.0), "dropout": args["dropout"], "act_fn": "silu",
        "attention_head_dim": None, "norm_num_groups": _groups(nf), "attn_norm_num_groups": _groups(nf * ch_mult[-1]),
        "norm_eps": 1e-6,
    }


SKIP_BLOCKS = ({"SkipDownBlock2D", "AttnSkipDownBlock2D"}, {"SkipUpBlock2D", "AttnSkipUpBlock2D"})
PLAIN_BLOCKS = ({"DownBlock2D"}, {"UpBlock2D"})


def lit_args(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(class_path, init_args) of the NCSN++ (skip blocks) or DDPM++ (plain blocks) that a UNet2DModel config
    (diffusers' defaults filled in) describes; raises naming each setting without a lit-score form."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    channels = list(config["block_out_channels"])
    skip = set(down) <= SKIP_BLOCKS[0] and set(up) <= SKIP_BLOCKS[1]
    plain = set(down) <= PLAIN_BLOCKS[0] and set(up) <= PLAIN_BLOCKS[1]
    problems = []
    if not (skip or plain) or len(up) != len(down):
        problems.append(f"blocks {down} / {up}: NCSN++ is the score-SDE skip blocks (Skip / AttnSkip Down / Up "
                        "Block2D), DDPM++ without attention but the middle one DownBlock2D / UpBlock2D")
    elif skip and [b.startswith("Attn") for b in down] != [b.startswith("Attn") for b in reversed(up)]:
        problems.append(f"attention in the down blocks {down} but not at the same levels of the up blocks {up}")
    if not channels or any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels}: lit-score needs multiples of the first")
    if config.get("in_channels") != config.get("out_channels"):
        problems.append(f"in_channels={config.get('in_channels')}, out_channels={config.get('out_channels')}: a "
                        "score network's output has the input's shape")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        problems.append("class conditioning: the lit-score networks are unconditional")
    if config.get("resnet_time_scale_shift") != "default" or config.get("mid_block_type") != "UNetMidBlock2D" or \
            not config.get("add_attention"):
        problems.append(f"resnet_time_scale_shift={config.get('resnet_time_scale_shift')!r}, mid_block_type="
                        f"{config.get('mid_block_type')!r}, add_attention={config.get('add_attention')}: lit-score "
                        "adds the time embedding and has ResNet, attention, ResNet in the middle")
    sample_size = config.get("sample_size")
    image_size = sample_size[0] if isinstance(sample_size, (list, tuple)) and len(set(sample_size)) == 1 else sample_size
    if not isinstance(image_size, int):
        problems.append(f"sample_size={sample_size!r}: lit-score needs the (square) image size")
    if problems:
        raise PretrainedError("this UNet2DModel has no lit-score form: " + "; ".join(problems))
    nf = channels[0]
    class_path = NCSNPP if skip else DDPMPP
    args = {**_defaults(class_path), "num_channels": config["in_channels"], "image_size": image_size, "nf": nf,
            "ch_mult": [c // nf for c in channels], "num_res_blocks": config["layers_per_block"],
            "dropout": float(config.get("dropout", 0.0)), "centered": not config.get("center_input_sample")}
    if skip:
        args["attn_resolutions"] = [image_size // 2**i for i, b in enumerate(down) if b.startswith("Attn")]
        args.update(fir=True, fir_kernel=list(FIR_KERNEL), skip_rescale=True, resblock_type="biggan",
                    progressive="output_skip", progressive_input="input_skip", progressive_combine="sum",
                    embedding_type="fourier")
    else:
        args.update(attn_resolutions=[], fir=False, skip_rescale=False, resblock_type="ddpm", resamp_with_conv=True,
                    embedding_type="positional")
    try:
        expected = unet_config(args)
    except PretrainedError as err:
        raise PretrainedError(f"this UNet2DModel has no lit-score form: {err}")
    mismatched = [f"{key}={config.get(key)!r} where lit-score has {want!r}" for key, want in expected.items()
                  if not _same(key, config, want, channels, down)]
    if mismatched:
        raise PretrainedError("this UNet2DModel has no lit-score form: " + "; ".join(mismatched))
    return class_path, args


def _same(key: str, config: dict[str, Any], want: Any, channels: list[int], down: list[str]) -> bool:
    have = config.get(key)
    if key == "dropout":
        return True
    if key == "attention_head_dim":  # one head: None, or the channels of every attention
        attended = [c for c, b in zip(channels, down) if b.startswith("Attn")] + [channels[-1]]
        return have is None or all(c == have for c in attended)
    if key == "attn_norm_num_groups" and have is None:
        return config.get("norm_num_groups") == want
    if isinstance(want, float):
        return isinstance(have, (int, float)) and abs(have - want) <= 1e-6 * max(abs(want), 1)
    if isinstance(want, list):
        return isinstance(have, (list, tuple)) and list(have) == want
    return have == want


# -- the layout: our all_modules, in order, and their UNet2DModel names ---------------------------------------------
def layout(args: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, UNet2DModel prefix) of every entry of NCSNpp.all_modules, in order (NCSNpp.__init__'s order)."""
    levels, blocks = len(args["ch_mult"]), args["num_res_blocks"]
    if is_plain(args):
        yield from _plain_layout(levels, blocks)
        return
    resolutions = [args["image_size"] // 2**i for i in range(levels)]
    attn = [r in args["attn_resolutions"] for r in resolutions]
    yield from [("fourier", "time_proj"), ("linear", "time_embedding.linear_1"),
                ("linear", "time_embedding.linear_2"), ("conv", "conv_in")]
    for level in range(levels):
        for j in range(blocks):
            yield "resnet", f"down_blocks.{level}.resnets.{j}"
            if attn[level]:
                yield "attention", f"down_blocks.{level}.attentions.{j}"
        if level != levels - 1:
            yield "resnet", f"down_blocks.{level}.resnet_down"
            yield "conv", f"down_blocks.{level}.skip_conv"  # Combine.Conv_0
    yield from [("resnet", "mid_block.resnets.0"), ("attention", "mid_block.attentions.0"),
                ("resnet", "mid_block.resnets.1")]
    for i, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            yield "resnet", f"up_blocks.{i}.resnets.{j}"
        if attn[level]:
            yield "attention", f"up_blocks.{i}.attentions.0"
        if level != 0:
            yield from [("norm", f"up_blocks.{i}.skip_norm"), ("conv", f"up_blocks.{i}.skip_conv"),
                        ("resnet", f"up_blocks.{i}.resnet_up")]
        else:
            yield from [("norm", "conv_norm_out"), ("conv", "conv_out")]


def _plain_layout(levels: int, blocks: int) -> Iterator[tuple[str, str]]:
    yield from [("linear", "time_embedding.linear_1"), ("linear", "time_embedding.linear_2"), ("conv", "conv_in")]
    for level in range(levels):
        for j in range(blocks):
            yield "resnet", f"down_blocks.{level}.resnets.{j}"
        if level != levels - 1:
            yield "conv", f"down_blocks.{level}.downsamplers.0.conv"  # Downsample.Conv_0
    yield from [("resnet", "mid_block.resnets.0"), ("attention", "mid_block.attentions.0"),
                ("resnet", "mid_block.resnets.1")]
    for i, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            yield "resnet", f"up_blocks.{i}.resnets.{j}"
        if level != 0:
            yield "conv", f"up_blocks.{i}.upsamplers.0.conv"  # Upsample.Conv_0
    yield from [("norm", "conv_norm_out"), ("conv", "conv_out")]


def _names(kind: str, ours: str) -> tuple[str, str | None]:
    """UNet2DModel name (below the module's prefix) of our parameter ``ours`` of a ``kind`` module, and how the
    tensor changes: None, ``linear`` (NIN's (in, out) W to Linear's (out, in)) or ``conv`` (to a 1x1 Conv2d's)."""
    if kind == "fourier":
        return {"W": "weight"}[ours], None
    if kind in ("linear", "conv", "norm"):
        return ours.removeprefix("Conv_0."), None
    layer, param = ours.split(".", 1)
    if kind == "resnet" and layer == "NIN_0":  # the DDPM ResNet's 1x1 shortcut
        return f"conv_shortcut.{ {'W': 'weight', 'b': 'bias'}[param] }", "conv" if param == "W" else None
    table = RESNET if kind == "resnet" else ATTENTION
    if kind == "attention" and layer.startswith("NIN"):
        return f"{table[layer]}.{ {'W': 'weight', 'b': 'bias'}[param] }", "linear" if param == "W" else None
    return f"{table[layer]}.{param}", None


def _to_theirs(v: Tensor, how: str | None) -> Tensor:
    if how == "linear":
        return v.t()
    return v.t()[:, :, None, None] if how == "conv" else v


def _to_ours(v: Tensor, how: str | None) -> Tensor:
    if how == "linear":
        return v.t()
    return v[:, :, 0, 0].t() if how == "conv" else v


def key_map(net: nn.Module, args: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Our state_dict key -> (UNet2DModel key, how the tensor changes)."""
    entries = list(layout(args))
    if len(entries) != len(net.all_modules):
        raise PretrainedError(f"internal error: {len(entries)} layout entries for {len(net.all_modules)} modules")
    mapping = {}
    for index, ((kind, prefix), module) in enumerate(zip(entries, net.all_modules)):
        for name in module.state_dict():
            theirs, how = _names(kind, name)
            mapping[f"all_modules.{index}.{name}"] = (f"{prefix}.{theirs}", how)
    return mapping


def _check_keys(ours: dict[str, Tensor], theirs: dict[str, Tensor], mapping: dict[str, tuple[str, str | None]],
                source: str) -> None:
    wanted = {k for k, _ in mapping.values()}
    missing, unexpected = sorted(wanted - set(theirs)), sorted(set(theirs) - wanted)
    if missing or unexpected:
        raise PretrainedError(f"{source}: {len(missing)} UNet2DModel weight(s) missing {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}; the folder's config.json does not "
                              "describe its weights")
    for key, (theirs_key, how) in mapping.items():
        shape, want = tuple(theirs[theirs_key].shape), tuple(_to_theirs(ours[key], how).shape)
        if shape != want:
            raise PretrainedError(f"{source}: {theirs_key} has shape {shape} where the lit-score network needs {want}")


def to_diffusers_state(net: nn.Module, args: dict[str, Any]) -> dict[str, Tensor]:
    mapping = key_map(net, args)
    return {mapping[k][0]: _to_theirs(v, mapping[k][1]).contiguous() for k, v in net.state_dict().items()}


def from_diffusers_state(net: nn.Module, args: dict[str, Any], state: dict[str, Tensor],
                         source: str) -> dict[str, Tensor]:
    mapping = key_map(net, args)
    _check_keys(net.state_dict(), state, mapping, source)
    return {k: _to_ours(state[t], how).contiguous() for k, (t, how) in mapping.items()}


# -- folders ---------------------------------------------------------------------------------------------------------
def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise PretrainedError("diffusers is not installed: pip install diffusers (or lit-score's dev extras)")
    return diffusers


def _net_and_sde(pretrained: Pretrained) -> tuple[dict[str, Any], dict[str, Any]]:
    """The network's and the SDE's init_args (defaults filled in) of an export; raises naming everything diffusers
    cannot express, the preconditioning (what the network's output means) included."""
    net, sde = pretrained.config["net"], pretrained.config["sde"]
    precond = pretrained.precond or pretrained.loss.default_precond(pretrained.sde)  # None: the loss's default
    sde_args = {**_init_defaults(type(pretrained.sde)), **(sde.get("init_args") or {})}
    if net["class_path"].rsplit(".", 1)[-1] not in ("NCSNpp", "DDPMpp"):
        raise PretrainedError(f"the network is {net['class_path']}: only NCSN++ / DDPM++ ({NCSNPP}, {DDPMPP}) have "
                              "a diffusers UNet2DModel form")
    args = {**_defaults(net["class_path"]), **(net.get("init_args") or {})}
    problems = diffusers_problems(args)
    sde_name = sde["class_path"].rsplit(".", 1)[-1]
    if is_plain(args) and sde_name != "VPSDE":
        problems.append(f"the SDE is {sde['class_path']}: a DDPM-type UNet2DModel goes with diffusers' DDPMScheduler, "
                        "whose linear betas are the VP SDE's (sub-VP and VE have no DDPM scheduler)")
    elif not is_plain(args) and sde_name != "VESDE":
        problems.append(f"the SDE is {sde['class_path']}: diffusers' score-SDE scheduler (ScoreSdeVeScheduler) is "
                        "for the VE SDE only")
    else:
        problems += precond_problems(precond, is_plain(args))
        if is_plain(args) and int(sde_args["N"]) != LABEL_STEPS:
            problems.append(f"N={sde_args['N']}: DDPMScheduler's timestep of t is (N - 1) t, NoisePrediction's "
                            f"label {LABEL_STEPS - 1} t (score_sde's); they agree for N={LABEL_STEPS} only")
    if problems:
        raise PretrainedError("diffusers' UNet2DModel cannot express this network: " + "; ".join(problems))
    return args, sde_args


def export_diffusers(source: str | Path, out_dir: str | Path) -> Path:
    """A diffusers pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``) of a lit-score .ckpt or export
    folder: NCSN++ + VE SDE under ScorePrediction(scale_by_sigma=True, log_label=True) as ScoreSdeVePipeline
    (ScoreSdeVeScheduler), DDPM-type + VP SDE under NoisePrediction(log_label=False) as DDPMPipeline (DDPMScheduler
    with the SDE's linear betas, epsilon prediction); returns ``out_dir``."""
    import tempfile

    from lit_score.interop.export import export_checkpoint

    source, out_dir = Path(source), Path(out_dir)
    if source.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(source, Path(tmp) / "export")
            pretrained = load_pretrained(Path(tmp) / "export")
    else:
        pretrained = load_pretrained(source)
    args, sde = _net_and_sde(pretrained)
    diffusers = _diffusers()
    unet = diffusers.UNet2DModel(**unet_config(args))
    _check_keys(pretrained.net.state_dict(), unet.state_dict(), key_map(pretrained.net, args), "UNet2DModel")
    unet.load_state_dict(to_diffusers_state(pretrained.net, args), strict=True)
    n = int(sde["N"])
    if is_plain(args):  # VP SDE: beta_i = beta_min / N + i / (N - 1) (beta_max - beta_min) / N (Song et al. 2021)
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=n, beta_start=float(sde["beta_min"]) / n,
                                            beta_end=float(sde["beta_max"]) / n, beta_schedule="linear",
                                            prediction_type="epsilon")
        pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    else:
        scheduler = diffusers.ScoreSdeVeScheduler(num_train_timesteps=n, sigma_min=float(sde["sigma_min"]),
                                                  sigma_max=float(sde["sigma_max"]))
        pipeline = diffusers.ScoreSdeVePipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(str(out_dir))
    return out_dir


def unet_defaults() -> dict[str, Any]:
    """UNet2DModel's default arguments."""
    import inspect

    return {k: v.default for k, v in inspect.signature(_diffusers().UNet2DModel.__init__).parameters.items()
            if k != "self" and v.default is not inspect.Parameter.empty}


def _init_defaults(cls: type) -> dict[str, Any]:
    """The default arguments of ``cls`` (tuples as lists, as a config holds them)."""
    import inspect

    return {k: (list(v.default) if isinstance(v.default, tuple) else v.default)
            for k, v in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and v.default is not inspect.Parameter.empty}


def _defaults(class_path: str = NCSNPP) -> dict[str, Any]:
    """The init_args defaults of NCSNpp (or DDPMpp)."""
    from lit_score.networks import DDPMpp, NCSNpp

    return _init_defaults(DDPMpp if class_path.endswith("DDPMpp") else NCSNpp)


def _unet_folder(folder: Path) -> tuple[Path, Path | None]:
    if (folder / "unet" / CONFIG_NAME).is_file():
        scheduler = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", scheduler if scheduler.is_file() else None
    if (folder / CONFIG_NAME).is_file():
        return folder, None
    raise PretrainedError(f"{folder} has neither unet/config.json nor config.json: give a diffusers pipeline or "
                          "UNet2DModel folder (save_pretrained)")


def _sde(scheduler: dict[str, Any], plain: bool, given: dict[str, Any], where: str) -> dict[str, Any]:
    """The lit-score SDE (class_path, init_args) of a scheduler config, or of the values ``given``."""
    name = scheduler.get("_class_name")
    if plain:
        if name not in (None, "DDPMScheduler") or scheduler.get("beta_schedule", "linear") != "linear" or \
                scheduler.get("prediction_type", "epsilon") != "epsilon":
            raise PretrainedError(f"{where}: a DDPM-type network needs DDPMScheduler with linear betas and epsilon "
                                  f"prediction (the VP SDE), not {name} {scheduler.get('beta_schedule')} "
                                  f"{scheduler.get('prediction_type')}")
        n = given.get("N") or scheduler.get("num_train_timesteps")
        values = {"beta_min": given.get("beta_min") or (scheduler.get("beta_start") and scheduler["beta_start"] * n),
                  "beta_max": given.get("beta_max") or (scheduler.get("beta_end") and scheduler["beta_end"] * n),
                  "N": n}
        class_path = VPSDE
    else:
        if name not in (None, "ScoreSdeVeScheduler"):
            raise PretrainedError(f"{where}: a score-SDE network needs ScoreSdeVeScheduler (the VE SDE), not {name}")
        values = {k: given.get(k) or scheduler.get(k) for k in ("sigma_min", "sigma_max")}
        values["N"] = given.get("N") or scheduler.get("num_train_timesteps")
        class_path = VESDE
    if any(v is None for v in values.values()):
        raise PretrainedError(f"{where} has no scheduler/scheduler_config.json: give the SDE with "
                              f"{', '.join('--' + k for k in values)}")
    if plain and int(values["N"]) != LABEL_STEPS:
        raise PretrainedError(f"{where}: N={values['N']} timesteps: DDPMScheduler's timestep of t is (N - 1) t, "
                              f"lit-score's NoisePrediction label {LABEL_STEPS - 1} t (score_sde's); they agree for "
                              f"N={LABEL_STEPS} only")
    return {"class_path": class_path, "init_args": {k: (int(v) if k == "N" else float(v)) for k, v in values.items()}}


def import_diffusers(folder: str | Path, out_dir: str | Path, **sde: float | int | None) -> Path:
    """A lit-score export folder of a diffusers pipeline or UNet2DModel folder: score-SDE skip blocks as NCSNpp +
    VESDE (from ScoreSdeVeScheduler) under ScorePrediction(scale_by_sigma=True, log_label=True), DownBlock2D /
    UpBlock2D as DDPMpp + VPSDE (from DDPMScheduler) under NoisePrediction(log_label=False); ``sde``
    (sigma_min, sigma_max / beta_min, beta_max, N) stands in for a missing scheduler."""
    from safetensors.torch import load_file, save

    from lit_score.networks import NCSNpp

    folder, out_dir = Path(folder), Path(out_dir)
    unet_dir, scheduler_path = _unet_folder(folder)
    config = json.loads((unet_dir / CONFIG_NAME).read_text())
    if config.get("_class_name") != "UNet2DModel":
        what = ("a lit-score export: load it with ScoreModel.from_pretrained or --ckpt_path" if
                config.get("format") == FORMAT else f"a {config.get('_class_name')!r}")
        raise PretrainedError(f"{unet_dir / CONFIG_NAME} is {what}, not a diffusers UNet2DModel")
    config = {**unet_defaults(), **config}  # what diffusers builds for the keys the file leaves out
    class_path, args = lit_args(config)
    scheduler = json.loads(scheduler_path.read_text()) if scheduler_path else {}
    sde_config = _sde(scheduler, is_plain(args), {k: v for k, v in sde.items() if v is not None},
                      str(scheduler_path or folder))
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
    elif (unet_dir / "diffusion_pytorch_model.bin").is_file():
        weights = unet_dir / "diffusion_pytorch_model.bin"
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        raise PretrainedError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin)")
    net = NCSNpp(**args)
    ours = from_diffusers_state(net, args, state, str(weights))
    net.load_state_dict(ours, strict=True)
    pretrained = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lit_score_version": lit_score_version(),
        "net": {"class_path": class_path, "init_args": args}, "sde": sde_config,
        "loss": {"class_path": "lit_score.diffusion.losses.DSMLoss", "init_args": {}},
        "precond": NOISE_PREDICTION if is_plain(args) else SCORE_PREDICTION,
        "data": {k: args[k] for k in ("num_channels", "image_size", "centered")},
        "weights": "diffusers", "ema": None, "global_step": 0, "epoch": 0,
        "experiment": {"name": None, "imported_from": folder.name},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file(out_dir / WEIGHTS_NAME, save(ours, metadata={"format": "pt", "weights": "diffusers"}))
    write_file(out_dir / CONFIG_NAME, (json.dumps(pretrained, indent=2) + "\n").encode())
    write_file(out_dir / CARD_NAME, model_card(pretrained, out_dir.name).encode())
    return out_dir


# -- command line ---------------------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    """``lit-score export-diffusers SOURCE OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="lit-score export-diffusers", description=export_diffusers.__doc__)
    parser.add_argument("source", help="a lit-score .ckpt or `lit-score export` folder")
    parser.add_argument("out_dir")
    args = parser.parse_args(list(argv))
    try:
        export_diffusers(args.source, args.out_dir)
    except PretrainedError as err:
        print(f"lit-score export-diffusers: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a diffusers pipeline (UNet2DModel + its scheduler) to {args.out_dir}")
    return 0


def import_main(argv: Sequence[str]) -> int:
    """``lit-score import-diffusers DIR OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="lit-score import-diffusers", description=import_diffusers.__doc__)
    parser.add_argument("folder", help="a diffusers score-SDE pipeline folder (unet/, scheduler/) or UNet2DModel folder")
    parser.add_argument("out_dir", help="the lit-score export folder to write")
    for name in ("sigma_min", "sigma_max", "beta_min", "beta_max"):
        parser.add_argument(f"--{name}", type=float, help="the SDE, where the folder has no scheduler/")
    parser.add_argument("--N", type=int)
    args = parser.parse_args(list(argv))
    try:
        import_diffusers(args.folder, args.out_dir, **{k: getattr(args, k) for k in
                                                       ("sigma_min", "sigma_max", "beta_min", "beta_max", "N")})
    except PretrainedError as err:
        print(f"lit-score import-diffusers: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a lit-score export to {args.out_dir}")
    return 0
