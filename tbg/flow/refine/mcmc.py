"""Exact MCMC with the flow as proposal: independence Metropolis-Hastings, optionally with local moves.

The flow's samples are independent draws from q. An independence sampler proposes the next one, x', and
accepts it with probability min(1, w(x') / w(x)), w = exp(-u - log q) the importance weight (any
constant factor cancels), which leaves p ~ exp(-u) invariant. Unlike reweighting it yields an unweighted
chain; its efficiency is governed by the same weights (a chain stays stuck on a sample of unusually large
weight), which the acceptance rate and the autocorrelation ESS below make visible.

With ``local_steps > 0`` every independence step is followed by that many MALA steps targeting p alone.
Both kernels leave p invariant, so their alternation does too; the local moves explore a basin while the
independence steps jump between basins. The price: after a local move the current state is no longer one
of the flow's samples, so the next independence step needs log q there, one backward solve of the flow
(``FlowDensity``) per chain and step.

The proposals are dealt round-robin to ``n_chains`` parallel chains (chain c gets c, c + C, c + 2C, ...;
a remainder of fewer than C proposals is left out); each chain starts at its first proposal, i.e. from q,
so ``burn_in`` steps are discarded. Step sizes of the local moves adapt during burn-in only, so the
recorded chain is exact MCMC.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tbg.flow.refine.mala import adapt_step_size, mala_step
from tbg.flow.refine.resampling import seeded_generator
from tbg.flow.refine.targets import AnnealingPath, Costs, Density, ParticleState, Potential

log = logging.getLogger("tbg")

__all__ = ["MCMCCheckpoint", "MCMCConfig", "MCMCResult", "independence_metropolis", "integrated_autocorrelation_time"]


@dataclass
class MCMCConfig:
    """Options of ``independence_metropolis``; step sizes in squared flow coordinates (see ``SMCConfig``)."""

    n_chains: int = 1
    burn_in: int = 0
    local_steps: int = 0
    step_size: float = 1e-3
    adapt_step_size: bool = True
    target_acceptance: float = 0.57
    adaptation_gain: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_chains < 1 or self.burn_in < 0 or self.local_steps < 0:
            raise ValueError(f"need n_chains >= 1, burn_in >= 0, local_steps >= 0, got {self.n_chains}, "
                             f"{self.burn_in}, {self.local_steps}")
        if not self.step_size > 0 or not 0.0 < self.target_acceptance < 1.0:
            raise ValueError(f"need step_size > 0 and target_acceptance in (0, 1), got {self.step_size}, "
                             f"{self.target_acceptance}")


@dataclass
class MCMCResult:
    """The recorded chains (after burn-in), shaped [C, L]:

    source: index of the proposal each state is (or, after local moves, descends from);
    u: the states' reduced energies; states [C, L, D]: the states themselves (only with local moves;
    otherwise they are the proposals at ``source``); acceptance: independence-step acceptance rate;
    local_acceptance: mean MALA acceptance (NaN without local moves); n_unique: distinct proposals visited;
    iat: integrated autocorrelation time of u (steps), ess = C L / iat (in samples, at most C L);
    costs: what this call evaluated (the proposals' given u and log q not included)."""

    source: Tensor
    u: Tensor
    states: Tensor | None
    acceptance: float
    local_acceptance: float
    n_unique: int
    iat: float
    ess: float
    costs: Costs


def integrated_autocorrelation_time(trace: np.ndarray | Tensor, window_factor: float = 5.0) -> float:
    """Integrated autocorrelation time tau = 1 + 2 sum_k rho_k of a scalar trace [C, L] (or [L]).

    rho_k is the autocovariance at lag k about the grand mean, averaged over chains and divided by its lag-0
    value, so chains stuck at different levels count as correlated. The sum is cut at the first lag M with
    M >= window_factor * tau(M) (Sokal's automatic window). tau is at least 1; a constant trace gives L
    (one effective sample per chain).
    """
    f = np.asarray(trace.cpu() if isinstance(trace, Tensor) else trace, dtype=np.float64)
    f = f[None] if f.ndim == 1 else f
    if f.ndim != 2 or f.shape[1] < 2:
        raise ValueError(f"trace must be [C, L >= 2] or [L >= 2], got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("trace contains NaN/inf")
    n_chains, length = f.shape
    centred = f - f.mean()
    if not np.any(centred):
        return float(length)
    size = 1 << (2 * length - 1).bit_length()  # zero padding: linear, not circular, correlation
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :length].mean(0) / length
    rho = acov / acov[0]
    taus = 1.0 + 2.0 * np.cumsum(rho[1:])
    lags = np.arange(1, length)
    cut = np.flatnonzero(lags >= window_factor * taus)
    tau = taus[cut[0]] if len(cut) else taus[-1]
    return float(max(tau, 1.0))


@dataclass
class MCMCCheckpoint:
    """Where ``independence_metropolis`` stands after step ``t - 1`` of every chain: enough to continue
    exactly (``resume=``), the random generator's state included. ``current`` [C] are the chains' proposal
    indices, ``cur_log_w`` [C] their log weights, ``particles`` their states (with local moves), the
    recorded arrays are filled up to step t, ``counts`` holds the acceptance counters."""

    config: MCMCConfig
    t: int
    current: Tensor
    cur_log_w: Tensor
    particles: ParticleState | None
    step_size: float
    source: Tensor
    u_trace: Tensor
    states: Tensor | None
    counts: dict[str, int]
    costs: Costs
    generator_state: Tensor

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-ready values) that ``from_arrays`` turns back into this checkpoint."""
        arrays = {"current": self.current.numpy(), "cur_log_w": self.cur_log_w.numpy(), "source": self.source.numpy(),
                  "u_trace": self.u_trace.numpy(), "generator_state": self.generator_state.numpy()}
        if self.states is not None:
            arrays["states"] = self.states.numpy()
        if self.particles is not None:
            arrays |= {"x": self.particles.x.numpy(), "u": self.particles.u.numpy(),
                       "grad_u": self.particles.grad_u.numpy()}
        meta = {"config": asdict(self.config), "t": self.t, "step_size": self.step_size, "counts": self.counts,
                "costs": self.costs.as_dict()}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> MCMCCheckpoint:
        def tensor(name: str) -> Tensor | None:
            return torch.from_numpy(np.array(arrays[name])) if name in arrays else None

        particles = ParticleState(tensor("x"), tensor("u"), tensor("grad_u")) if "x" in arrays else None
        return cls(config=MCMCConfig(**meta["config"]), t=meta["t"], current=tensor("current"),
                   cur_log_w=tensor("cur_log_w"), particles=particles, step_size=meta["step_size"],
                   source=tensor("source"), u_trace=tensor("u_trace"), states=tensor("states"),
                   counts=dict(meta["counts"]), costs=Costs(**meta["costs"]),
                   generator_state=tensor("generator_state"))


def independence_metropolis(log_q: Tensor, reduced_energy: Tensor, *, samples: Tensor | None = None,
                            potential: Potential | None = None, density: Density | None = None,
                            config: MCMCConfig | None = None,
                            project: Callable[[Tensor], Tensor] | None = None,
                            resume: MCMCCheckpoint | None = None,
                            on_step: Callable[[MCMCCheckpoint], None] | None = None) -> MCMCResult:
    """Independence Metropolis-Hastings over the flow's samples (see the module docstring).

    log_q [n] and reduced_energy [n] of the proposals, in the order they were drawn (u = +inf for broken
    samples; a chain only starts on one if its first proposals are all broken, and leaves it at the
    first acceptable proposal). Without local moves nothing else is needed. With ``config.local_steps > 0``
    also the proposals ``samples`` [n, D], the ``potential``, the flow's ``density`` (log q after local
    moves, in the normalisation of ``log_q``) and, for molecules, ``project`` (``mean_free_projection``).

    Stopping and resuming: ``on_step(checkpoint)`` is called after every step of the chains (the checkpoint
    is live: copy what you keep); ``resume=checkpoint`` continues such a run with the same inputs and gives
    the result of the uninterrupted run (costs and wall time add up over the sessions).
    """
    cfg = config or MCMCConfig()
    lq = torch.as_tensor(log_q, dtype=torch.float64).reshape(-1)
    u_all = torch.as_tensor(reduced_energy, dtype=torch.float64).reshape(-1)
    if lq.shape != u_all.shape:
        raise ValueError(f"log_q has shape {tuple(lq.shape)}, reduced_energy {tuple(u_all.shape)}")
    if not torch.isfinite(lq).all() or torch.isnan(u_all).any() or torch.isneginf(u_all).any():
        raise ValueError("log_q must be finite and reduced_energy free of NaN and -inf")
    chains = cfg.n_chains
    length = lq.numel() // chains
    if length <= cfg.burn_in + 1:
        raise ValueError(f"{lq.numel()} proposals give {length} steps per chain for {chains} chains, not more "
                         f"than burn_in + 1 = {cfg.burn_in + 1}")
    if lq.numel() % chains:
        log.warning("%d proposals left out (not a multiple of %d chains)", lq.numel() % chains, chains)
    local = cfg.local_steps > 0
    if local and (samples is None or potential is None or density is None):
        raise ValueError("local moves need samples, potential and density")
    log_w_all = -u_all - lq  # -inf for broken proposals

    start = time.perf_counter()
    generator = seeded_generator(cfg.seed, "mcmc")
    order = torch.arange(chains * length).reshape(length, chains)  # order[t, c]: chain c's proposal t
    x_all = samples.detach().to(torch.float64) if local else None
    recorded = length - cfg.burn_in
    if resume is not None:
        if asdict(resume.config) != asdict(cfg) or tuple(resume.source.shape) != (chains, recorded):
            raise ValueError(f"the checkpoint is of another MCMC run ({resume.config}, {tuple(resume.source.shape)} "
                             f"recorded states; now {cfg}, {(chains, recorded)})")
        run, costs = resume, resume.costs
        start -= costs.wall_time_s
        generator.set_state(resume.generator_state)
    else:
        costs = Costs(n_proposals=chains * length)
        current = order[0].clone()
        run = MCMCCheckpoint(
            config=cfg, t=0, current=current, cur_log_w=log_w_all[current].clone(), particles=None,
            step_size=cfg.step_size, source=torch.empty(chains, recorded, dtype=torch.long),
            u_trace=torch.empty(chains, recorded, dtype=torch.float64),
            states=torch.empty(chains, recorded, x_all.shape[1], dtype=torch.float64) if local else None,
            counts={"accepted": 0, "local_accepted": 0, "local": 0}, costs=costs, generator_state=generator.get_state())
    path = AnnealingPath(potential, density, project=project, costs=costs) if local else None
    if local and run.particles is None:
        run.particles = path.evaluate(x_all[run.current], 1.0)

    while run.t < length:
        t = run.t
        if t > 0:
            proposal = order[t]
            log_a = log_w_all[proposal] - run.cur_log_w
            # A chain on a broken state (weight 0) takes any proposal; broken proposals are never taken.
            log_a = torch.where(torch.isneginf(run.cur_log_w), torch.zeros_like(log_a), log_a)
            log_a = torch.where(torch.isneginf(log_w_all[proposal]), torch.full_like(log_a, -math.inf), log_a)
            accept = torch.log(torch.rand(chains, generator=generator, dtype=torch.float64)) < log_a
            run.current = torch.where(accept, proposal, run.current)
            run.cur_log_w = torch.where(accept, log_w_all[proposal], run.cur_log_w)
            if t >= cfg.burn_in:
                run.counts["accepted"] += int(accept.sum())
            if local and accept.any():  # the gradient at the newly taken proposals
                run.particles = run.particles.replace(accept, path.evaluate(x_all[proposal[accept]], 1.0))
        if local:
            moved = torch.zeros(chains, dtype=torch.bool)
            for _ in range(cfg.local_steps):
                run.particles, acc = mala_step(path, run.particles, 1.0, run.step_size, generator)
                moved |= acc
                if t < cfg.burn_in and cfg.adapt_step_size:
                    run.step_size = adapt_step_size(run.step_size, float(acc.to(torch.float64).mean()),
                                                    cfg.target_acceptance, cfg.adaptation_gain)
                elif t >= cfg.burn_in:
                    run.counts["local_accepted"] += int(acc.sum())
                    run.counts["local"] += chains
            if moved.any():
                run.cur_log_w = run.cur_log_w.clone()
                run.cur_log_w[moved] = -run.particles.u[moved] - path.log_q(run.particles.x[moved])
        if t >= cfg.burn_in:
            k = t - cfg.burn_in
            run.source[:, k] = run.current
            run.u_trace[:, k] = run.particles.u if local else u_all[run.current]
            if local:
                run.states[:, k] = run.particles.x
        run.t = t + 1
        if on_step is not None:
            costs.wall_time_s = time.perf_counter() - start
            run.generator_state = generator.get_state()
            on_step(run)

    u_trace = run.u_trace
    finite_trace = torch.isfinite(u_trace).all()
    iat = integrated_autocorrelation_time(u_trace) if recorded > 1 and finite_trace else math.nan
    if not finite_trace:
        log.warning("a recorded chain state has infinite energy (all its proposals so far were broken): no ESS")
    costs.wall_time_s = time.perf_counter() - start
    total = chains * recorded
    steps = chains * (recorded - 1 if cfg.burn_in == 0 else recorded)  # independence steps taken after burn-in
    n_local = run.counts["local"]
    result = MCMCResult(
        source=run.source, u=u_trace, states=run.states,
        acceptance=run.counts["accepted"] / steps if steps else math.nan,
        local_acceptance=run.counts["local_accepted"] / n_local if n_local else math.nan,
        n_unique=int(run.source.unique().numel()), iat=iat, ess=total / iat if math.isfinite(iat) else math.nan,
        costs=costs)
    log.info("independence MH: %d chains x %d steps, acceptance %.3f, local acceptance %.3f, %d distinct "
             "proposals, IAT %.3g, ESS %.1f", chains, recorded, result.acceptance, result.local_acceptance,
             result.n_unique, result.iat, result.ess)
    return result
