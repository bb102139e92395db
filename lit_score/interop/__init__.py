"""Models in and out of lit-score: self-describing export folders, official score_sde checkpoints, diffusers."""
