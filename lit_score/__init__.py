"""lit-score: score-based generative modelling with SDEs, in PyTorch Lightning."""
from lit_score.threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads OpenMP: waiting threads sleep instead of spinning (lit_score/threads.py)

from lit_score.sdes import SDE, VESDE, VPSDE, subVPSDE  # noqa: E402
from lit_score.module import ScoreModel  # noqa: E402

__all__ = ["SDE", "VESDE", "VPSDE", "subVPSDE", "ScoreModel"]
__version__ = "0.1.0"
