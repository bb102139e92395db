"""The numerics of score-based diffusion models (no Lightning): forward SDEs, the denoiser and its
preconditionings, the training objectives, likelihoods, exact Gaussian-mixture densities and weight averaging."""
