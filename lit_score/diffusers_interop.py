"""diffusers interop: NCSN++ (VE) networks to and from diffusers' ``UNet2DModel`` with ``ScoreSdeVeScheduler``.

    lit-score export-diffusers CKPT_OR_EXPORT_DIR OUT_DIR     # a ScoreSdeVePipeline folder (unet/, scheduler/)
    lit-score import-diffusers DIFFUSERS_DIR OUT_DIR          # a lit-score export folder (see lit_score.export)

UNet2DModel expresses NCSN++ through its score-SDE blocks (``SkipDownBlock2D``, ``AttnSkipDownBlock2D``,
``SkipUpBlock2D``, ``AttnSkipUpBlock2D``): BigGAN ResNets with FIR resampling, the ``input_skip`` / ``output_skip``
image pyramids, Gaussian Fourier features of log sigma and the output divided by sigma. Several of their settings are
fixed in diffusers' code (3 image channels, 32 attention groups, one norm-group count for the whole model, ...);
:func:`diffusers_problems` names every option of a network that does not fit, and why. DDPM++ cannot be expressed:
its plain blocks (``ResnetDownsampleBlock2D``, ``AttnUpBlock2D``, ...) lack the 1x1 shortcut of the resampling
ResNets, the 1/sqrt(2) of ``skip_rescale`` and attention once per up level.

Weights map one to one (the attention's NIN weights transposed into Linear ones); every key and shape is checked.
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

from lit_score.export import (CARD_NAME, CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, PretrainedError,
                              load_pretrained, lit_score_version, model_card)

NCSNPP = "lit_score.networks.NCSNpp"
VESDE = "lit_score.sdes.VESDE"
FIR_KERNEL = (1, 3, 3, 1)  # diffusers' ResnetBlock2D(kernel="fir") and Fir{Up,Down}sample2D hard-code it
RESNET = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj", "GroupNorm_1": "norm2",
          "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
ATTENTION = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v", "NIN_3": "to_out.0"}


def _groups(channels: int) -> int:
    return min(channels // 4, 32)


def diffusers_problems(args: dict[str, Any]) -> list[str]:
    """Why UNet2DModel cannot express the NCSNpp of ``args`` (its full init_args); empty when it can."""
    p: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            p.append(what)

    ch_mult, nf = list(args["ch_mult"]), args["nf"]
    need(args["resblock_type"] == "biggan" and args["progressive"] == "output_skip"
         and args["progressive_input"] == "input_skip" and args["progressive_combine"] == "sum",
         f"the U-Net path (resblock_type={args['resblock_type']!r}, progressive={args['progressive']!r}, "
         f"progressive_input={args['progressive_input']!r}, progressive_combine={args['progressive_combine']!r}): "
         "UNet2DModel's score-SDE blocks are BigGAN ResNets with output_skip, input_skip and sum; its other blocks "
         "lack the resampling ResNets' 1x1 shortcut, skip_rescale's 1/sqrt(2) and attention once per up level "
         "(so DDPM++ cannot be expressed)")
    need(args["embedding_type"] == "fourier" and args["scale_by_sigma"] and args["conditional"],
         f"the noise conditioning (embedding_type={args['embedding_type']!r}, scale_by_sigma={args['scale_by_sigma']}, "
         f"conditional={args['conditional']}): UNet2DModel's score-SDE form embeds log sigma with Fourier features "
         "and always divides its output by sigma")
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


def ncsnpp_args(config: dict[str, Any]) -> dict[str, Any]:
    """NCSNpp init_args of a UNet2DModel config (its score-SDE form); raises naming what has no NCSN++ form."""
    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default)

    down, up = list(get("down_block_types", [])), list(get("up_block_types", []))
    channels = list(get("block_out_channels", []))
    problems = []
    if not down or any(b not in ("SkipDownBlock2D", "AttnSkipDownBlock2D") for b in down) or \
            any(b not in ("SkipUpBlock2D", "AttnSkipUpBlock2D") for b in up) or len(up) != len(down):
        problems.append(f"blocks {down} / {up}: only the score-SDE skip blocks (Skip/AttnSkip Down/Up Block2D) "
                        "are NCSN++")
    elif [b.startswith("Attn") for b in down] != [b.startswith("Attn") for b in reversed(up)]:
        problems.append(f"attention in the down blocks {down} but not at the same levels of the up blocks {up}")
    if get("time_embedding_type") != "fourier":
        problems.append(f"time_embedding_type={get('time_embedding_type')!r}: NCSN++ (VE) embeds sigma with Fourier "
                        "features")
    if channels and any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels}: NCSN++ needs multiples of the first")
    if get("in_channels") != 3 or get("out_channels") != 3:
        problems.append(f"in_channels={get('in_channels')}, out_channels={get('out_channels')}: the skip blocks need 3")
    if get("class_embed_type") is not None or get("num_class_embeds") is not None:
        problems.append("class conditioning: NCSN++ is unconditional")
    if get("act_fn", "silu") != "silu" or get("resnet_time_scale_shift", "default") != "default":
        problems.append(f"act_fn={get('act_fn')!r}, resnet_time_scale_shift={get('resnet_time_scale_shift')!r}: "
                        "NCSN++ uses SiLU and additive time embedding")
    if get("mid_block_type", "UNetMidBlock2D") != "UNetMidBlock2D" or not get("add_attention", True):
        problems.append("the middle block: NCSN++ has ResNet, attention, ResNet")
    if abs(float(get("mid_block_scale_factor", 1.0)) - math.sqrt(2.0)) > 1e-6:
        problems.append(f"mid_block_scale_factor={get('mid_block_scale_factor')}: NCSN++ (skip_rescale) uses sqrt(2)")
    sample_size = get("sample_size")
    image_size = sample_size[0] if isinstance(sample_size, (list, tuple)) and len(set(sample_size)) == 1 else sample_size
    if not isinstance(image_size, int):
        problems.append(f"sample_size={sample_size!r}: NCSN++ needs the (square) image size")
    if problems:
        raise PretrainedError("this UNet2DModel has no NCSN++ form: " + "; ".join(problems))
    nf = channels[0]
    args = {
        "num_channels": 3, "image_size": int(image_size), "nf": nf, "ch_mult": [c // nf for c in channels],
        "num_res_blocks": get("layers_per_block", 2),
        "attn_resolutions": [int(image_size) // 2**i for i, b in enumerate(down) if b.startswith("Attn")],
        "dropout": float(get("dropout", 0.0)), "resamp_with_conv": True, "conditional": True, "fir": True,
        "fir_kernel": list(FIR_KERNEL), "skip_rescale": True, "resblock_type": "biggan",
        "progressive": "output_skip", "progressive_input": "input_skip", "progressive_combine": "sum",
        "embedding_type": "fourier", "fourier_scale": 16.0, "init_scale": 0.0, "nonlinearity": "swish",
        "scale_by_sigma": True, "centered": not get("center_input_sample", False),
    }
    expected = unet_config(args)  # the round trip names anything else that differs (groups, eps, heads)
    for key in ("norm_num_groups", "norm_eps"):
        if key in config and config[key] != expected[key]:
            raise PretrainedError(f"this UNet2DModel has no NCSN++ form: {key}={config[key]} where NCSN++ has "
                                  f"{expected[key]}")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (None, expected["attn_norm_num_groups"]) or (
            attn_groups is None and config.get("norm_num_groups") != expected["attn_norm_num_groups"]):
        raise PretrainedError(f"this UNet2DModel has no NCSN++ form: the middle attention normalises with "
                              f"{attn_groups or config.get('norm_num_groups')} groups, NCSN++ with "
                              f"{expected['attn_norm_num_groups']}")
    head = config.get("attention_head_dim")
    attended = [c for c, b in zip(channels, down) if b.startswith("Attn")] + [channels[-1]]
    if head is not None and any(c != head for c in attended):
        raise PretrainedError(f"this UNet2DModel has no NCSN++ form: attention_head_dim={head} makes multi-head "
                              f"attention over {attended} channels; NCSN++ attends with one head")
    return args


# -- the layout: our all_modules, in order, and their UNet2DModel names ---------------------------------------------
def layout(args: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, UNet2DModel prefix) of every entry of NCSNpp.all_modules, in order (NCSNpp.__init__'s order)."""
    levels, blocks = len(args["ch_mult"]), args["num_res_blocks"]
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


