"""lit-score: score-based generative modelling with SDEs, in PyTorch Lightning."""
from lit_score.sdes import SDE, VESDE, VPSDE, subVPSDE
from lit_score.module import ScoreModel

__all__ = ["SDE", "VESDE", "VPSDE", "subVPSDE", "ScoreModel"]
__version__ = "0.1.0"
