"""The toy 2-D figure of the score-based modelling talk (the ``Toy2DFigure`` callback of experiments/toy2d.yaml):
learned and exact score fields, Langevin, annealed Langevin and reverse-SDE samples of a 2-D Gaussian mixture."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lit_score.diffusion.denoiser import Denoiser
from lit_score.diffusion.densities import GaussianMixture
from lit_score.diffusion.sdes import SDE, ScoreFn
from lit_score.rng import SeededNoise
from lit_score.sampling.pc import PCSampler


def langevin_dynamics(score_fn: ScoreFn, x: Tensor, t: float, step: float, n_steps: int,
                      noise: SeededNoise) -> Tensor:
    """x <- x + step / 2 score(x, t) + sqrt(step) z at one fixed noise level (Song & Ermon 2019, eq. 4)."""
    vec_t = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    for _ in range(n_steps):
        x = x + step / 2 * score_fn(x, vec_t) + step**0.5 * noise()
    return x


@torch.no_grad()
def toy2d_figure(D: Denoiser, sde: SDE, mixture: GaussianMixture, num_samples: int = 1000,
                 lim: float = 5.0, steps: int = 200):
    """A matplotlib figure of five panels of the model whose denoiser is D: learned score, exact score, Langevin,
    annealed Langevin, reverse SDE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = float(sde.t_from_sigma(torch.tensor(max(sde.sigma_min, 0.05))))
    grid = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    logp = mixture.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(200, 200)
    arrows = torch.linspace(-lim, lim, 21)
    ax_, ay_ = torch.meshgrid(arrows, arrows, indexing="xy")
    pts = torch.stack([ax_.flatten(), ay_.flatten()], 1)
    t_pts = torch.full((len(pts),), t0)
    fields = {"learned score": D.score(pts, t_pts), "exact score": mixture.score(pts, sde, t_pts)}
    seeds = range(num_samples)
    std_L = float(sde.marginal_prob(torch.zeros(1), torch.tensor([t0]))[1])  # alpha_L = 0.2 sigma_L^2 at the last level
    start = (torch.rand(num_samples, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1) * lim
    samples = {
        "Langevin dynamics (one noise level)": langevin_dynamics(D.score, start.clone(), t0, 0.01, 1000,
                                                                 SeededNoise(seeds, (2,))),
        "annealed Langevin dynamics": PCSampler("none", "ald", steps=10, n_steps_each=100, step_lr=0.2 * std_L**2,
                                                eps=t0).sample(D, sde, (2,), seeds).samples,
        "reverse SDE (Euler-Maruyama)": PCSampler("euler_maruyama", "none", steps=steps).sample(
            D, sde, (2,), seeds).samples,
    }
    fig, axes = plt.subplots(1, 5, figsize=(25, 5))
    for ax in axes:
        ax.contourf(gx.numpy(), gy.numpy(), logp.clamp(min=-12).numpy(), levels=20, cmap="Blues")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    for ax, (title, field) in zip(axes[:2], fields.items()):
        ax.quiver(pts[:, 0].numpy(), pts[:, 1].numpy(), field[:, 0].numpy(), field[:, 1].numpy(), color="k",
                  angles="xy", scale_units="xy", scale=float(field.norm(dim=1).quantile(0.9)) * 2.5)
        ax.set_title(f"{title} at sigma = {float(sde.sigma(torch.tensor(t0))):.2g}")
    for ax, (title, x) in zip(axes[2:], samples.items()):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, c="tab:red", alpha=0.6)
        ax.set_title(title)
    fig.tight_layout()
    return fig


class Toy2DFigure(Callback):
    """At the end of fit, draws :func:`toy2d_figure` for the DataModule's ``mixture``, saves ``toy2d.png`` in the run
    directory (or ``output_dir``) and gives it to every logger that takes images as ``toy2d/score_field``."""

    def __init__(self, output_dir: str | None = None, num_samples: int = 1000) -> None:
        self.output_dir, self.num_samples = output_dir, num_samples

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mixture = getattr(trainer.datamodule, "mixture", None)
        if not isinstance(mixture, GaussianMixture):
            raise TypeError("Toy2DFigure needs a DataModule with a GaussianMixture 'mixture' (lit_score.data.toy2d)")
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective call
        if trainer.global_rank != 0:
            return
        pl_module.eval()
        fig = toy2d_figure(pl_module.denoiser(), pl_module.sde, mixture, self.num_samples)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "toy2d.png", dpi=80)
        from PIL import Image

        from lit_score.callbacks.sampling import log_image

        image = Image.open(out / "toy2d.png").convert("RGB")
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        for logger in trainer.loggers:
            log_image(logger, "toy2d/score_field", pixels, image, trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(fig)