def _names(kind: str, ours: str) -> tuple[str, bool]:
    """UNet2DModel name (below the module's prefix) of our parameter ``ours`` of a ``kind`` module; and whether
    the tensor is transposed (NIN's (in, out) W against Linear's (out, in) weight)."""
    if kind == "fourier":
        return {"W": "weight"}[ours], False
    if kind in ("linear", "conv", "norm"):
        return ours.removeprefix("Conv_0."), False
    layer, param = ours.split(".", 1)
    table = RESNET if kind == "resnet" else ATTENTION
    if kind == "attention" and layer.startswith("NIN"):
        return f"{table[layer]}.{ {'W': 'weight', 'b': 'bias'}[param] }", param == "W"
    return f"{table[layer]}.{param}", False


def key_map(net: nn.Module, args: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Our state_dict key -> (UNet2DModel key, transposed)."""
    entries = list(layout(args))
    if len(entries) != len(net.all_modules):
        raise PretrainedError(f"internal error: {len(entries)} layout entries for {len(net.all_modules)} modules")
    mapping = {}
    for index, ((kind, prefix), module) in enumerate(zip(entries, net.all_modules)):
        for name in module.state_dict():
            theirs, transposed = _names(kind, name)
            mapping[f"all_modules.{index}.{name}"] = (f"{prefix}.{theirs}", transposed)
    return mapping


def _check_keys(ours: dict[str, Tensor], theirs: dict[str, Tensor], mapping: dict[str, tuple[str, bool]],
                source: str) -> None:
    wanted = {k for k, _ in mapping.values()}
    missing, unexpected = sorted(wanted - set(theirs)), sorted(set(theirs) - wanted)
    if missing or unexpected:
        raise PretrainedError(f"{source}: {len(missing)} UNet2DModel weight(s) missing {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}; the folder's config.json does not "
                              "describe its weights")
    for key, (theirs_key, transposed) in mapping.items():
        shape = tuple(theirs[theirs_key].shape)
        want = tuple(ours[key].shape[::-1]) if transposed else tuple(ours[key].shape)
        if shape != want:
            raise PretrainedError(f"{source}: {theirs_key} has shape {shape} where NCSN++ needs {want}")


def to_diffusers_state(net: nn.Module, args: dict[str, Any]) -> dict[str, Tensor]:
    mapping = key_map(net, args)
    return {theirs: (v.t() if transposed else v).contiguous()
            for k, v in net.state_dict().items() for theirs, transposed in [mapping[k]]}


def from_diffusers_state(net: nn.Module, args: dict[str, Any], state: dict[str, Tensor],
                         source: str) -> dict[str, Tensor]:
    mapping = key_map(net, args)
    ours = net.state_dict()
    _check_keys(ours, state, mapping, source)
    return {k: (state[t].t() if transposed else state[t]).contiguous() for k, (t, transposed) in mapping.items()}


# -- folders ---------------------------------------------------------------------------------------------------------
def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise PretrainedError("diffusers is not installed: pip install diffusers (or lit-score's dev extras)")
    return diffusers


def _net_and_sde(pretrained_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The NCSNpp init_args and the VESDE init_args of an export; raises naming everything diffusers cannot express."""
    net, sde = pretrained_config["net"], pretrained_config["sde"]
    if net["class_path"].rsplit(".", 1)[-1] not in ("NCSNpp", "DDPMpp"):  # DDPMpp: diffusers_problems says why not
        raise PretrainedError(f"the network is {net['class_path']}: only NCSN++ ({NCSNPP}) has a diffusers "
                              "UNet2DModel form")
    args = {**_defaults(net["class_path"]), **(net.get("init_args") or {})}
    problems = diffusers_problems(args)
    if sde["class_path"] not in (VESDE, "lit_score.sdes.sdes.VESDE"):
        problems.append(f"the SDE is {sde['class_path']}: diffusers' score-SDE scheduler (ScoreSdeVeScheduler) is "
                        "for the VE SDE only")
    if problems:
        raise PretrainedError("diffusers' UNet2DModel cannot express this network: " + "; ".join(problems))
    return args, sde.get("init_args") or {}


def export_diffusers(source: str | Path, out_dir: str | Path) -> Path:
    """A ScoreSdeVePipeline folder (``unet/``, ``scheduler/``, ``model_index.json``) of a lit-score .ckpt or export
    folder; returns ``out_dir``."""
    import tempfile

    from lit_score.export import export_checkpoint

    source, out_dir = Path(source), Path(out_dir)
    if source.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(source, Path(tmp) / "export")
            pretrained = load_pretrained(Path(tmp) / "export")
    else:
        pretrained = load_pretrained(source)
    args, sde_args = _net_and_sde(pretrained.config)
    config = unet_config(args)
    diffusers = _diffusers()
    unet = diffusers.UNet2DModel(**config)
    state = to_diffusers_state(pretrained.net, args)
    _check_keys(pretrained.net.state_dict(), unet.state_dict(), key_map(pretrained.net, args), "UNet2DModel")
    unet.load_state_dict(state, strict=True)
    scheduler = diffusers.ScoreSdeVeScheduler(num_train_timesteps=int(sde_args.get("N", 1000)),
                                              sigma_min=float(sde_args.get("sigma_min", 0.01)),
                                              sigma_max=float(sde_args.get("sigma_max", 50.0)))
    diffusers.ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out_dir))
    return out_dir


