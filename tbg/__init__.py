"""tbg: a fast backend for Transferable Boltzmann Generators (Klein & Noé, 2024).

Fused EGNN message passing and exact-divergence kernels registered as ``torch.ops.tbg.*``,
with a plain-PyTorch reference that defines their semantics, and the flow, chemistry and
evaluation around them. docs/model.md writes the model out, docs/architecture.md says which file does
what, docs/gpu.md how GPU code is verified.
"""
from tbg._library import build_info, has_kernel
from tbg.nn import EGNN, BoundDynamics, ExactDivergenceEstimator, load_published, save_published

__version__ = "0.1.0"
__all__ = ["EGNN", "BoundDynamics", "ExactDivergenceEstimator", "build_info", "has_kernel", "load_published",
           "save_published"]
