"""Training callbacks: weight EMA, periodic sample grids and FID, all correct under DDP."""
from callbacks.dashboard import Dashboard
from callbacks.ema import EMA, ema_weights, export_ema, load_ema_state_dict
from callbacks.fid import FID
from callbacks.posthoc_ema import PostHocEMA
from callbacks.sampling import SampleGrid

__all__ = ["Dashboard", "EMA", "ema_weights", "export_ema", "load_ema_state_dict", "FID", "PostHocEMA", "SampleGrid"]
