"""Integrating the flow dx/dt = v(t, x) with and without its log-determinant.

Everything here is written against the small ``Dynamics`` protocol (``dyn(t, x) -> v`` and
``dyn.divergence(t, x) -> (v, div)`` with x [B, D], div [B]), so the solver code is tested on toy fields
with analytic answers and used unchanged on ``tbg.nn.BoundDynamics``.

Two ways to get the exact log-likelihood of x(1) = flow(z):

* ``integrate(..., likelihood=True)`` (published): one ODE on the augmented state (x, l) with
  dl/dt = div v(t, x); the adaptive solver controls the error of both components, and every function
  evaluation pays for a divergence.
* ``decoupled_likelihood``: solve for x alone (cheap evaluations of v only), read x(t) at the K nodes of
  a composite Gauss-Legendre rule on [t0, t1] (``quadrature_rule``) from the solver's dense output
  (torchdiffeq interpolates inside its accepted steps, so asking for these times adds no evaluations),
  then l = sum_k w_k div v(t_k, x(t_k)): K divergences instead of one per stage. The residual error is
  measured in the benchmark (bench/bench_sampling.py against a tight joint solve).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torchdiffeq import odeint

from tbg.flow.profile import stage
from tbg.nn.reference import divergence_bruteforce

__all__ = [
    "Dynamics",
    "SolverConfig",
    "step_grid",
    "FlowResult",
    "integrate",
    "decoupled_likelihood",
    "AutogradDivergence",
    "as_dynamics",
]

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
FIXED = ("rk4", "midpoint", "euler")


@runtime_checkable
class Dynamics(Protocol):
    """A vector field on flat states x [B, D]."""

    def __call__(self, t: Tensor, x: Tensor) -> Tensor: ...

    def divergence(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]: ...


class AutogradDivergence:
    """Wrap a plain field ``f(t, x)`` with an exact divergence by one backward pass per coordinate.

    This is the published method's brute-force trace (``tbg.nn.reference.divergence_bruteforce``, here on
    flat states x [B, D]); it works for any differentiable field (toy fields in tests, custom fields) but
    costs D backward passes. Under grad mode the trace stays differentiable (training by energy).
    """

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.field = field

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        return self.field(t, x)

    def divergence(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        # The brute-force trace works on atoms (rows of 3 coordinates, one molecule per sample): pad D to
        # a multiple of 3 with coordinates the field does not see (their diagonal entries are 0).
        batch, dim = x.shape
        pad = -dim % 3
        mol_ptr = torch.arange(batch + 1, device=x.device) * ((dim + pad) // 3)

        def atoms_field(atoms: Tensor) -> Tensor:
            v = self.field(t, atoms.reshape(batch, dim + pad)[:, :dim])
            return torch.nn.functional.pad(v, (0, pad)).reshape(-1, 3)

        atoms = torch.nn.functional.pad(x, (0, pad)).reshape(-1, 3)
        v, div = divergence_bruteforce(atoms_field, atoms, mol_ptr, create_graph=torch.is_grad_enabled())
        return v.reshape(batch, dim + pad)[:, :dim], div


def as_dynamics(dyn: object) -> Dynamics:
    """``dyn`` itself if it has a ``divergence`` method, else wrapped in ``AutogradDivergence``."""
    if callable(getattr(dyn, "divergence", None)):
        return dyn  # type: ignore[return-value]
    if not callable(dyn):
        raise TypeError(f"dynamics must be callable as dyn(t, x), got {type(dyn).__name__}")
    return AutogradDivergence(dyn)


@dataclass
class SolverConfig:
    """ODE solver options. Adaptive methods use atol/rtol (published: dopri5, 1e-4); fixed-step
    methods (rk4, midpoint, euler) take ``n_steps`` steps, equal ones, or with ``panels`` (increasing
    times in (0, 1)) equal ones within each panel, the steps split evenly over the panels (``step_grid``)."""

    method: str = "dopri5"
    atol: float = 1e-4
    rtol: float = 1e-4
    n_steps: int = 20
    options: dict = field(default_factory=dict)
    panels: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ADAPTIVE + FIXED:
            raise ValueError(f"unknown ODE method {self.method!r}; choose from {ADAPTIVE + FIXED}")
        if self.method in FIXED and self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if self.atol <= 0 or self.rtol <= 0:
            raise ValueError(f"atol and rtol must be positive, got {self.atol}, {self.rtol}")
        self.panels = panel_boundaries(self.panels, "panels")
        if self.panels and self.method not in FIXED:
            raise ValueError(f"panels set the steps of a fixed-step method {FIXED}; {self.method!r} chooses its own")

    def odeint_kwargs(self, t0: float, t1: float) -> dict:
        if self.method in FIXED:
            if not self.panels:
                return {"method": self.method, "options": {"step_size": abs(t1 - t0) / self.n_steps, **self.options}}
            times = step_grid(self.n_steps, t0, t1, self.panels)
            return {"method": self.method, "options": {
                "grid_constructor": lambda func, y0, t: torch.as_tensor(times, dtype=t.dtype, device=t.device),
                **self.options}}
        return {"method": self.method, "atol": self.atol, "rtol": self.rtol, "options": dict(self.options)}

    def record(self) -> dict:
        """The options as run folders record them; ``panels`` only when set, so that records written before
        the option existed still describe the same solve."""
        rec = asdict(self)
        if not self.panels:
            rec.pop("panels")
        return rec


def panel_boundaries(values: Sequence[float], name: str) -> tuple[float, ...]:
    """``values`` as panel boundaries: increasing times in (0, 1), else a ValueError naming ``name``."""
    bounds = tuple(float(b) for b in values)
    if any(not 0 < b < 1 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"{name} must be increasing times in (0, 1), got {bounds}")
    return bounds


def _split(n: int, t0: float, t1: float, panels: Sequence[float]) -> list[tuple[float, float, int]]:
    """[min(t0, t1), max(t0, t1)] cut at the ``panels`` boundaries inside it, as (start, end, count) with n
    split evenly (the extra ones to the panels nearest t = 0); one panel when n is smaller than their number."""
    lo, hi = min(t0, t1), max(t0, t1)
    edges = [lo, *(b for b in sorted(panels) if lo < b < hi), hi]
    if n < len(edges) - 1:
        edges = [lo, hi]
    k = len(edges) - 1
    return [(a, b, n // k + (i < n % k)) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


def step_grid(n_steps: int, t0: float, t1: float, panels: Sequence[float] = ()) -> np.ndarray:
    """The n_steps + 1 times, from t0 to t1, of a fixed-step solve with equal steps within each panel.

    A trained field can change sharply near the prior end (see ``quadrature_rule``); there equal steps over
    [0, 1] leave a large error in both x and the log-likelihood, and an objective differentiated through
    the solve can fit that error instead of the flow. Panels such as (0.1, 0.3) put the steps where the
    field needs them."""
    if n_steps < 1:
        raise ValueError(f"need at least one step, got {n_steps}")
    parts = [np.linspace(a, b, m + 1)[:-1] for a, b, m in _split(n_steps, t0, t1, panels)]
    times = np.concatenate([*parts, [max(t0, t1)]])
    return times if t1 >= t0 else times[::-1].copy()


@dataclass
class FlowResult:
    """x(t1) [B, D]; dlogp = int_{t0}^{t1} div v dt [B] (None without likelihood); evaluation counts."""

    x: Tensor
    dlogp: Tensor | None
    nfe_velocity: int = 0
    nfe_divergence: int = 0


class _Counted:
    """The ODE right-hand sides, counting evaluations (and timing them as the stages "field" and
    "divergence" when a ``tbg.flow.profile`` profiler is active)."""

    def __init__(self, dyn: Dynamics) -> None:
        self.dyn, self.nfe_velocity, self.nfe_divergence = dyn, 0, 0

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe_velocity += 1
        with stage("field"):
            return self.dyn(t, x)

    def augmented(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        v, div = self.divergence(t, state[0])
        return v, div.to(state[1].dtype)

    def divergence(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        self.nfe_divergence += 1
        with stage("divergence"):
            return self.dyn.divergence(t, x)


def _check_state(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"the flow state must be [B, D], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the initial state contains NaN or inf")


def integrate(dyn: Dynamics | object, x0: Tensor, *, t0: float = 0.0, t1: float = 1.0, likelihood: bool = True,
              solver: SolverConfig | None = None, differentiable: bool = False) -> FlowResult:
    """Solve dx/dt = v from t0 to t1 (t1 < t0 integrates backwards), jointly with
    dlogp = int_{t0}^{t1} div v dt when ``likelihood``. Runs without building autograd graphs unless
    ``differentiable`` (training by energy: backpropagation through the solver's steps; the field's
    divergence must then be differentiable, e.g. the EGNN's reference path or Hutchinson)."""
    solver = solver or SolverConfig()
    _check_state(x0)
    rhs = _Counted(as_dynamics(dyn) if likelihood else dyn)
    ts = torch.tensor([t0, t1], dtype=x0.dtype, device=x0.device)
    kw = solver.odeint_kwargs(t0, t1)
    with torch.set_grad_enabled(differentiable):
        if likelihood:
            l0 = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
            xs, ls = odeint(rhs.augmented, (x0, l0), ts, **kw)
            x, dlogp = xs[-1], ls[-1]
        else:
            x, dlogp = odeint(rhs.velocity, x0, ts, **kw)[-1], None
    return FlowResult(x, dlogp, rhs.nfe_velocity, rhs.nfe_divergence)


def gauss_legendre(n_nodes: int, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [t0, t1] (signed: t1 < t0 flips the sign)."""
    if n_nodes < 1:
        raise ValueError(f"need at least one quadrature node, got {n_nodes}")
    u, w = np.polynomial.legendre.leggauss(n_nodes)
    return t0 + (u + 1) * (t1 - t0) / 2, w * (t1 - t0) / 2


def quadrature_rule(n_nodes: int, t0: float, t1: float,
                    panels: Sequence[float] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and signed weights of the decoupled likelihood's rule on [t0, t1]: Gauss-Legendre on each panel
    between the ``panels`` boundaries (absolute t) that lie inside the interval, ``n_nodes`` split evenly
    (the extra ones to the panels nearest t = 0); one panel when there are fewer nodes than panels.

    Without boundaries this is one Gauss-Legendre rule, which converges fastest for a divergence that is
    smooth in t. A trained field's divergence can instead change sharply near the prior end (t -> 0, where
    Gaussian noise can put atoms close together); there, boundaries such as (0.1, 0.3) put the nodes where
    they are needed (a third of the error at the same cost on the shipped alanine-dipeptide model)."""
    if n_nodes < 1:
        raise ValueError(f"need at least one quadrature node, got {n_nodes}")
    rules = [gauss_legendre(m, a, b) for a, b, m in _split(n_nodes, t0, t1, panels)]
    nodes, weights = np.concatenate([r[0] for r in rules]), np.concatenate([r[1] for r in rules])
    return nodes, weights if t1 >= t0 else -weights


def decoupled_likelihood(dyn: Dynamics | object, x0: Tensor, *, n_nodes: int = 16, t0: float = 0.0,
                         t1: float = 1.0, solver: SolverConfig | None = None,
                         panels: Sequence[float] = ()) -> FlowResult:
    """Flow x0 from t0 to t1 and approximate dlogp by quadrature of div v along the solver's dense-output
    path at the ``n_nodes`` nodes of ``quadrature_rule`` with panel boundaries ``panels`` (see module
    docstring)."""
    solver = solver or SolverConfig()
    _check_state(x0)
    rhs = _Counted(as_dynamics(dyn))
    nodes, weights = quadrature_rule(n_nodes, t0, t1, panels)
    order = np.argsort(nodes) if t1 > t0 else np.argsort(-nodes)
    ts = torch.tensor(np.concatenate([[t0], nodes[order], [t1]]), dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        path = odeint(rhs.velocity, x0, ts, **solver.odeint_kwargs(t0, t1))
        dlogp = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for k, i in enumerate(order):
            _, div = rhs.divergence(ts[k + 1], path[k + 1])
            dlogp = dlogp + float(weights[i]) * div.to(dlogp.dtype)
    return FlowResult(path[-1], dlogp, rhs.nfe_velocity, rhs.nfe_divergence)
