"""Paper-scale evaluation of score models: FID, KID, Inception Score and test-set bits/dim, distributed and resumable.

Run it with ``lit-score-eval`` or ``python -m lit_score.evaluate`` (see :mod:`lit_score.evaluate.cli`).
"""
from lit_score.evaluate.evaluator import Evaluator, load_weights
from lit_score.evaluate.experiment import Experiment, load_experiment
from lit_score.metrics.inception_score import InceptionScore, InceptionV3Logits, inception_score
from lit_score.metrics.reference_file import load_reference, save_reference

__all__ = ["Evaluator", "load_weights", "Experiment", "load_experiment", "InceptionV3Logits", "InceptionScore",
           "inception_score", "load_reference", "save_reference"]
