"""Sampling loops stay on the device: no host synchronisation and no host-to-device copy per step.

Each sampler runs on PyTorch's ``meta`` device, where any read of a value on the host (``.item()``, ``float(t)``,
``bool(t.any())``, ``nonzero``) raises, and every copy of host data to the device is recorded. The copies must not
grow with the number of steps (the setup's few are allowed), which is what a CUDA sampling step needs to be one
network evaluation plus element-wise kernels with no stall.
"""
import pytest
import torch
from conftest import ScoreDenoiser
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lit_score.sampling import (IPNDM, ConsistencySampler, DPMSolverPP, DPMSolverPP3M, DPMSolverPPSDE, EDMSampler,
                                EulerSampler, PCSampler, UniPC)
from lit_score.diffusion.sdes import VESDE, VPSDE, bcast


class _Copies(TorchDispatchMode):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "copy" in str(func):
            src = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            dst = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
            if any(a.device.type == "cpu" for a in src) and any(o.device.type != "cpu" for o in dst):
                self.log.append(str(func))
        return out


class _NewFromHost(TorchFunctionMode):
    """torch.tensor / torch.as_tensor of Python data straight onto a device (below the dispatcher)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
            if torch.device(kwargs.get("device") or "cpu").type != "cpu":
                self.log.append(func.__name__)
        return func(*args, **kwargs)


def host_copies(run) -> list[str]:
    log: list[str] = []
    with _NewFromHost(log), _Copies(log):
        run()
    return log


def gaussian_model(sde):
    """Exact score of data N(0, I): x_t ~ N(0, s(t)^2 (1 + sigma(t)^2) I); D from it through the sigma view."""
    def score(x, t):
        return -x / bcast(sde.scale(t) ** 2 * (1 + sde.sigma(t) ** 2), x)
    return ScoreDenoiser(score, sde)


SAMPLERS = {
    "pc reverse_diffusion + langevin (VE)": (lambda n: PCSampler("reverse_diffusion", "langevin", steps=n), VESDE()),
    "pc euler_maruyama + ald (VP)": (lambda n: PCSampler("euler_maruyama", "ald", steps=n), VPSDE()),
    "pc ancestral + langevin official (VP)": (
        lambda n: PCSampler("ancestral_sampling", "langevin", steps=n, step_rule="official"), VPSDE(0.1, 5.0)),
    "pc ancestral (VE)": (lambda n: PCSampler("ancestral_sampling", "none", steps=n), VESDE()),
    "edm heun": (lambda n: EDMSampler(steps=n), VPSDE()),
    "edm stochastic float64": (lambda n: EDMSampler(steps=n, S_churn=10, float64=True), VESDE()),
    "dpm-solver++ 2m": (lambda n: DPMSolverPP(steps=n), VPSDE()),
    "dpm-solver++ 3m": (lambda n: DPMSolverPP3M(steps=n), VESDE()),
    "dpm-solver++ sde": (lambda n: DPMSolverPPSDE(steps=n), VPSDE()),
    "unipc": (lambda n: UniPC(steps=n, order=3), VPSDE()),
    "ipndm-v": (lambda n: IPNDM(steps=n, variable=True), VESDE()),
    "euler": (lambda n: EulerSampler(steps=n), VPSDE()),
    "consistency": (lambda n: ConsistencySampler(steps=n), VESDE()),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_host_sync_or_copy_per_step(name):
    make, sde = SAMPLERS[name]
    D = gaussian_model(sde)
    counts = []
    for n in (8, 16):
        sampler = make(n)
        log = host_copies(lambda: sampler.sample(D, sde, (1, 4, 4), range(6), device="meta"))
        counts.append(len(log))
    assert counts[0] == counts[1], f"{name}: host-to-device copies grow with the steps: {counts}"
    # setup: per seeded generator (noise, prior) the seeds and the Philox multipliers; the time grid; SDE tables
    assert counts[0] <= 10, f"{name}: {counts[0]} host-to-device copies in the setup"


def test_the_recorder_sees_a_planted_copy_and_sync():
    """The check can fail: a per-step .to(device) is counted, a per-step .item() raises on meta."""
    x = torch.zeros(3, device="meta")
    table = torch.arange(5.0)
    assert len(host_copies(lambda: [x + table.to(x.device)[i] for i in range(3)])) == 3
    assert len(host_copies(lambda: [torch.as_tensor(0.5, device=x.device) for _ in range(2)])) == 2
    with pytest.raises(Exception):
        bool((x > 0).any())
