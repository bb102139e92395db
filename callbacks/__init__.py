"""Training callbacks: weight EMA, periodic sample grids and FID, all correct under DDP."""
from lit_score.callbacks.ema import EMA, ema_weights, export_ema, load_ema_state_dict
from lit_score.callbacks.fid import FID
from lit_score.callbacks.sampling import SampleGrid

__all__ = ["EMA", "ema_weights", "export_ema", "load_ema_state_dict", "FID", "SampleGrid"]
