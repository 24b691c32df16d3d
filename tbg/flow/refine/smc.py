"""Sequential Monte Carlo from the flow's samples to the Boltzmann distribution.

Particles start as the flow's samples x_i ~ q with equal weights and follow the geometric path
pi_beta ~ q^(1 - beta) exp(-u)^beta (``AnnealingPath``) from beta = 0 to 1. Each stage

1. picks the next beta (adaptively: the largest step whose conditional ESS stays at ``target_cess``;
   or from a fixed schedule),
2. multiplies the weights by pi_beta'(x) / pi_beta(x) = exp((beta' - beta)(-u(x) - log q(x))),
3. resamples (systematic) when the Kish ESS falls below ``resample_threshold``,
4. moves every particle by ``n_moves`` MALA steps that leave pi_beta' invariant, adapting the step size
   toward ``target_acceptance`` between steps from the population's acceptance.

The weighted particles at beta = 1 estimate expectations under p; the running sum of
log sum_i W_i exp(...) estimates log(Z_p / Z_q), Z_p = int exp(-u) (Z_q = 1 for the normalised flow).

Two schemes run through this same code:

* ``schedule="adaptive"`` (annealed SMC): moves at intermediate beta need log q at every proposal, i.e.
  one backward solve of the flow with the exact divergence per proposal (``FlowDensity``).
* ``schedule="resample_move"``: one jump from q to p (plain importance weights), resampling, then moves
  that target exp(-u) alone, so the flow's density is needed only for the initial samples (and it is
  free when the sampler's log q is given).

``SMCResult.costs`` counts energy/gradient evaluations, likelihood evaluations and wall time, so the two
can be compared with plain importance sampling at equal cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from tbg.flow.refine.mala import adapt_step_size, mala_step
from tbg.flow.refine.resampling import conditional_ess, next_beta, seeded_generator, systematic_resample
from tbg.flow.refine.targets import AnnealingPath, Costs, Density, Drift, ParticleState, Potential
from tbg.flow.reweight import kish_ess

log = logging.getLogger("tbg")

__all__ = ["SMCCheckpoint", "SMCConfig", "SMCStage", "SMCResult", "smc"]

Schedule = Literal["adaptive", "resample_move"] | Sequence[float]


@dataclass
class SMCConfig:
    """Options of ``smc``.

    schedule: "adaptive" (beta steps by conditional ESS), "resample_move" (beta 0 -> 1 in one step), or an
        explicit increasing sequence of betas in (0, 1] ending at 1.
    target_cess: conditional ESS kept per adaptive step (fraction; higher = more, smaller steps).
    resample_threshold: resample when the Kish ESS fraction drops below this (1 = every stage).
    n_moves: MALA steps per stage (the only steps of the resample-move scheme).
    step_size: initial MALA step size tau, in squared flow coordinates (model units for molecules; for
        alanine dipeptide at beta = 1, tau = 1e-3 gives ~0.65 acceptance, 3e-3 almost none).
    target_acceptance, adaptation_gain: step-size adaptation (``adapt_step_size``); adapt_step_size=False
        keeps tau fixed.
    drift: "energy" or "exact" (see ``AnnealingPath``).
    energy_cutoff: optional tail treatment: initial samples with u above it (kT) get weight 0 (biased
        unless p has no mass there; report it beside an untreated run).
    max_stages: the adaptive schedule jumps to beta = 1 (with a warning) after this many stages.
    """

    schedule: Schedule = "adaptive"
    target_cess: float = 0.9
    resample_threshold: float = 0.5
    n_moves: int = 5
    step_size: float = 1e-3
    adapt_step_size: bool = True
    target_acceptance: float = 0.57
    adaptation_gain: float = 1.0
    drift: Drift = "energy"
    energy_cutoff: float | None = None
    max_stages: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            if self.schedule not in ("adaptive", "resample_move"):
                raise ValueError(f"schedule must be 'adaptive', 'resample_move' or a sequence of betas, got "
                                 f"{self.schedule!r}")
        else:
            betas = [float(b) for b in self.schedule]
            if not betas or betas[-1] != 1.0 or any(b <= a for a, b in zip([0.0, *betas], betas)):
                raise ValueError(f"an explicit schedule must increase strictly from above 0 to exactly 1, got {betas}")
            self.schedule = tuple(betas)
        if not 0.0 < self.target_cess < 1.0:
            raise ValueError(f"target_cess must be in (0, 1), got {self.target_cess}")
        if not 0.0 <= self.resample_threshold <= 1.0:
            raise ValueError(f"resample_threshold must be in [0, 1], got {self.resample_threshold}")
        if self.n_moves < 0 or self.max_stages < 1:
            raise ValueError(f"need n_moves >= 0 and max_stages >= 1, got {self.n_moves}, {self.max_stages}")
        if not self.step_size > 0 or not 0.0 < self.target_acceptance < 1.0:
            raise ValueError(f"need step_size > 0 and target_acceptance in (0, 1), got {self.step_size}, "
                             f"{self.target_acceptance}")
        if self.drift not in ("energy", "exact"):
            raise ValueError(f"drift must be 'energy' or 'exact', got {self.drift!r}")


@dataclass
class SMCStage:
    """One stage of the run (the per-step log). ``ess`` is the Kish ESS fraction after reweighting and
    before resampling; ``acceptance`` the mean MALA acceptance of the stage's moves (NaN without moves);
    ``step_size`` the tau its last move used; ``log_normalizer`` the running log(Z_p/Z_q) estimate;
    ``unique_ancestors`` how many of the initial samples still have descendants; the evaluation counts are
    cumulative."""

    beta: float
    ess: float
    cess: float
    resampled: bool
    acceptance: float
    step_size: float
    log_normalizer: float
    unique_ancestors: int
    energy_evaluations: int
    likelihood_evaluations: int


@dataclass
class SMCResult:
    """Weighted particles at beta = 1: x [n, D] (float64), log_w [n] (unnormalised, -inf = weight 0),
    u [n] their reduced energies, ancestors [n] (index of the initial sample each descends from),
    log_normalizer (estimate of log Z_p - log Z_q), the per-stage log, costs and the config used."""

    x: Tensor
    log_w: Tensor
    u: Tensor
    ancestors: Tensor
    log_normalizer: float
    stages: list[SMCStage]
    costs: Costs
    config: SMCConfig

    @property
    def ess(self) -> float:
        """Kish ESS fraction of the final weights."""
        return kish_ess(self.log_w)

    def resample(self, n: int | None = None, seed: int = 0) -> Tensor:
        """Indices of n equally weighted particles (systematic resampling of the final weights)."""
        return systematic_resample(self.log_w, n, generator=seeded_generator(seed, "resample"))

    def log_dict(self) -> list[dict[str, float]]:
        return [asdict(s) for s in self.stages]



@dataclass
class SMCCheckpoint:
    """Where an SMC run stands after one of its steps (a stage's reweighting and resampling, or one MALA
    move): everything ``smc(..., resume=)`` needs to continue it exactly as if it had not stopped, the
    random generator's state included.

    ``beta`` is the current stage's; ``moves_left`` its MALA moves still to do (0: the stage is complete);
    ``current`` its ESS, CESS and whether it resampled; ``accepted`` the acceptance of its moves so far;
    ``step_size`` the tau of the next move and ``last_step_size`` the one the last move used."""

    config: SMCConfig
    particles: ParticleState
    log_w: Tensor
    ancestors: Tensor
    beta: float
    step_size: float
    last_step_size: float
    log_normalizer: float
    moves_left: int
    current: dict[str, Any]
    accepted: list[float]
    stages: list[SMCStage]
    costs: Costs
    generator_state: Tensor

    @property
    def finished(self) -> bool:
        return self.beta >= 1.0 and self.moves_left == 0

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-ready values) that ``from_arrays`` turns back into this checkpoint (e.g. an .npz
        and a JSON text)."""
        arrays = {name: getattr(self.particles, name).cpu().numpy() for name in _PARTICLE_FIELDS
                  if getattr(self.particles, name) is not None}
        arrays |= {"log_w": self.log_w.cpu().numpy(), "ancestors": self.ancestors.cpu().numpy(),
                   "generator_state": self.generator_state.numpy()}
        meta = {"config": asdict(self.config), "beta": self.beta, "step_size": self.step_size,
                "last_step_size": self.last_step_size, "log_normalizer": self.log_normalizer,
                "moves_left": self.moves_left, "current": self.current, "accepted": self.accepted,
                "stages": [asdict(s) for s in self.stages], "costs": self.costs.as_dict()}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> SMCCheckpoint:
        config = dict(meta["config"])
        if not isinstance(config["schedule"], str):
            config["schedule"] = tuple(config["schedule"])
        particles = ParticleState(*(torch.from_numpy(np.array(arrays[name])) if name in arrays else None
                                    for name in _PARTICLE_FIELDS))
        return cls(config=SMCConfig(**config), particles=particles, log_w=torch.from_numpy(np.array(arrays["log_w"])),
                   ancestors=torch.from_numpy(np.array(arrays["ancestors"])), beta=meta["beta"],
                   step_size=meta["step_size"], last_step_size=meta["last_step_size"],
                   log_normalizer=meta["log_normalizer"], moves_left=meta["moves_left"],
                   current=dict(meta["current"]), accepted=list(meta["accepted"]),
                   stages=[SMCStage(**s) for s in meta["stages"]], costs=Costs(**meta["costs"]),
                   generator_state=torch.from_numpy(np.array(arrays["generator_state"])))


