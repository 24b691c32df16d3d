"""What refinement evaluates: the reduced energy u (target p ~ exp(-u)), the flow's density q, their
gradients, the annealing path between them, and what all of it costs.

Conventions. Particles are flat float64 tensors x [n, D] in the flow's coordinates (model units for
molecules: nm x SCALE). ``Potential`` gives u(x) = U(x)/kT (dimensionless, +inf for broken samples) and
its gradient du/dx [n, D] in 1/(flow units). ``Density`` gives the normalised log q(x) of the flow (any
constant offset only shifts the reported log normaliser). ``AnnealingPath`` combines them into the
geometric path

    log pi_beta(x) = (1 - beta) log q(x) - beta u(x),   beta in [0, 1],

so pi_0 = q and pi_1 ~ exp(-u); at beta = 1 the flow's density is never evaluated, which is what makes
the resample-move scheme cheap.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from tbg.flow.ode import Dynamics, SolverConfig, integrate
from tbg.flow.prior import MeanFreeGaussian

__all__ = [
    "Potential",
    "Density",
    "AutogradPotential",
    "energy_model_potential",
    "FlowDensity",
    "Costs",
    "ParticleState",
    "AnnealingPath",
    "mean_free_projection",
    "Drift",
]

Drift = Literal["energy", "exact"]


@runtime_checkable
class Potential(Protocol):
    """Reduced energy u(x) [n] (float64, +inf for broken samples) and its gradient du/dx [n, D]."""

    def energy(self, x: Tensor) -> Tensor: ...

    def energy_and_gradient(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class Density(Protocol):
    """Normalised log-density log q(x) [n]; ``log_prob_and_gradient`` is needed only for drift="exact"."""

    def log_prob(self, x: Tensor) -> Tensor: ...


class AutogradPotential:
    """A potential from a differentiable function ``reduced_energy(x [n, D]) -> u [n]`` (e.g. analytic toy
    energies); the gradient comes from one backward pass."""

    def __init__(self, reduced_energy: Callable[[Tensor], Tensor]) -> None:
        self.reduced_energy = reduced_energy

    def energy(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.reduced_energy(x).to(torch.float64)

    def energy_and_gradient(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            u = self.reduced_energy(xr)
            (grad,) = torch.autograd.grad(u.sum(), xr)
        return u.detach().to(torch.float64), grad.to(x.dtype)


def energy_model_potential(energy_model: object, unit: Literal["nm", "scaled"] = "scaled") -> AutogradPotential:
    """``tbg.chem.EnergyModel`` (OpenMM) as a potential on flat positions [n, 3N] in ``unit``.

    Built on ``EnergyModel.torch_reduced_energy``: u = U/kT, and as gradient the OpenMM forces converted to
    ``unit`` (du/dx = -(F/kT) / SCALE in model units, F/kT in kT/nm). Broken configurations get u = +inf
    (and a zero gradient; MALA never moves into them).
    """
    return AutogradPotential(functools.partial(energy_model.torch_reduced_energy, unit=unit))


class FlowDensity:
    """The flow's exact log-density at arbitrary points, by integrating x back to the latent z.

    log q(x) = log q0(z) - int_0^1 div v dt, with z and the integral from one backward solve
    (``integrate(dyn, x, t0=1, t1=0, likelihood=True)``, whose dlogp is -int_0^1 div v dt) and q0 the
    normalised mean-free ``prior`` (scaled as the latents of the samples were). Points are evaluated in
    chunks of ``batch_size`` in the dtype and on the device of ``dtype``/``device`` (default: those of the
    EGNN behind ``dyn``, else float32 on the CPU); results are float64 on the input's device. ``nfe``
    counts the solver's function evaluations.
    """

    def __init__(self, dyn: Dynamics, prior: MeanFreeGaussian, *, solver: SolverConfig | None = None,
                 batch_size: int = 256, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        egnn = getattr(dyn, "egnn", None)
        weight = egnn.embedding.weight if egnn is not None else None
        self.dyn, self.prior, self.solver, self.batch_size = dyn, prior, solver or SolverConfig(), batch_size
        self.dtype = dtype or (weight.dtype if weight is not None else torch.float32)
        self.device = torch.device(device) if device is not None else (
            weight.device if weight is not None else torch.device("cpu"))
        self.nfe = 0

    def log_prob_from_sampling(self, prior_energy: Tensor, dlogp: Tensor) -> Tensor:
        """log q of the flow's own samples from what ``tbg.flow.sample`` stores (prior_energy = -log q0(z)
        but for the standard normal's constant, see ``MeanFreeGaussian.energy``; dlogp = int_0^1 div v dt
        of the forward solve), in the same normalisation as ``log_prob``."""
        pe = torch.as_tensor(prior_energy, dtype=torch.float64)
        dl = torch.as_tensor(dlogp, dtype=torch.float64)
        return -pe - 0.5 * self.prior.subspace_dim * math.log(2 * math.pi) - dl

    def _chunk(self, x: Tensor, differentiable: bool) -> Tensor:
        xc = x.to(device=self.device, dtype=self.dtype)
        res = integrate(self.dyn, xc, t0=1.0, t1=0.0, likelihood=True, solver=self.solver,
                        differentiable=differentiable)
        self.nfe += res.nfe_divergence
        return self.prior.log_prob(res.x).to(torch.float64) + res.dlogp.to(torch.float64)

    def log_prob(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            parts = [self._chunk(x[s:s + self.batch_size], False) for s in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts).to(x.device) if parts else torch.zeros(0, dtype=torch.float64, device=x.device)

    def log_prob_and_gradient(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log q(x) and d log q / dx by backpropagating through the solver's steps and the divergence
        (several times the cost of ``log_prob`` and memory for the whole path of each chunk)."""
        values, grads = [], []
        for s in range(0, x.shape[0], self.batch_size):
            with torch.enable_grad():
                xr = x[s:s + self.batch_size].detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
                lp = self._chunk(xr, True)
                (g,) = torch.autograd.grad(lp.sum(), xr)
            values.append(lp.detach())
            grads.append(g)
        return torch.cat(values).to(x.device), torch.cat(grads).to(device=x.device, dtype=x.dtype)


