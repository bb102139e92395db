"""Make tests/reference/pc_reference.npz: the official score_sde_pytorch predictors, correctors and PC sampler
run on fixed inputs, a closed-form Gaussian score and recorded noise, for tests/test_pc_official.py.

    git clone https://github.com/yang-song/score_sde_pytorch /tmp/official
    python tests/reference/make_pc_reference.py --official /tmp/official

It imports sde_lib and sampling from the given checkout (which needs only torch, numpy and scipy) and copies
none of its code. Every random draw of the official code (torch.randn_like, torch.randn) is taken from a seeded
generator and recorded in order, so the test can replay exactly the same noise.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

SHAPE = (2, 2, 2)  # per-sample shape (C, H, W): the official code broadcasts with [:, None, None, None]
BATCH = 6
DATA_STD = 0.5
SDES = {"ve": dict(sigma_min=0.01, sigma_max=50.0, N=20), "vp": dict(beta_min=0.1, beta_max=20.0, N=40)}
EPS = {"ve": 1e-5, "vp": 1e-3}  # the official last sampling times (run_lib: 1e-5 for VE, 1e-3 otherwise)
SNR, N_STEPS = 0.16, 2
STEP_CASES = [("predictor", "euler_maruyama"), ("predictor", "reverse_diffusion"),
              ("predictor", "ancestral_sampling"), ("corrector", "langevin"), ("corrector", "ald")]
LOOP_CASES = [("ve", "reverse_diffusion", "langevin"), ("ve", "ancestral_sampling", "none"),
              ("ve", "none", "ald"), ("vp", "euler_maruyama", "none"), ("vp", "reverse_diffusion", "langevin"),
              ("vp", "ancestral_sampling", "ald")]


def data_mean() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, int(np.prod(SHAPE))).reshape(SHAPE)


def gaussian_score(kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t for data N(m, DATA_STD^2 I) under the VE or VP SDE of SDES[kind], written out in closed form."""
    t4 = t.reshape(-1, 1, 1, 1)
    m = data_mean().to(x)
    if kind == "ve":
        p = SDES["ve"]
        sigma = p["sigma_min"] * (p["sigma_max"] / p["sigma_min"]) ** t4
        return -(x - m) / (DATA_STD**2 + sigma**2)
    p = SDES["vp"]
    B = p["beta_min"] * t4 + 0.5 * (p["beta_max"] - p["beta_min"]) * t4**2
    a = torch.exp(-0.5 * B)
    return -(x - a * m) / (a**2 * DATA_STD**2 + 1 - torch.exp(-B))


def vp_std(t: torch.Tensor) -> torch.Tensor:
    """The VP marginal std, as the official sde_lib computes it (so the official score -output / std is exact)."""
    p = SDES["vp"]
    log_mean_coeff = -0.25 * t**2 * (p["beta_max"] - p["beta_min"]) - 0.5 * t * p["beta_min"]
    return torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))


class RecordedNoise:
    """Stands in for the torch module inside the official modules; its randn / randn_like draws are recorded."""

    def __init__(self, seed: int) -> None:
        self.generator, self.draws = torch.Generator().manual_seed(seed), []

    def namespace(self) -> types.SimpleNamespace:
        ns = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
        ns.randn_like = lambda x: self._draw(tuple(x.shape), x.dtype)
        ns.randn = lambda *shape, **kw: self._draw(tuple(shape[0] if len(shape) == 1 and not isinstance(shape[0], int)
                                                         else shape), kw.get("dtype") or torch.float32)
        return ns

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        z = torch.randn(shape, generator=self.generator, dtype=dtype)
        self.draws.append(z.clone())
        return z


