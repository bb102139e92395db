"""Training callbacks: weight EMA, periodic sample grids and FID, all correct under DDP."""
from lit_score.callbacks.dashboard import Dashboard
from lit_score.callbacks.ema import EMA
from lit_score.callbacks.fid import FID
from lit_score.callbacks.nonfinite import NonFinite
from lit_score.callbacks.posthoc_ema import PostHocEMA
from lit_score.callbacks.sampling import SampleGrid

__all__ = ["Dashboard", "EMA", "FID", "NonFinite", "PostHocEMA", "SampleGrid"]