def mean_free_projection(n_atoms: int, spatial_dim: int = 3) -> Callable[[Tensor], Tensor]:
    """Projection of flat [n, N * spatial_dim] vectors onto the mean-free subspace (zero centre of
    mass), where the flow and its prior live; MCMC moves of molecules use it for noise and drift."""
    prior = MeanFreeGaussian(n_atoms, spatial_dim)
    return prior.center


@dataclass
class Costs:
    """What a refinement run spent. Energies and likelihoods are counted per sample (a batch of 100 is
    100 evaluations); ``flow_nfe`` counts batched ODE function evaluations of the likelihood solves."""

    n_proposals: int = 0  # flow samples drawn (given to the run)
    energy_evaluations: int = 0  # u(x), with or without gradient
    gradient_evaluations: int = 0  # of those, with the gradient (forces)
    likelihood_evaluations: int = 0  # log q(x) by a backward solve
    likelihood_gradient_evaluations: int = 0  # of those, with d log q / dx
    flow_nfe: int = 0
    wall_time_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ParticleState:
    """Particles and what is known at them. log_q (and grad_log_q) are None where not needed."""

    x: Tensor
    u: Tensor
    grad_u: Tensor
    log_q: Tensor | None = None
    grad_log_q: Tensor | None = None

    def take(self, index: Tensor) -> ParticleState:
        return ParticleState(*(None if v is None else v[index] for v in
                               (self.x, self.u, self.grad_u, self.log_q, self.grad_log_q)))

    def replace(self, mask: Tensor, rows: ParticleState) -> ParticleState:
        """A copy with the particles where mask is True replaced by ``rows`` (one row per True entry);
        fields missing in either become None."""
        def put(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return None
            out = a.clone()
            out[mask] = b.to(out.dtype)
            return out
        return ParticleState(put(self.x, rows.x), put(self.u, rows.u), put(self.grad_u, rows.grad_u),
                             put(self.log_q, rows.log_q), put(self.grad_log_q, rows.grad_log_q))

    def where(self, mask: Tensor, other: ParticleState) -> ParticleState:
        """Per particle: ``other`` where mask is True, else self (fields missing in either become None)."""
        def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return None
            m = mask.reshape(-1, *([1] * (a.dim() - 1)))
            return torch.where(m, b, a)
        return ParticleState(pick(self.x, other.x), pick(self.u, other.u), pick(self.grad_u, other.grad_u),
                             pick(self.log_q, other.log_q), pick(self.grad_log_q, other.grad_log_q))


class AnnealingPath:
    """The geometric path log pi_beta = (1 - beta) log q - beta u between the flow's density q and
    p ~ exp(-u), with cost counting.

    ``drift`` is the direction Langevin proposals follow (any choice keeps MALA exact; it only changes
    acceptance): "energy" uses -du/dx at every beta (exact at beta = 1, a surrogate for d log q / dx
    elsewhere that is good where the flow is close to p, and needs no gradient of the flow), "exact" uses
    the true gradient (1 - beta) d log q / dx - beta du/dx (backpropagation through the flow's solve).
    ``project`` maps vectors onto the space the particles live in (``mean_free_projection`` for molecules;
    None for plain R^D).
    """

    def __init__(self, potential: Potential, density: Density | None = None, *, drift: Drift = "energy",
                 project: Callable[[Tensor], Tensor] | None = None, costs: Costs | None = None) -> None:
        if drift not in ("energy", "exact"):
            raise ValueError(f"drift must be 'energy' or 'exact', got {drift!r}")
        if drift == "exact" and density is not None and not callable(getattr(density, "log_prob_and_gradient", None)):
            raise TypeError("drift='exact' needs a density with log_prob_and_gradient")
        self.potential, self.density, self.drift_kind, self.project = potential, density, drift, project
        self.costs = costs if costs is not None else Costs()
        # The clock continues from the wall time ``costs`` already holds (a resumed run adds its sessions).
        self._t0 = time.perf_counter() - self.costs.wall_time_s

    def stop_clock(self) -> Costs:
        """Costs with the wall time since this path was made (plus what the given costs held then)."""
        self.costs.wall_time_s = time.perf_counter() - self._t0
        return self.costs

    def _project(self, v: Tensor) -> Tensor:
        return v if self.project is None else self.project(v)

    def needs_density(self, beta: float) -> bool:
        return beta < 1.0

    def log_q(self, x: Tensor) -> Tensor:
        if self.density is None:
            raise ValueError("this step needs the flow's density (beta < 1), but no density was given")
        self.costs.likelihood_evaluations += x.shape[0]
        nfe0 = getattr(self.density, "nfe", 0)
        out = self.density.log_prob(x).to(torch.float64)
        self.costs.flow_nfe += getattr(self.density, "nfe", 0) - nfe0
        return out

    def _density_terms(self, x: Tensor, beta: float, log_q: Tensor | None,
                       grad_log_q: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(log q, d log q / dx) as moves at ``beta`` need them, computing only what is missing."""
        if not self.needs_density(beta):
            return log_q, grad_log_q
        if self.drift_kind == "exact" and grad_log_q is None:
            if self.density is None:
                raise ValueError("drift='exact' at beta < 1 needs the flow's density")
            n = x.shape[0]
            self.costs.likelihood_evaluations += n
            self.costs.likelihood_gradient_evaluations += n
            nfe0 = getattr(self.density, "nfe", 0)
            log_q, grad_log_q = self.density.log_prob_and_gradient(x)
            self.costs.flow_nfe += getattr(self.density, "nfe", 0) - nfe0
            return log_q.to(torch.float64), grad_log_q
        return (self.log_q(x) if log_q is None else log_q), grad_log_q

    def evaluate(self, x: Tensor, beta: float, log_q: Tensor | None = None) -> ParticleState:
        """State at x for moves targeting pi_beta: u and its gradient, log q (unless given) when beta < 1,
        and d log q / dx for drift="exact" at beta < 1."""
        n = x.shape[0]
        self.costs.energy_evaluations += n
        self.costs.gradient_evaluations += n
        u, grad_u = self.potential.energy_and_gradient(x)
        u = u.to(torch.float64)
        if u.shape != (n,) or grad_u.shape != x.shape:
            raise ValueError(f"the potential returned u {tuple(u.shape)} and gradient {tuple(grad_u.shape)} for "
                             f"x {tuple(x.shape)}")
        if torch.isnan(u).any() or torch.isneginf(u).any():
            raise ValueError("the potential returned NaN or -inf energies (use +inf for broken samples)")
        return ParticleState(x, u, grad_u, *self._density_terms(x, beta, log_q, None))

    def prepare(self, state: ParticleState, beta: float) -> ParticleState:
        """``state`` completed with what moves at ``beta`` need and it lacks (log q, d log q / dx)."""
        return ParticleState(state.x, state.u, state.grad_u,
                             *self._density_terms(state.x, beta, state.log_q, state.grad_log_q))

    def log_target(self, state: ParticleState, beta: float) -> Tensor:
        """log pi_beta at the particles, beta in (0, 1] (-inf where u is +inf)."""
        log_p = -state.u
        if beta >= 1.0:
            return log_p
        if state.log_q is None:
            raise ValueError("log pi_beta at beta < 1 needs log q of the particles")
        if not beta > 0:
            raise ValueError(f"moves need beta in (0, 1], got {beta}")
        return (1.0 - beta) * state.log_q + beta * log_p

    def drift(self, state: ParticleState, beta: float) -> Tensor:
        """Proposal direction at the particles, projected; zero where the gradient is not finite."""
        g = -state.grad_u
        if self.drift_kind == "exact" and self.needs_density(beta):
            g = (1.0 - beta) * state.grad_log_q + beta * g
        g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        return self._project(g)

    def noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        xi = torch.randn(like.shape, generator=generator, dtype=like.dtype,
                         device=generator.device if generator is not None else like.device)
        return self._project(xi.to(like.device))