def unet_defaults() -> dict[str, Any]:
    """UNet2DModel's default arguments."""
    import inspect

    return {k: v.default for k, v in inspect.signature(_diffusers().UNet2DModel.__init__).parameters.items()
            if k != "self" and v.default is not inspect.Parameter.empty}


def _defaults(class_path: str = NCSNPP) -> dict[str, Any]:
    """The init_args defaults of NCSNpp (or DDPMpp)."""
    import inspect

    from lit_score.networks import DDPMpp, NCSNpp

    cls = DDPMpp if class_path.endswith("DDPMpp") else NCSNpp
    return {k: (list(v.default) if isinstance(v.default, tuple) else v.default)
            for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def _unet_folder(folder: Path) -> tuple[Path, Path | None]:
    if (folder / "unet" / CONFIG_NAME).is_file():
        scheduler = folder / "scheduler" / "scheduler_config.json"
        return folder / "unet", scheduler if scheduler.is_file() else None
    if (folder / CONFIG_NAME).is_file():
        return folder, None
    raise PretrainedError(f"{folder} has neither unet/config.json nor config.json: give a diffusers pipeline or "
                          "UNet2DModel folder (save_pretrained)")


def import_diffusers(folder: str | Path, out_dir: str | Path, sigma_min: float | None = None,
                     sigma_max: float | None = None, N: int | None = None) -> Path:
    """A lit-score export folder (NCSNpp + VESDE) of a diffusers score-SDE pipeline or UNet2DModel folder; the SDE
    from its ``scheduler/`` (ScoreSdeVeScheduler), or from ``sigma_min``, ``sigma_max`` and ``N``."""
    from safetensors.torch import save_file

    from lit_score.networks import NCSNpp

    folder, out_dir = Path(folder), Path(out_dir)
    unet_dir, scheduler_path = _unet_folder(folder)
    config = json.loads((unet_dir / CONFIG_NAME).read_text())
    if config.get("_class_name") != "UNet2DModel":
        what = ("a lit-score export: load it with ScoreModel.from_pretrained or --ckpt_path" if
                config.get("format") == FORMAT else f"a {config.get('_class_name')!r}")
        raise PretrainedError(f"{unet_dir / CONFIG_NAME} is {what}, not a diffusers UNet2DModel")
    config = {**unet_defaults(), **config}  # what diffusers builds for the keys the file leaves out
    args = ncsnpp_args(config)
    scheduler = json.loads(scheduler_path.read_text()) if scheduler_path else {}
    if scheduler and scheduler.get("_class_name") != "ScoreSdeVeScheduler":
        raise PretrainedError(f"{scheduler_path} is a {scheduler.get('_class_name')!r}: only ScoreSdeVeScheduler "
                              "(the VE SDE) has a lit-score SDE")
    sde = {"sigma_min": sigma_min if sigma_min is not None else scheduler.get("sigma_min"),
           "sigma_max": sigma_max if sigma_max is not None else scheduler.get("sigma_max"),
           "N": N if N is not None else scheduler.get("num_train_timesteps")}
    if None in sde.values():
        raise PretrainedError(f"{folder} has no scheduler/scheduler_config.json: give the SDE with --sigma_min, "
                              "--sigma_max and --N")
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    elif (unet_dir / "diffusion_pytorch_model.bin").is_file():
        state = torch.load(unet_dir / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PretrainedError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin)")
    net = NCSNpp(**args)
    ours = from_diffusers_state(net, args, state, str(weights))
    net.load_state_dict(ours, strict=True)
    pretrained = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lit_score_version": lit_score_version(),
        "net": {"class_path": NCSNPP, "init_args": args},
        "sde": {"class_path": VESDE, "init_args": {k: (int(v) if k == "N" else float(v)) for k, v in sde.items()}},
        "loss": "dsm", "data": {k: args[k] for k in ("num_channels", "image_size", "centered")},
        "weights": "diffusers", "ema": None, "global_step": 0, "epoch": 0,
        "experiment": {"name": None, "imported_from": str(folder)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(ours, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "weights": "diffusers"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(pretrained, indent=2) + "\n")
    (out_dir / CARD_NAME).write_text(model_card(pretrained, out_dir.name))
    return out_dir


# -- command line ---------------------------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    """``lit-score export-diffusers SOURCE OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="lit-score export-diffusers", description=export_diffusers.__doc__)
    parser.add_argument("source", help="a lit-score .ckpt or `lit-score export` folder (NCSN++, VE SDE)")
    parser.add_argument("out_dir")
    args = parser.parse_args(list(argv))
    try:
        export_diffusers(args.source, args.out_dir)
    except PretrainedError as err:
        print(f"lit-score export-diffusers: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a diffusers ScoreSdeVePipeline (UNet2DModel + ScoreSdeVeScheduler) to {args.out_dir}")
    return 0


def import_main(argv: Sequence[str]) -> int:
    """``lit-score import-diffusers DIR OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="lit-score import-diffusers", description=import_diffusers.__doc__)
    parser.add_argument("folder", help="a diffusers score-SDE pipeline folder (unet/, scheduler/) or UNet2DModel folder")
    parser.add_argument("out_dir", help="the lit-score export folder to write")
    parser.add_argument("--sigma_min", type=float)
    parser.add_argument("--sigma_max", type=float)
    parser.add_argument("--N", type=int)
    args = parser.parse_args(list(argv))
    try:
        import_diffusers(args.folder, args.out_dir, args.sigma_min, args.sigma_max, args.N)
    except PretrainedError as err:
        print(f"lit-score import-diffusers: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a lit-score export (NCSN++, VE SDE) to {args.out_dir}")
    return 0