_PARTICLE_FIELDS = ("x", "u", "grad_u", "log_q", "grad_log_q")


def _betas(config: SMCConfig) -> Callable[[int, float, Tensor, Tensor], float]:
    """The rule giving stage k's beta from the current beta, log weights and increments."""
    if config.schedule == "adaptive":
        def adaptive(k: int, beta: float, log_w: Tensor, increment: Tensor) -> float:
            if k + 1 >= config.max_stages:
                log.warning("SMC reached max_stages=%d at beta=%.4g: jumping to beta=1", config.max_stages, beta)
                return 1.0
            return next_beta(beta, log_w, increment, config.target_cess)
        return adaptive
    fixed = (1.0,) if config.schedule == "resample_move" else tuple(config.schedule)
    return lambda k, beta, log_w, increment: fixed[k]


def _start(path: AnnealingPath, x: Tensor, log_q: Tensor, cfg: SMCConfig, generator: torch.Generator) -> SMCCheckpoint:
    """The run before its first stage: u and its gradient at the samples, broken ones (and those above the
    energy cutoff) at weight 0."""
    n = x.shape[0]
    state = path.evaluate(x, 1.0)  # u and its gradient; the density terms follow per stage
    state = ParticleState(state.x, state.u, state.grad_u, log_q)
    alive = torch.isfinite(state.u)
    if cfg.energy_cutoff is not None:
        alive &= state.u <= cfg.energy_cutoff
    if not alive.any():
        raise ValueError("no sample has a finite energy (below the energy cutoff)")
    # Broken samples (u = +inf) have weight 0 under every pi_beta with beta > 0: drop them up front
    # so that they do not stall the adaptive schedule; they are part of the normaliser estimate.
    log_w = torch.where(alive, 0.0, -math.inf).to(torch.float64)
    return SMCCheckpoint(config=cfg, particles=state, log_w=log_w, ancestors=torch.arange(n), beta=0.0,
                         step_size=cfg.step_size, last_step_size=cfg.step_size,
                         log_normalizer=math.log(float(alive.sum()) / n), moves_left=0, current={}, accepted=[],
                         stages=[], costs=path.costs, generator_state=generator.get_state())


