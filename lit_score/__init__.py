"""lit-score: score-based generative modelling with SDEs, in PyTorch Lightning.

Three floors: the numerics (``lit_score.sdes``, ``losses``, ``networks``, ``sampling``, ``likelihood``,
``metrics``) import no Lightning; the Lightning glue (``lit_score.module.ScoreModel``, ``lit_score.data``,
``lit_score.callbacks``) builds on them; the command line (``lit_score.cli``, ``lit_score.commands``) on top."""
from lit_score.threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads OpenMP: waiting threads sleep instead of spinning (lit_score/threads.py)

__version__ = "0.1.0"
