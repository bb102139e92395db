"""lit-score: score-based generative modelling with SDEs, in PyTorch Lightning.

Four floors, decided by folder, each importing only from those below it (``tests/test_layers.py``): the ground, the
modules directly in ``lit_score/`` (``rng``, ``registry``, ``data_space``, ``errors``, ``distributed``,
``progress``); the numerics, which import no Lightning (``lit_score.diffusion``, ``lit_score.networks``,
``lit_score.sampling``, ``lit_score.metrics``); the Lightning glue (``lit_score.runtime``, ``lit_score.callbacks``,
``lit_score.data``); and the tools (``lit_score.cli``, ``lit_score.interop``, ``lit_score.evaluate``)."""
from lit_score.cli.threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads OpenMP: waiting threads sleep instead of spinning (lit_score/cli/threads.py)

__version__ = "0.1.0"