def _begin_stage(run: SMCCheckpoint, path: AnnealingPath, beta_rule: Callable[[int, float, Tensor, Tensor], float],
                 generator: torch.Generator) -> None:
    """Steps 1-3 of a stage (see the module docstring): the next beta, reweighting, resampling."""
    cfg, state, log_w = run.config, run.particles, run.log_w
    increment = -state.u - state.log_q
    beta_new = beta_rule(len(run.stages), run.beta, log_w, increment)
    d = beta_new - run.beta
    cess = conditional_ess(log_w, increment, d)
    scaled = torch.where(torch.isfinite(increment), d * increment, increment)
    run.log_normalizer += float(torch.logsumexp(log_w - torch.logsumexp(log_w, 0) + scaled, 0))
    log_w = log_w + scaled
    if not torch.isfinite(log_w).any():
        raise FloatingPointError(f"all SMC weights vanished at beta={beta_new:.4g}")
    ess = kish_ess(log_w)
    resampled = ess < cfg.resample_threshold
    if resampled:
        index = systematic_resample(log_w, generator=generator)
        state, run.ancestors = state.take(index), run.ancestors[index.cpu()]
        log_w = torch.zeros_like(log_w)
    run.particles, run.log_w = path.prepare(state, beta_new), log_w
    run.beta, run.moves_left, run.accepted = beta_new, cfg.n_moves, []
    run.current = {"ess": ess, "cess": cess, "resampled": bool(resampled)}


def _move(run: SMCCheckpoint, path: AnnealingPath, generator: torch.Generator) -> None:
    """Step 4 of a stage: one MALA move of every particle, then the step-size adaptation."""
    cfg = run.config
    run.last_step_size = run.step_size
    run.particles, accepted = mala_step(path, run.particles, run.beta, run.step_size, generator)
    run.accepted.append(float(accepted.to(torch.float64).mean()))
    run.moves_left -= 1
    if cfg.adapt_step_size:
        run.step_size = adapt_step_size(run.step_size, run.accepted[-1], cfg.target_acceptance, cfg.adaptation_gain)


