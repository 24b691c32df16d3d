"""The vector field: EGNN dynamics (reference and fused backends) and published checkpoints."""
from tbg.nn.checkpoint import CheckpointError, load_egnn, load_published, save_published
from tbg.nn.egnn import EGNN, BoundDynamics

__all__ = ["EGNN", "BoundDynamics", "CheckpointError", "load_egnn", "load_published", "save_published"]
