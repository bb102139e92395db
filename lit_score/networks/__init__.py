"""Score networks: NCSN++ / DDPM++ U-Nets for images and a small MLP for toy vector data."""
from .classifier import NoiseClassifierNet
from .mlp import ScoreMLP
from .ncsnpp import DDPMpp, NCSNpp

__all__ = ["NCSNpp", "DDPMpp", "ScoreMLP", "NoiseClassifierNet"]