def _finish_stage(run: SMCCheckpoint, path: AnnealingPath) -> None:
    accepted = run.accepted
    stage = SMCStage(beta=run.beta, ess=run.current["ess"], cess=run.current["cess"],
                     resampled=run.current["resampled"],
                     acceptance=sum(accepted) / len(accepted) if accepted else math.nan,
                     step_size=run.last_step_size if accepted else run.step_size,
                     log_normalizer=run.log_normalizer, unique_ancestors=int(run.ancestors.unique().numel()),
                     energy_evaluations=path.costs.energy_evaluations,
                     likelihood_evaluations=path.costs.likelihood_evaluations)
    run.stages.append(stage)
    log.info("SMC stage %d: beta %.4g, ESS %.3f (CESS %.3f)%s, acceptance %.2f, step %.3g, log Z %.4g",
             len(run.stages), stage.beta, stage.ess, stage.cess, ", resampled" if stage.resampled else "",
             stage.acceptance, stage.step_size, stage.log_normalizer)


def smc(potential: Potential, samples: Tensor, *, log_q: Tensor | None = None, density: Density | None = None,
        config: SMCConfig | None = None, project: Callable[[Tensor], Tensor] | None = None,
        resume: SMCCheckpoint | None = None,
        on_step: Callable[[SMCCheckpoint], None] | None = None) -> SMCResult:
    """Run SMC from the flow's samples [n, D] to p ~ exp(-u) (see the module docstring).

    ``log_q`` [n]: the flow's normalised log-density at the samples (``FlowDensity.log_prob_from_sampling``
    of what the sampler stored); without it ``density.log_prob`` computes it (counted in the costs).
    ``density`` is needed for schedules with intermediate beta (or drift="exact"); ``project`` restricts
    moves to the particles' subspace (``mean_free_projection(n_atoms)`` for molecules). Costs count what
    this call evaluates (not the given log_q); ``n_proposals`` is n.

    Stopping and resuming: ``on_step(checkpoint)`` is called after every step (a stage's reweighting and
    resampling, and each MALA move; the checkpoint is live, copy what you keep); ``resume=checkpoint``
    continues such a run with the same samples, potential, density and config, and gives the result the
    uninterrupted run would have given (costs and wall time add up over the sessions).
    """
    cfg = config or SMCConfig()
    if samples.dim() != 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must be [n >= 1, D], got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN/inf")
    n = samples.shape[0]
    if log_q is None and density is None and resume is None:
        raise ValueError("give log_q of the samples or the flow's density")
    generator = seeded_generator(cfg.seed, "smc")
    if resume is not None:
        if asdict(resume.config) != asdict(cfg):
            raise ValueError(f"the checkpoint is of another SMC config ({resume.config}, now {cfg})")
        if tuple(resume.particles.x.shape) != tuple(samples.shape):
            raise ValueError(f"the checkpoint holds particles {tuple(resume.particles.x.shape)}, the samples are "
                             f"{tuple(samples.shape)}")
        path = AnnealingPath(potential, density, drift=cfg.drift, project=project, costs=resume.costs)
        generator.set_state(resume.generator_state)
        run = resume
    else:
        path = AnnealingPath(potential, density, drift=cfg.drift, project=project, costs=Costs(n_proposals=n))
        x = samples.detach().to(torch.float64)
        if log_q is None:
            log_q = path.log_q(x)
        log_q = torch.as_tensor(log_q, dtype=torch.float64, device=x.device).reshape(-1)
        if log_q.shape != (n,) or not torch.isfinite(log_q).all():
            raise ValueError(f"log_q must be finite with shape ({n},), got {tuple(log_q.shape)}")
        run = _start(path, x, log_q, cfg, generator)
    beta_rule = _betas(cfg)
    while not run.finished:
        if run.moves_left == 0:
            _begin_stage(run, path, beta_rule, generator)
        else:
            _move(run, path, generator)
        if run.moves_left == 0:
            _finish_stage(run, path)
        if on_step is not None:
            run.costs, run.generator_state = path.stop_clock(), generator.get_state()
            on_step(run)
    return SMCResult(x=run.particles.x, log_w=run.log_w, u=run.particles.u, ancestors=run.ancestors,
                     log_normalizer=run.log_normalizer, stages=run.stages, costs=path.stop_clock(), config=cfg)
