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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from tbg.flow.refine.mala import adapt_step_size, mala_step
from tbg.flow.refine.resampling import conditional_ess, next_beta, seeded_generator, systematic_resample
from tbg.flow.refine.targets import AnnealingPath, Costs, Density, Drift, ParticleState, Potential
from tbg.flow.reweight import kish_ess

log = logging.getLogger("tbg")

__all__ = ["SMCConfig", "SMCStage", "SMCResult", "smc"]

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


def smc(potential: Potential, samples: Tensor, *, log_q: Tensor | None = None, density: Density | None = None,
        config: SMCConfig | None = None, project: Callable[[Tensor], Tensor] | None = None) -> SMCResult:
    """Run SMC from the flow's samples [n, D] to p ~ exp(-u) (see the module docstring).

    ``log_q`` [n]: the flow's normalised log-density at the samples (``FlowDensity.log_prob_from_sampling``
    of what the sampler stored); without it ``density.log_prob`` computes it (counted in the costs).
    ``density`` is needed for schedules with intermediate beta (or drift="exact"); ``project`` restricts
    moves to the particles' subspace (``mean_free_projection(n_atoms)`` for molecules). Costs count what
    this call evaluates (not the given log_q); ``n_proposals`` is n.
    """
    cfg = config or SMCConfig()
    if samples.dim() != 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must be [n >= 1, D], got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN/inf")
    n = samples.shape[0]
    if log_q is None and density is None:
        raise ValueError("give log_q of the samples or the flow's density")
    path = AnnealingPath(potential, density, drift=cfg.drift, project=project, costs=Costs(n_proposals=n))
    generator = seeded_generator(cfg.seed, "smc")
    x = samples.detach().to(torch.float64)
    if log_q is None:
        log_q = path.log_q(x)
    log_q = torch.as_tensor(log_q, dtype=torch.float64, device=x.device).reshape(-1)
    if log_q.shape != (n,) or not torch.isfinite(log_q).all():
        raise ValueError(f"log_q must be finite with shape ({n},), got {tuple(log_q.shape)}")

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
    log_normalizer = math.log(float(alive.sum()) / n)
    ancestors = torch.arange(n)
    beta_rule = _betas(cfg)
    beta, step_size, stages = 0.0, cfg.step_size, []
    while beta < 1.0:
        increment = -state.u - state.log_q
        beta_new = beta_rule(len(stages), beta, log_w, increment)
        d = beta_new - beta
        cess = conditional_ess(log_w, increment, d)
        scaled = torch.where(torch.isfinite(increment), d * increment, increment)
        log_normalizer += float(torch.logsumexp(log_w - torch.logsumexp(log_w, 0) + scaled, 0))
        log_w = log_w + scaled
        if not torch.isfinite(log_w).any():
            raise FloatingPointError(f"all SMC weights vanished at beta={beta_new:.4g}")
        ess = kish_ess(log_w)
        resampled = ess < cfg.resample_threshold
        if resampled:
            index = systematic_resample(log_w, generator=generator)
            state, ancestors = state.take(index), ancestors[index.cpu()]
            log_w = torch.zeros(n, dtype=torch.float64, device=x.device)
        state = path.prepare(state, beta_new)
        accepted = []
        for _ in range(cfg.n_moves):
            used = step_size
            state, acc = mala_step(path, state, beta_new, used, generator)
            accepted.append(float(acc.to(torch.float64).mean()))
            if cfg.adapt_step_size:
                step_size = adapt_step_size(step_size, accepted[-1], cfg.target_acceptance, cfg.adaptation_gain)
        beta = beta_new
        stage = SMCStage(beta=beta, ess=ess, cess=cess, resampled=resampled,
                         acceptance=sum(accepted) / len(accepted) if accepted else math.nan,
                         step_size=used if accepted else step_size, log_normalizer=log_normalizer,
                         unique_ancestors=int(ancestors.unique().numel()),
                         energy_evaluations=path.costs.energy_evaluations,
                         likelihood_evaluations=path.costs.likelihood_evaluations)
        stages.append(stage)
        log.info("SMC stage %d: beta %.4g, ESS %.3f (CESS %.3f)%s, acceptance %.2f, step %.3g, log Z %.4g",
                 len(stages), beta, ess, cess, ", resampled" if resampled else "", stage.acceptance,
                 stage.step_size, log_normalizer)
    return SMCResult(x=state.x, log_w=log_w, u=state.u, ancestors=ancestors, log_normalizer=log_normalizer,
                     stages=stages, costs=path.stop_clock(), config=cfg)
