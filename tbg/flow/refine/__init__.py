"""Refinement of the flow's samples toward the Boltzmann distribution, beyond plain reweighting.

- ``smc``: sequential Monte Carlo from q to p ~ exp(-u) with MALA moves, adaptive or fixed annealing
  schedules (``SMCConfig.schedule="adaptive"``) or the cheaper resample-move scheme
  (``schedule="resample_move"``); ``SMCResult`` carries the per-stage log and the costs.
- ``independence_metropolis``: exact MCMC with the flow as proposal, optionally with local MALA moves.
- building blocks: ``AnnealingPath`` (log pi_beta = (1 - beta) log q - beta u), ``mala_step``,
  ``systematic_resample``, ``next_beta`` (conditional-ESS schedule), ``integrated_autocorrelation_time``.
- targets: ``Potential`` (``AutogradPotential`` for analytic energies, ``energy_model_potential``
  for OpenMM), ``Density`` (``FlowDensity``: exact log q by integrating the flow back), ``mean_free_projection``
  for molecules, ``Costs``.

From a sampling run (``tbg.flow.sample``: samples.npz in model units) to weighted SMC particles::

    data = np.load(run / "samples.npz")
    prior = MeanFreeGaussian(n_atoms)
    density = FlowDensity(BoundDynamics(egnn, features), prior, solver=SolverConfig())
    log_q = density.log_prob_from_sampling(data["prior_energy"], data["dlogp"])
    with EnergyModel(peptide, platform="CPU") as energy_model:
        result = smc(EnergyModelPotential(energy_model, "scaled"), torch.from_numpy(data["samples"]),
                     log_q=log_q, density=density, project=mean_free_projection(n_atoms),
                     config=SMCConfig(schedule="adaptive"))
    result.log_w, result.stages, result.costs  # weights at beta = 1, per-stage log, what it cost

The same call with ``SMCConfig(schedule="resample_move")`` runs the cheap scheme, and
``independence_metropolis(log_q, u, ...)`` the exact MCMC; compare them at equal ``costs``. Both stop and
resume exactly: ``on_step`` receives an ``SMCCheckpoint``/``MCMCCheckpoint`` after every step (``to_arrays``
for a file), ``resume=`` continues from one. ``tbg.flow.refine.runs`` (imported on demand: it loads the
chemistry) refines the samples of a `tbg sample` folder into a run folder, as `tbg refine` does.
"""

from tbg.flow.refine.mala import adapt_step_size, mala_log_acceptance, mala_step
from tbg.flow.refine.mcmc import (MCMCCheckpoint, MCMCConfig, MCMCResult, independence_metropolis,
                                  integrated_autocorrelation_time)
from tbg.flow.refine.resampling import conditional_ess, next_beta, systematic_resample
from tbg.flow.refine.smc import SMCCheckpoint, SMCConfig, SMCResult, SMCStage, smc
from tbg.flow.refine.targets import (
    AnnealingPath,
    AutogradPotential,
    Costs,
    Density,
    FlowDensity,
    ParticleState,
    Potential,
    energy_model_potential,
    mean_free_projection,
)

__all__ = [
    "AnnealingPath",
    "AutogradPotential",
    "Costs",
    "Density",
    "FlowDensity",
    "MCMCCheckpoint",
    "MCMCConfig",
    "MCMCResult",
    "ParticleState",
    "Potential",
    "SMCCheckpoint",
    "SMCConfig",
    "SMCResult",
    "SMCStage",
    "adapt_step_size",
    "conditional_ess",
    "energy_model_potential",
    "independence_metropolis",
    "integrated_autocorrelation_time",
    "mala_log_acceptance",
    "mala_step",
    "mean_free_projection",
    "next_beta",
    "smc",
    "systematic_resample",
]
