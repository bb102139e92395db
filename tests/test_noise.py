"""The per-image noise: Philox4x32-10 counter-based draws keyed by (seed, step, element) and Box-Muller in float32.

The pinned values come from a pure-Python Philox written here from the paper (Salmon et al. 2011), itself checked
against Random123's published known-answer vectors; the tensor code is compared with it, not with its own output.
"""
import math

import pytest
import scipy.stats
import torch

from lit_score.sampling import SeededNoise, seeded_normal, seeded_prior
from lit_score.rng import philox4x32
from lit_score.diffusion.sdes import VESDE, VPSDE, subVPSDE

pytestmark = pytest.mark.usefixtures("one_thread")

M32 = 2**32 - 1


def philox_reference(ctr, key, rounds=10):
    """Philox4x32-R on Python ints (Salmon et al. 2011, section 4.1)."""
    (c0, c1, c2, c3), (k0, k1) = ctr, key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def normal_reference(seed, step, j, numel, stream=0):
    """Element j of the seed's draw `step`, in float64 from the documented layout (lit_score.sampling.base._Philox)."""
    n4 = (numel + 3) // 4
    q, c = divmod(j, n4)
    w = philox_reference((c, step & M32, step >> 32, stream), (seed & M32, (seed >> 32) & M32))
    wu, wt = (w[0], w[1]) if q % 2 == 0 else (w[2], w[3])
    u, theta = ((wu >> 8) | 1) * 2.0**-24, (wt >> 8) * 2.0**-24 * 2 * math.pi
    r = math.sqrt(-2 * math.log(u))
    return r * math.cos(theta) if q < 2 else r * math.sin(theta)


# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, output)
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_philox_matches_the_published_known_answers(ctr, key, out):
    """Both the pure-Python reference and the batched int64 tensor rounds give Random123's answers."""
    assert philox_reference(ctr, key) == out
    words = philox4x32(tuple(torch.tensor([c]) for c in ctr), tuple(torch.tensor([k]) for k in key))
    assert tuple(int(w) for w in words) == out


def test_philox_batches_the_known_answers():
    """All three known answers from one batched call (counters and keys as 1-D tensors of length 3)."""
    ctr = tuple(torch.tensor([c[i] for c, _, _ in KAT]) for i in range(4))
    key = tuple(torch.tensor([k[i] for _, k, _ in KAT]) for i in range(2))
    words = philox4x32(ctr, key)
    assert [tuple(int(w[j]) for w in words) for j in range(3)] == [out for _, _, out in KAT]


def test_values_match_the_reference_generator():
    """Pinned: every element of a few (seed, step) draws, incl. 64-bit seeds, big steps and a ragged shape."""
    cases = [(0, 0), (7, 1), (2**32 + 5, 3), (123456789012, 2**21), (3, 2**40 + 9)]
    shape = (3, 2, 3)  # 18 elements: n4 = 5, the last counter's words partly unused
    for seed, step in cases:
        got = seeded_normal([seed], shape, step=step, dtype=torch.float64)[0].flatten()
        want = torch.tensor([normal_reference(seed, step, j, 18) for j in range(18)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)  # float32 transform
    prior = seeded_prior(VESDE(0.01, 50.0), [11], (5,))[0]
    want = torch.tensor([50.0 * normal_reference(11, 0, j, 5, stream=1) for j in range(5)])
    torch.testing.assert_close(prior, want, rtol=2e-6, atol=1e-4)


def test_rows_depend_only_on_their_seed_whatever_the_batch():
    """The same seed gives bit-identical rows in any batch order, size or container, and SeededNoise's k-th call
    is draw k."""
    shape = (1, 16, 16)
    seeds = [5, 2**33 + 1, 0, 17, 999]
    full = seeded_normal(seeds, shape, step=4)
    assert torch.equal(seeded_normal(seeds[::-1], shape, step=4), full.flip(0))
    assert torch.equal(seeded_normal([17], shape, step=4)[0], full[3])
    assert torch.equal(seeded_normal(torch.tensor(seeds + list(range(100, 400))), shape, step=4)[:5], full)
    noise = SeededNoise(seeds[1:3], shape)
    draws = [noise() for _ in range(3)]
    assert torch.equal(draws[2], seeded_normal(seeds[1:3], shape, step=2))
    assert torch.equal(seeded_prior(VPSDE(), seeds, shape)[1:3], seeded_prior(VPSDE(), seeds[1:3], shape))


def test_big_draw_is_standard_normal():
    """Mean, variance, tails and the Kolmogorov-Smirnov distance of 10^6 values, tolerances ~5 null std."""
    n = 2000 * 500
    z = seeded_normal(range(2000), (500,), step=3).double().flatten()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    p3 = 2 * scipy.stats.norm.sf(3)
    assert abs(float((z.abs() > 3).double().mean()) - p3) < 5 * math.sqrt(p3 / n)
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_no_correlation_between_elements_steps_seeds_or_the_prior():
    """Correlations (of values and of squares, which catch a shared Box-Muller radius) ~ 0 within 5 / sqrt(n)."""
    seeds, numel = range(4000), 64
    n4 = numel // 4
    z = seeded_normal(seeds, (numel,), step=0)
    tol = 5 / math.sqrt(z.numel() / 2)
    pairs = {"adjacent elements": (z[:, :-1], z[:, 1:]),
             "cos and sin of one pair": (z[:, :n4], z[:, 2 * n4:3 * n4]),
             "the two pairs of one counter": (z[:, :n4], z[:, n4:2 * n4]),
             "adjacent steps": (z, seeded_normal(seeds, (numel,), step=1)),
             "adjacent seeds": (z[:-1], z[1:]),
             "seed and seed + 2^32": (z, seeded_normal([s + 2**32 for s in seeds], (numel,), step=0)),
             "prior and step 0": (z, seeded_prior(VPSDE(), seeds, (numel,)))}
    for name, (a, b) in pairs.items():
        assert abs(_corr(a, b)) < tol, name
        assert abs(_corr(a**2, b**2)) < tol, f"{name} (squares)"


@pytest.mark.parametrize("sde,std", [(VESDE(0.01, 50.0), 50.0), (VPSDE(), 1.0), (subVPSDE(), 1.0)])
def test_prior_has_the_sde_prior_std_and_its_own_stream(sde, std):
    """seeded_prior ~ N(0, std^2) of p_T, and is none of the first draws of the same seeds."""
    seeds = range(1000)
    x = seeded_prior(sde, seeds, (100,)).double()
    n = x.numel()
    assert abs(float(x.std()) / std - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(x.mean())) / std < 5 / math.sqrt(n)
    for step in range(4):
        same = ((x / std - seeded_normal(seeds, (100,), step=step).double()).abs() < 1e-6).double().mean()
        assert float(same) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_same_noise():
    """Same Philox words on the GPU: the float32 values agree to the transcendental functions' last bits."""
    cpu = seeded_normal(range(64), (3, 8, 8), step=5)
    gpu = seeded_normal(range(64), (3, 8, 8), step=5, device="cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seeded_prior(VPSDE(), range(8), (4,), "cuda").cpu(), seeded_prior(VPSDE(), range(8), (4,)))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least one seed"):
        SeededNoise([], (2,))
    with pytest.raises(ValueError, match="noise step"):
        seeded_normal([1], (2,), step=-1)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        seeded_normal(torch.tensor([1.5]), (2,))
