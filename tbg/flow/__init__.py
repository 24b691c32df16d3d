"""Boltzmann-generator layer around the EGNN vector field.

- prior: ``MeanFreeGaussian`` (one molecule, z [B, 3N]) and ragged helpers (``sample_ragged``,
  ``log_prob_ragged``, ``prior_energy_ragged``, ``center_ragged``).
- ODE: ``integrate`` (x, optionally jointly with dlogp = int div v dt), ``decoupled_likelihood``
  (x path + Gauss-Legendre quadrature of div v), ``SolverConfig``; written against the ``Dynamics``
  protocol ``dyn(t, x) -> v``, ``dyn.divergence(t, x) -> (v, div)``.
- training: ``train`` (conditional flow matching, ragged batches, resumable, DDP under torchrun) with
  ``TrainConfig``, ``RaggedLoader``, ``flow_matching_loss``.
- sampling: ``sample`` (chunked, resumable, sharded over ranks) with ``SampleConfig``; profiling it
  (``SampleConfig(profile=True)``: stage times, evaluations per sample, peak memory, a trace) lives in
  ``tbg.flow.profile``, the memory model behind ``batch_size="auto"`` in ``tbg.flow.memory`` and the
  batch-size sweep of ``tbg profile`` in ``tbg.flow.sweep``.
- fine-tuning: ``train_by_energy`` (reverse KL, importance-weighted, or maximum likelihood of MD frames)
  with ``EnergyTrainConfig``.
- reweighting: ``log_importance_weights``, ``kish_ess``, ``normalized_weights``, ``weighted_mean``,
  the tail diagnostic ``pareto_k`` (can the weighted estimates be trusted?), tail treatments
  ``clip_log_weights`` and ``energy_cutoff_log_weights``, compared with plain importance
  sampling by ``tail_treatments``.
- refinement beyond reweighting (SMC, MCMC with the flow as proposal): the subpackage ``tbg.flow.refine``.
- ``tbg.flow.checkpointing``: the resume helpers of both training loops (numbered checkpoints, CSV log).
- ``tbg.flow.runs`` (imported on demand: it loads the chemistry): run folders of flows trained on MD data
  and of their samples, as the `tbg` command makes them (``train_on_md``, ``sample_checkpoint``).
"""

from tbg.flow.energy import EnergyTrainConfig, train_by_energy
from tbg.flow.ode import (
    AutogradDivergence,
    Dynamics,
    FlowResult,
    SolverConfig,
    as_dynamics,
    decoupled_likelihood,
    integrate,
)
from tbg.flow.prior import (
    MeanFreeGaussian,
    center_ragged,
    log_prob_ragged,
    prior_energy_ragged,
    sample_ragged,
)
from tbg.flow.reweight import (
    TailTreatment,
    clip_log_weights,
    energy_cutoff_log_weights,
    kish_ess,
    log_importance_weights,
    normalized_weights,
    pareto_k,
    tail_treatments,
    weighted_mean,
)
from tbg.flow.sample import SampleConfig, batch_size_for_budget, chunk_seed, sample
from tbg.flow.checkpointing import latest_checkpoint
from tbg.flow.train import RaggedLoader, TrainConfig, TrainResult, flow_matching_loss, train

__all__ = [
    "AutogradDivergence",
    "EnergyTrainConfig",
    "Dynamics",
    "FlowResult",
    "MeanFreeGaussian",
    "RaggedLoader",
    "SampleConfig",
    "SolverConfig",
    "TailTreatment",
    "TrainConfig",
    "TrainResult",
    "as_dynamics",
    "batch_size_for_budget",
    "center_ragged",
    "chunk_seed",
    "clip_log_weights",
    "decoupled_likelihood",
    "energy_cutoff_log_weights",
    "flow_matching_loss",
    "integrate",
    "kish_ess",
    "pareto_k",
    "latest_checkpoint",
    "log_importance_weights",
    "log_prob_ragged",
    "normalized_weights",
    "prior_energy_ragged",
    "sample",
    "sample_ragged",
    "tail_treatments",
    "train",
    "train_by_energy",
    "weighted_mean",
]
