"""A 2-D Boltzmann distribution with a known answer for the refinement tests and bench/bench_refine_toy.py.

Target: a normalised mixture of two Gaussians (so log Z_p = 0 and every expectation is known);
proposal: a deliberately wrong Gaussian "flow" with exact log q and its gradient.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64)
MODE_P = torch.tensor([0.3, 0.7], dtype=F64)
MODE_STD = 0.5
# Exact expectations under p: E[x1] = 0.3 (-2) + 0.7 (2), P(x1 > 0) = 0.7 (up to Phi(-4) ~ 3e-5), E[x2^2] = 0.25.
EXACT = {"x1": 0.8, "x1>0": 0.7, "x2^2": MODE_STD**2}


def mixture_energy(x: torch.Tensor) -> torch.Tensor:
    """u = -log p with p the normalised mixture, so Z_p = 1."""
    sq = (x[:, None, :] - MODES).pow(2).sum(-1)
    log_comp = torch.log(MODE_P) - sq / (2 * MODE_STD**2) - math.log(2 * math.pi * MODE_STD**2)
    return -torch.logsumexp(log_comp, 1)


class GaussianProposal:
    """A wrong 'flow': N(mean, diag(std^2)) with exact log q and its gradient."""

    mean = torch.tensor([0.5, 0.3], dtype=F64)
    std = torch.tensor([2.0, 1.5], dtype=F64)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        return (-0.5 * z * z - torch.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(1)

    def log_prob_and_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_prob(x), -(x - self.mean) / self.std**2

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.mean + self.std * torch.randn(n, 2, generator=g, dtype=F64)


def observables(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x1": x[:, 0], "x1>0": (x[:, 0] > 0).to(F64), "x2^2": x[:, 1] ** 2}


# Proposal expectations: E_q[x1] = 0.5, P_q(x1 > 0) = Phi(0.25) = 0.60, E_q[x2^2] = 1.5^2 + 0.3^2 = 2.34.
# All differ from EXACT by far more than the tests' tolerances, so an unweighted or broken sampler fails.
