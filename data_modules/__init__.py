"""DataModules that serve images (B, C, H, W) in the model's data space."""
from data_modules.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
