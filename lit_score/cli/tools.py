"""Command-line tools beside training: ``lit-score sigma-max`` and ``lit-score posthoc-ema``.

    lit-score sigma-max --config experiments/imagefolder_example.yaml --data.init_args.path DIR
    lit-score posthoc-ema RUN_DIR --sigma-rel 0.07 --out ema_0.07.ckpt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor

from lit_score.diffusion.ema import CHECKPOINT_KEY, RESULT_KEY, find_snapshots, reconstruct
from lit_score.runtime.upgrade import EMA, NET, upgrade_checkpoint

SIGMA_MAX_HELP = ("sigma_max for a VE SDE: the largest pairwise Euclidean distance between the training images of a "
                  "data config (Song & Ermon 2020, technique 1), in the model's data space, without flips or "
                  "dequantisation; --max_images (default 10000) searches a random subset chosen by --seed, which "
                  "gives a lower bound; --max_images null searches every image")


def _data_section(config: str) -> dict:
    from omegaconf import OmegaConf
    import yaml

    from lit_score.cli.config import compose

    merged = OmegaConf.merge(*(OmegaConf.create(yaml.safe_load(doc) or {}) for doc in compose(config)))
    if "data" not in merged:
        raise SystemExit(f"lit-score sigma-max: error: {config} has no 'data' section")
    try:
        return OmegaConf.to_container(merged.data, resolve=True)
    except Exception:
        return OmegaConf.to_container(merged.data, resolve=False)


def sigma_max_main(argv: Sequence[str] | None = None) -> int:
    """``lit-score sigma-max``: print the largest pairwise distance of a data config's training images, as a VE
    sigma_max."""
    from jsonargparse import ArgumentParser

    from lit_score.data.sigma_max import collect_images, max_pairwise_distance

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog="lit-score sigma-max", description=SIGMA_MAX_HELP)
    parser.add_argument("--config", type=str | None, default=None,
                        help="experiment YAML; its data section is used (defaults: are composed)")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    parser.add_argument("--max_images", type=int | None, default=10_000,
                        help="search a random subset of this many images (null: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    config = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    if config is not None:
        argv = ["--data", json.dumps(_data_section(config))] + argv
    cfg = parser.parse_args(argv)
    datamodule = parser.instantiate(cfg).data
    images, total = collect_images(datamodule, cfg.max_images, cfg.seed)
    sigma_max = max_pairwise_distance(images)
    scope = f"{len(images)} of {total}" if total is not None else f"{len(images)} (streamed)"
    lo, hi = (-1, 1) if getattr(datamodule, "centered", False) else (0, 1)
    print(f"images searched: {scope}; shape {tuple(images.shape[1:])}; data range [{lo}, {hi}]")
    print(f"largest pairwise distance: {sigma_max:.4f}")
    print(f"VE SDE (Song & Ermon 2020, technique 1): model.sde.init_args.sigma_max: {sigma_max:.4f}")
    return 0


def write_checkpoint(run_dir: Path, state: dict[str, Tensor], info: dict[str, Any], out: Path,
                     template: Path | None = None) -> Path:
    """A checkpoint for ``lit-score predict`` / ``lit-score-eval``: the run's last checkpoint (its network, SDE,
    loss and training weights) with ``state`` (a post-hoc EMA reconstruction, keyed like the trained weights) as its
    EMA network (``ema.*``), without optimizer or loop state (it does not resume training)."""
    template = template or run_dir / "checkpoints" / "last.ckpt"
    if not template.is_file():
        raise FileNotFoundError(f"{template} is missing: the reconstruction needs a checkpoint of the run for its "
                                "model; pass --template CKPT")
    checkpoint = upgrade_checkpoint(torch.load(template, map_location="cpu", weights_only=True))
    trained = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(EMA)}
    missing = sorted(set(trained) - set(state))
    if missing:
        raise ValueError(f"the snapshots lack {missing[:3]} of {template}'s weights: they are of another model")
    for key in ("optimizer_states", "lr_schedulers", "loops", CHECKPOINT_KEY):
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = trained | {EMA + k[len(NET):]: state[k] for k in trained if k.startswith(NET)}
    checkpoint[RESULT_KEY] = info
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def posthoc_ema_sweep(run_dir: Path, sigma_rels: Sequence[float], out_dir: Path, configs: Sequence[str],
          extra: Sequence[str], step: int | None = None) -> list[dict[str, Any]]:
    """Reconstruct each sigma_rel, evaluate it with ``lit-score-eval`` (its configs and extra arguments), and
    write ``out_dir/sweep.json``; returns one row (sigma_rel, FID, ...) per sigma_rel."""
    from lit_score.evaluate.cli import run as evaluate

    snapshots = find_snapshots(run_dir)
    rows = []
    for sigma_rel in sigma_rels:
        state, info = reconstruct(snapshots, sigma_rel, step)
        ckpt = write_checkpoint(run_dir, state, info, out_dir / f"ema_{sigma_rel:.3f}.ckpt")
        args = [a for c in configs for a in ("--config", c)] + ["--ckpt_path", str(ckpt),
                                                                "--evaluation.out_dir", str(out_dir / f"eval_{sigma_rel:.3f}")]
        results = evaluate(args + list(extra))
        rows.append({"sigma_rel": sigma_rel, "fid": results.get("fid"), "nfe": results.get("nfe"),
                     "step": info["step"], "relative_residual": info["relative_residual"], "checkpoint": str(ckpt)})
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def posthoc_ema_main(argv: Sequence[str]) -> int:
    """``lit-score posthoc-ema RUN_DIR (--sigma-rel S --out CKPT | --sweep S1 S2 ...) [--step N]``."""
    parser = argparse.ArgumentParser(prog="lit-score posthoc-ema", description="Reconstruct the EMA of any sigma_rel from a run's post-hoc EMA snapshots (Karras et al. 2024).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory with posthoc_ema/ snapshots")
    parser.add_argument("--sigma-rel", type=float, help="the EMA width to reconstruct")
    parser.add_argument("--out", type=Path, help="the checkpoint to write (with --sigma-rel)")
    parser.add_argument("--step", type=int, help="reconstruct at this step (default: the last snapshot's)")
    parser.add_argument("--template", type=Path, help="the checkpoint whose model the result takes "
                                                      "(default: RUN_DIR/checkpoints/last.ckpt)")
    parser.add_argument("--sweep", type=float, nargs="+", metavar="SIGMA_REL", help="evaluate FID for each")
    parser.add_argument("--config", action="append", default=[],
                        help="with --sweep: lit-score-eval configs (default: RUN_DIR/config.yaml)")
    parser.add_argument("--sweep-dir", type=Path, help="with --sweep: where checkpoints and results go "
                                                       "(default: RUN_DIR/posthoc_ema_sweep)")
    args, extra = parser.parse_known_args(list(argv))
    if (args.sweep is None) == (args.sigma_rel is None):
        parser.error("give either --sigma-rel S --out CKPT or --sweep S1 S2 ...")
    if extra and args.sweep is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.sweep is not None:
            configs = args.config or [str(args.run_dir / "config.yaml")]
            out_dir = args.sweep_dir or args.run_dir / "posthoc_ema_sweep"
            rows = posthoc_ema_sweep(args.run_dir, args.sweep, out_dir, configs, extra, args.step)
            print("sigma_rel  FID")
            for row in rows:
                print(f"{row['sigma_rel']:9.3f}  {row['fid']:.4f}")
            print(f"written to {out_dir / 'sweep.json'}")
            return 0
        if args.out is None:
            parser.error("--sigma-rel needs --out CKPT")
        state, info = reconstruct(find_snapshots(args.run_dir), args.sigma_rel, args.step)
        write_checkpoint(args.run_dir, state, info, args.out, args.template)
    except (FileNotFoundError, ValueError) as err:
        print(f"lit-score posthoc-ema: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: sigma_rel {info['sigma_rel']} at step {info['step']} from {len(info['snapshots'])} "
          f"snapshots (relative residual of the profile fit {info['relative_residual']:.2e})")
    return 0