class ScoreModel(torch.nn.Module):
    """A 'network' for the official get_score_fn(continuous=True): the score itself for VE (conditioned on sigma),
    the noise prediction -std(t) score for VP (conditioned on 999 t); it counts its evaluations."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.calls = kind, 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.kind == "ve":  # labels = sigma(t)
            return -(x - data_mean()) / (DATA_STD**2 + labels.reshape(-1, 1, 1, 1) ** 2)
        t = labels / 999
        return -vp_std(t).reshape(-1, 1, 1, 1) * gaussian_score("vp", x, t)


def official_sde(sde_lib, kind: str):
    return sde_lib.VESDE(**SDES["ve"]) if kind == "ve" else sde_lib.VPSDE(**SDES["vp"])


def step_cases(sde_lib, sampling, out: dict) -> None:
    """One update_fn call of each predictor / corrector at t = 1, 0.5 and eps."""
    for kind in SDES:
        sde = official_sde(sde_lib, kind)
        score_fn = lambda x, t, kind=kind: gaussian_score(kind, x, t)  # noqa: E731
        for ti, t in enumerate([1.0, 0.5, EPS[kind]]):
            for role, name in STEP_CASES:
                key = f"step/{kind}/{name}/{ti}"
                x = torch.randn((BATCH, *SHAPE), generator=torch.Generator().manual_seed(100 + ti)) * (
                    SDES["ve"]["sigma_max"] * t + 0.5 if kind == "ve" else 1.0)
                vec_t = torch.full((BATCH,), t)
                noise = RecordedNoise(seed=200 + ti)
                sampling.torch = noise.namespace()
                if role == "predictor":
                    op = sampling.get_predictor(name)(sde, score_fn, False)
                else:
                    op = sampling.get_corrector(name)(sde, score_fn, SNR, N_STEPS)
                x_new, x_mean = op.update_fn(x.clone(), vec_t)
                sampling.torch = torch
                out.update({f"{key}/x": x, f"{key}/t": vec_t, f"{key}/noise": torch.stack(noise.draws),
                            f"{key}/x_new": x_new, f"{key}/x_mean": x_mean})


def loop_cases(sde_lib, sampling, out: dict) -> None:
    """The official get_pc_sampler end to end (corrector then predictor at each of N times, denoised output)."""
    for kind, predictor, corrector in LOOP_CASES:
        key = f"loop/{kind}/{predictor}/{corrector}"
        sde = official_sde(sde_lib, kind)
        noise = RecordedNoise(seed=300)
        sampling.torch = sde_lib.torch = noise.namespace()
        model = ScoreModel(kind)
        fn = sampling.get_pc_sampler(sde, (BATCH, *SHAPE), sampling.get_predictor(predictor),
                                     sampling.get_corrector(corrector), lambda v: v, SNR, n_steps=N_STEPS,
                                     probability_flow=False, continuous=True, denoise=True, eps=EPS[kind],
                                     device="cpu")
        samples, _ = fn(model)
        sampling.torch = sde_lib.torch = torch
        out.update({f"{key}/prior": noise.draws[0] * (SDES["ve"]["sigma_max"] if kind == "ve" else 1.0),
                    f"{key}/noise": torch.stack(noise.draws[1:]) if len(noise.draws) > 1 else torch.zeros(0),
                    f"{key}/samples": samples, f"{key}/nfe": torch.tensor(model.calls)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, type=Path, help="a checkout of yang-song/score_sde_pytorch")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pc_reference.npz"))
    args = parser.parse_args(argv)
    if not (args.official / "sampling.py").is_file() or not (args.official / "sde_lib.py").is_file():
        parser.error(f"{args.official} has no sampling.py / sde_lib.py: pass a score_sde_pytorch checkout")
    sys.path.insert(0, str(args.official.resolve()))
    import sampling  # noqa: E402  (the official modules, from --official)
    import sde_lib  # noqa: E402

    torch.set_default_dtype(torch.float32)
    out: dict[str, torch.Tensor] = {}
    step_cases(sde_lib, sampling, out)
    loop_cases(sde_lib, sampling, out)
    np.savez_compressed(args.out, **{k: v.detach().numpy() for k, v in out.items()})
    print(f"wrote {len(out)} arrays to {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
