"""Each private piece of Lightning that lit-score uses (``lit_score.runtime.lightning_private``) is still there and
still does what lit-score relies on; an upgrade of Lightning that changes one fails here, by name."""
from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_score.runtime import lightning_private
from lit_score.runtime.lightning_private import CLI_CHECKPOINT_HPARAMS, without_checkpoint_hyperparameters


def test_every_private_use_is_listed_with_an_existing_attribute(tmp_path):
    """Property: each name in ``private_uses()`` is an attribute of its Lightning class (or of a fresh instance),
    used by the function that lists it."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    instances = {ModelCheckpoint: ModelCheckpoint(dirpath=tmp_path), TensorBoardLogger: TensorBoardLogger(tmp_path),
                 _FitLoop: trainer.fit_loop}
    uses = lightning_private.private_uses()
    assert len(uses) >= 7, "lightning_private lists its private uses"
    for function, (owner, name) in uses.items():
        assert callable(getattr(lightning_private, function.split(" ")[0])), function
        assert hasattr(owner, name) or hasattr(instances.get(owner), name), \
            f"{owner.__qualname__}.{name} is gone: see lightning_private.{function}"


def test_model_checkpoint_and_tensorboard_private_pieces_keep_their_shapes(tmp_path):
    """Property: the ModelCheckpoint methods are called as lightning_private calls them, its counters have the
    types it reads, and the TensorBoard logger's constructor keywords (where purge_step goes) are a dict."""
    params = list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters)
    assert params == ["self", "trainer", "monitor_candidates"]
    assert list(inspect.signature(ModelCheckpoint._monitor_candidates).parameters) == ["self", "trainer"]
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    assert isinstance(checkpoint._last_global_step_saved, int) and checkpoint._enable_version_counter is True
    lightning_private.replace_last_in_place(checkpoint)
    assert checkpoint._enable_version_counter is False
    logger = TensorBoardLogger(tmp_path)
    assert logger._experiment is None and isinstance(logger._kwargs, dict)
    assert lightning_private.open_event_writer(logger) == (None, None)
    lightning_private.reopen_with_purge_step(logger, 5)
    assert logger._kwargs["purge_step"] == 5  # and the writer the logger opens next is made with its _kwargs:
    assert "**self._kwargs" in inspect.getsource(type(logger).experiment.fget)


def test_lightning_cli_applies_checkpoint_hyperparameters_in_the_method_that_is_turned_off():
    """Property: LightningCLI.__init__ calls ``_parse_ckpt_path()`` (no arguments) after parsing and before
    instantiating, and that method is where the checkpoint's hyper-parameters go over the config; the class
    given to ``without_checkpoint_hyperparameters`` has it as a no-op."""
    method = getattr(LightningCLI, CLI_CHECKPOINT_HPARAMS)
    assert list(inspect.signature(method).parameters) == ["self"]
    init = inspect.getsource(LightningCLI.__init__)
    calls = [init.index(f"self.{name}(") for name in ("parse_arguments", CLI_CHECKPOINT_HPARAMS,
                                                        "before_instantiate_classes", "instantiate_classes")]
    assert calls == sorted(calls), "the order parse -> checkpoint hyper-parameters -> instantiate changed"
    source = inspect.getsource(method)
    assert "hyper_parameters" in source and "ckpt_path" in source and "parse_object" in source

    class CLI(LightningCLI):
        pass

    assert without_checkpoint_hyperparameters(CLI) is CLI
    assert getattr(CLI, CLI_CHECKPOINT_HPARAMS)(object()) is None
    assert getattr(LightningCLI, CLI_CHECKPOINT_HPARAMS) is method


def test_the_command_line_uses_the_private_pieces_through_lightning_private_only():
    """Property: lit-score's command line neither overrides nor calls LightningCLI's private methods (the Trainer
    comes from instantiate_trainer, the run-folder clean-up from ScoreTrainer.fit) but through lightning_private."""
    import lit_score.cli.lightning_cli as cli
    import lit_score.evaluate.experiment as experiment

    private = [name for name, _ in inspect.getmembers(LightningCLI)
               if name.startswith("_") and not name.startswith("__")]
    for module in (cli, experiment):
        source = inspect.getsource(module)
        for name in private:
            assert f"def {name}(" not in source and f"._{name.lstrip('_')}(" not in source, \
                f"{module.__name__} uses LightningCLI.{name}"
