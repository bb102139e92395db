"""Samplers: predictor-corrector, probability-flow ODE, the sigma-view fast solvers (EDM, DPM-Solver++ 2M / 3M /
SDE, UniPC, iPNDM, Euler), the adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021) and consistency
sampling (Song et al. 2023; ECT, Geng et al. 2024).

Choose one by class in YAML (``model.sampler: {class_path: PCSampler, init_args: {...}}``) or on the command
line (``--model.sampler ODESampler --model.sampler.rtol 1e-4``); add your own by subclassing ``Sampler``, or
``SigmaSampler`` for a solver stepping down a sigma schedule (and registering predictors / correctors / schedules
in ``PREDICTORS`` / ``CORRECTORS`` / ``SCHEDULES``).
"""
from lit_score.sampling.base import SampleResult, Sampler
from lit_score.rng import SeededNoise, seeded_normal, seeded_prior, starting_noise
from lit_score.sampling.conditional import colorize, inpaint
from lit_score.sampling.consistency import ConsistencySampler
from lit_score.sampling.ode import ODESampler, dopri5
from lit_score.sampling.pc import CORRECTOR_STEP_RULES, CORRECTORS, PREDICTORS, PCSampler, default_eps
from lit_score.sampling.sigma import SCHEDULES, DPMSolverPP, EDMSampler, SigmaSampler, dpm_solver_pp, edm_sample
from lit_score.sampling.solvers import (IPNDM, AdaptiveSDESampler, DPMSolverPP3M, DPMSolverPPSDE, EulerSampler, UniPC,
                                        adaptive_sde, euler, ipndm, unipc)
from lit_score.diffusion.sdes import SDE, VESDE

__all__ = ["SampleResult", "Sampler", "SigmaSampler", "SeededNoise", "seeded_normal", "seeded_prior", "starting_noise",
           "default_sampler", "PCSampler", "PREDICTORS", "CORRECTORS", "CORRECTOR_STEP_RULES", "default_eps",
           "ODESampler", "dopri5", "EDMSampler", "DPMSolverPP", "SCHEDULES", "inpaint", "colorize", "EulerSampler",
           "DPMSolverPP3M", "DPMSolverPPSDE", "UniPC", "IPNDM", "AdaptiveSDESampler", "edm_sample", "euler",
           "dpm_solver_pp", "unipc", "ipndm", "adaptive_sde", "ConsistencySampler"]


def default_sampler(sde: SDE) -> Sampler:
    """The official code's defaults: reverse diffusion + Langevin (snr 0.16) to eps = 1e-5 for VE, Euler-Maruyama
    alone to eps = 1e-3 otherwise."""
    if isinstance(sde, VESDE):
        return PCSampler("reverse_diffusion", "langevin", snr=0.16, eps=1e-5)
    return PCSampler("euler_maruyama", "none", eps=1e-3)
