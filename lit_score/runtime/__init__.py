"""The Lightning runtime: the LightningModule (``ScoreModel``), checkpoint files and reading old ones."""
