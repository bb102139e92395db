"""``lit-score-eval`` / ``python -m lit_score.evaluate``: the paper's evaluation of a checkpoint, on every GPU and node.

    python -m lit_score.evaluate --config experiments/cifar10_ncsnpp_deep_continuous_ve.yaml \\
        --ckpt_path converted.ckpt --evaluation.out_dir eval/ncsnpp_deep_pc --trainer.devices 8

The experiment YAML builds the model and data as ``lit-score`` does; ``evaluation.*`` are the arguments of
:class:`lit_score.evaluate.Evaluator` (put them in a YAML such as ``experiments/eval_cifar10_pc.yaml`` and pass it as a
second ``--config``). ``trainer.accelerator``, ``trainer.devices`` and ``trainer.num_nodes`` say where to run: the
processes are launched by Lightning Fabric (locally, by ``torchrun`` or by SLURM's ``srun``) and share the work by
seeds. Re-running the same command after pre-emption resumes from the finished shards.

The outputs go to ``--output`` or ``--evaluation.out_dir`` when given, else to ``eval_<N>`` in the checkpoint's run
folder (as ``lit-score predict``'s ``predict_<N>``; for an export, ``runs/<export name>/`` in the current
directory): the folder that already holds this protocol's evaluation, so that the same command resumes it, or a new
one. The training run's own files are never written. Each output is printed, one line each.

``--evaluation.seed_sets 3`` evaluates three disjoint sets of ``num_samples`` seeds in the same command (EDM's
protocol: its FID is the minimum over the three) and prints one line with each set's FID, their minimum and mean.

``--evaluation.guidance_scales [1,2,3,5]`` evaluates a guided model (``--model.guidance ClassifierFreeGuidance``,
``AutoGuidance`` or ``ClassifierGuidance``) once per guidance scale, each scale's shards in ``guidance_<w>/``, and
prints one line per scale; ``results.json`` lists them under ``guidance_sweep`` and ``fid_vs_guidance.png`` plots FID
against the scale.

The model comes from the checkpoint as for ``lit-score`` (``--ckpt_path`` fixes the network, SDE, loss and
preconditioning): from an export or a checkpoint alone (no experiment YAML) the samples come from seeds, and FID then
needs ``--evaluation.reference FILE`` and ``--evaluation.bpd false`` (there are no training or test images).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser
from omegaconf.errors import OmegaConfBaseException

from lit_score.cli.config import expand_config_args
from lit_score.distributed import close
from lit_score.errors import ConfigurationError, run_reporting_errors
from lit_score.evaluate.evaluator import Evaluator, guidance_sweep_summary, seed_sets_summary
from lit_score.cli.lightning_cli import output_parent
from lit_score.evaluate.experiment import ExperimentCLI
from lit_score.callbacks.preemption import Interrupted, stop_at_boundaries


class EvaluateCLI(ExperimentCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str, required=True,
                            help="lit-score checkpoint to evaluate (its EMA weights unless evaluation.weights=raw), or a "
                                 "`lit-score export` folder (its weights)")
        parser.add_class_arguments(Evaluator, "evaluation")


EVAL_OUTPUTS = {"results.json": "the results", "protocol.json": "the protocol", "samples": "shards of samples",
                "bpd": "shards of bits/dim", "tensorboard": "TensorBoard events (metrics)",
                "fid_vs_guidance.png": "FID against the guidance scale"}


def output_description(name: str) -> str:
    """What an output of the out_dir holds."""
    if name.startswith("guidance_"):
        return f"shards of samples at guidance scale {name[len('guidance_'):]}"
    return EVAL_OUTPUTS.get(name, name)


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (default: the command line), launch the processes and evaluate; returns the results."""
    if argv is None:
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    argv = sys.argv[1:] if argv is None else list(argv)
    configs = [b for a, b in zip(argv, argv[1:]) if a in ("-c", "--config")] + [
        a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    argv = expand_config_args(argv)
    try:
        cli = EvaluateCLI(run=False, args=argv, save_config_callback=None)
    except OmegaConfBaseException as err:
        raise ConfigurationError(f"the config's interpolations do not resolve: {err}") from err
    evaluator: Evaluator = cli.config_init["evaluation"]
    trainer = cli.trainer_config
    if cli.config.get("output") is not None:  # over evaluation.out_dir (which an evaluation YAML may set)
        evaluator.out_dir = Path(cli.config["output"])
    out_root = output_parent(cli.checkpoint or cli.initial_weights, trainer.get("logger"),
                             trainer.get("default_root_dir"))
    fabric = L.Fabric(accelerator=trainer.get("accelerator") or "auto", devices=trainer.get("devices") or "auto",
                      num_nodes=trainer.get("num_nodes") or 1, strategy="auto")
    fabric.launch()
    ckpt_path = None if cli.checkpoint is not None and cli.checkpoint.export else cli.config["ckpt_path"]  # loaded
    try:
        with stop_at_boundaries():  # SIGINT, SIGTERM, SIGUSR1: stop after the current shard, exit 128 + signal
            results = evaluator.run(cli.model, cli.datamodule, ckpt_path, config=" + ".join(configs) or None,
                                    device=fabric.device, out_root=out_root)
    except Interrupted as err:
        print(f"lit-score-eval: {err}", file=sys.stderr)
        raise
    if fabric.global_rank == 0 and not results["complete"]:
        print(f"stopped with {results['shards_left']} of {results['num_shards']} shards left (max_shards); "
              f"run the same command again to go on")
    elif fabric.global_rank == 0:
        summary = {k: v for k, v in results.items() if k != "protocol"}
        print(json.dumps(summary, indent=2))
        line = seed_sets_summary(results)
        if line:
            print(f"lit-score-eval: {line}")
        for line in guidance_sweep_summary(results):
            print(f"lit-score-eval: {line}")
        for path in sorted(evaluator.out_dir.iterdir()):
            print(f"lit-score-eval: {output_description(path.name)}: {path}")
        if evaluator.export_reference is not None:
            print(f"lit-score-eval: the samples' statistics: {evaluator.export_reference}")
    close()
    return results


def main() -> None:
    """Console script ``lit-score-eval``: a problem with the input is one or two lines and exit status 2 (see
    :mod:`lit_score.errors`)."""
    sys.exit(run_reporting_errors(lambda: (run(), 0)[1], prog="lit-score-eval"))
