"""Resampling and the adaptive annealing schedule of sequential Monte Carlo.

Systematic resampling: with normalised weights W and one uniform U ~ U[0, 1), particle i is copied once
for every point (U + k) / m, k = 0..m-1, that falls into its slice of the cumulative weights. Each copy
count N_i has E[N_i] = m W_i (so weighted means are unchanged in expectation) and differs from m W_i by
less than one, the lowest-variance of the usual schemes.

Adaptive schedule (Zhou, Johansen & Aston, 2016): going from beta to beta + d multiplies the weights by
exp(d * delta_i) with delta_i = -u(x_i) - log q(x_i). The conditional ESS of that step,

    CESS(d) = (sum_i W_i e^{d delta_i})^2 / sum_i W_i e^{2 d delta_i}      (in (0, 1], W normalised),

decreases in d; the next beta is the largest one whose CESS stays at the target (found by bisection),
so the schedule takes many small steps where q and p disagree and large ones where they agree.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import Tensor

from tbg.flow.reweight import normalized_weights

__all__ = ["systematic_resample", "conditional_ess", "next_beta", "seeded_generator"]


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for ``purpose`` (e.g. "smc") derived from ``seed``: its stream differs from the one
    ``torch.Generator().manual_seed(seed)`` gives, so that moves never reuse the random numbers that drew
    the samples they move when both were seeded alike (that correlation biases the estimates)."""
    state = np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def systematic_resample(log_w: Tensor, n: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
    """Indices [n] (default: as many as weights) of systematic resampling by the weights exp(log_w), sorted."""
    w = normalized_weights(log_w)
    m = w.numel() if n is None else n
    if m < 1:
        raise ValueError(f"need at least one draw, got n={m}")
    u = torch.rand((), generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else "cpu").to(w.device)
    points = (u + torch.arange(m, dtype=torch.float64, device=w.device)) / m
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0  # rounding must not leave the last points without a particle
    # A point equal to a cumulative weight belongs to the next particle (zero-weight ones have empty slices).
    return torch.searchsorted(cdf, points, right=True).clamp_(max=w.numel() - 1)


def conditional_ess(log_w: Tensor, increment: Tensor, step: float) -> float:
    """CESS of multiplying the weights exp(log_w) by exp(step * increment), a fraction in [0, 1].

    Particles with zero weight (log_w = -inf) or increment -inf (they get weight 0) count as zero.
    """
    lw = log_w.to(torch.float64) - torch.logsumexp(log_w.to(torch.float64), 0)
    inc = step * increment.to(torch.float64)
    inc = torch.where(torch.isneginf(increment), torch.full_like(inc, -math.inf), inc)  # 0 * -inf at step 0
    a = torch.logsumexp(lw + inc, 0)
    b = torch.logsumexp(lw + 2 * inc, 0)
    if not torch.isfinite(a):
        return 0.0
    return float(torch.exp(2 * a - b).clamp(max=1.0))


def next_beta(beta: float, log_w: Tensor, increment: Tensor, target_cess: float, *, tolerance: float = 1e-10) -> float:
    """The largest beta' in (beta, 1] with CESS(beta' - beta) >= target_cess (1 if the whole rest fits).

    The step is at least ``tolerance`` so that the schedule always advances.
    """
    if not 0.0 < target_cess < 1.0:
        raise ValueError(f"target_cess must be in (0, 1), got {target_cess}")
    rest = 1.0 - beta
    if conditional_ess(log_w, increment, rest) >= target_cess:
        return 1.0
    lo, hi = 0.0, rest
    while hi - lo > tolerance * max(1.0, rest):
        mid = 0.5 * (lo + hi)
        if conditional_ess(log_w, increment, mid) >= target_cess:
            lo = mid
        else:
            hi = mid
    return beta + max(lo, tolerance)
