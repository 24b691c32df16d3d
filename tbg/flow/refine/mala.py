"""Metropolis-adjusted Langevin moves, batched over particles.

One step from x with step size tau (units: flow coordinates squared) and drift g(x) (see
``AnnealingPath.drift``):

    x' = x + tau g(x) + sqrt(2 tau) xi,      xi ~ N(0, I) (projected onto the particles' subspace)

accepted with probability min(1, a),

    log a = log pi(x') - log pi(x) + log k(x | x') - log k(x' | x),
    log k(b | a) = -|b - a - tau g(a)|^2 / (4 tau)       (the Gaussian normalisers cancel),

which makes pi invariant for any drift (the drift only decides how often moves are accepted). Both norms
are taken in the ambient coordinates: on the mean-free subspace, whose basis is orthonormal, they equal
the subspace norms. A particle whose current log pi is -inf (a broken sample) accepts any proposal with
finite log pi; a proposal with log pi = -inf is always rejected.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tbg.flow.refine.targets import AnnealingPath, ParticleState

__all__ = ["mala_step", "adapt_step_size", "mala_log_acceptance"]


def mala_log_acceptance(x: Tensor, x_new: Tensor, g: Tensor, g_new: Tensor, log_pi: Tensor, log_pi_new: Tensor,
                        step_size: float) -> Tensor:
    """log a of the MALA proposal x -> x_new (formula in the module docstring), float64 [n]."""
    def log_kernel(to: Tensor, frm: Tensor, g_frm: Tensor) -> Tensor:
        r = (to - frm - step_size * g_frm).to(torch.float64)
        return -r.pow(2).sum(1) / (4.0 * step_size)

    log_a = log_pi_new - log_pi + log_kernel(x, x_new, g_new) - log_kernel(x_new, x, g)
    zero, minus_inf = torch.zeros_like(log_a), torch.full_like(log_a, -math.inf)
    alive_next = torch.isfinite(log_pi_new)
    log_a = torch.where(torch.isneginf(log_pi), zero, log_a)  # NaN from (-inf) - (-inf) goes too
    return torch.where(alive_next, log_a, minus_inf)


def mala_step(path: AnnealingPath, state: ParticleState, beta: float, step_size: float,
              generator: torch.Generator | None = None) -> tuple[ParticleState, Tensor]:
    """One MALA step of every particle targeting pi_beta of ``path``; returns (new state, accepted [n])."""
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    g = path.drift(state, beta)
    x_new = state.x + step_size * g + math.sqrt(2.0 * step_size) * path.noise(state.x, generator)
    proposal = path.evaluate(x_new, beta)
    log_a = mala_log_acceptance(state.x, x_new, g, path.drift(proposal, beta), path.log_target(state, beta),
                                path.log_target(proposal, beta), step_size)
    uniform = torch.rand(log_a.shape, generator=generator, dtype=torch.float64,
                         device=generator.device if generator is not None else log_a.device).to(log_a.device)
    accepted = torch.log(uniform) < log_a
    return state.where(accepted, proposal), accepted


def adapt_step_size(step_size: float, acceptance: float, target: float, gain: float = 1.0) -> float:
    """Multiplicative update toward a target acceptance rate: tau * exp(gain * (acceptance - target)).

    Applied between steps from the acceptance of the whole population, so every single step is an exact
    MALA step for its (fixed) tau.
    """
    return step_size * math.exp(gain * (acceptance - target))
