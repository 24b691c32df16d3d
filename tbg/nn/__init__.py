"""The vector field: EGNN dynamics (reference and fused backends), published checkpoints and dynamics.

Modules by job: ``ops`` (every ``tbg::`` operator registered and wrapped; importing ``tbg`` imports
it), ``reference`` (the plain-PyTorch oracle: the field, the ops' twins, divergence traces),
``divergence_torch`` (the torch implementation of the divergence ops), ``hutchinson`` (the
stochastic trace estimator), ``egnn`` (the module and its backend choice), ``layout`` (batch
layouts), ``spec`` (what Python and the kernels agree on), ``checkpoint`` (published checkpoints),
``published`` (published dynamics objects on tbg's engine: a drop-in divergence estimator).
The equations are in docs/model.md; how the ops reach their kernels, in docs/architecture.md.
"""
from tbg.nn import ops  # noqa: F401 - registers fake kernels, autograd and device implementations
from tbg.nn.checkpoint import CheckpointError, load_egnn, load_published, save_published
from tbg.nn.egnn import EGNN, BoundDynamics
from tbg.nn.published import ExactDivergenceEstimator

__all__ = ["EGNN", "BoundDynamics", "CheckpointError", "ExactDivergenceEstimator", "load_egnn", "load_published",
           "save_published"]
