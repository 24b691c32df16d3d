"""What the Python layer and the native kernels must agree on, defined once for Python.

* ``STACKED_WEIGHTS``: the 13 per-layer weight tensors of the fused ops in schema order (csrc/ops.cpp),
  each with the EGCL parameter it is stacked from and its shape as a function of the number of
  layers L and the hidden size H. ``EGNN.stacked_weights``, the ops' wrappers, the torch
  implementation's checks and the reference's op twins all read this table.
* ``EDGE_EPS``: the edge direction is n_ij = d_ij / (sqrt(r_ij + EDGE_EPS) + 1) (docs/model.md).
* Tangent budgets: how many tangents x edges x H elements one chunk of the exact divergence may hold.

The C++ side keeps its own copies (csrc/common/egnn_args.h names and checks the weights,
csrc/common/constants.h holds the numbers); tests/test_nn_structure.py checks that the compiled
library agrees with this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StackedWeight:
    """One argument of the fused ops: ``name`` in the schema, stacked over layers from the EGCL
    parameter ``parameter`` (row 0 of it when ``first_row``: the one-output linears keep [1, H]
    weights and [1] biases in PyTorch, the ops take [H] and a scalar per layer)."""

    name: str
    parameter: str
    first_row: bool
    shape: Callable[[int, int], Shape]  # (L, H) -> shape of the stacked tensor


STACKED_WEIGHTS: tuple[StackedWeight, ...] = (
    StackedWeight("w1", "edge_mlp.0.weight", False, lambda L, H: (L, H, 2 * H + 2)),
    StackedWeight("b1", "edge_mlp.0.bias", False, lambda L, H: (L, H)),
    StackedWeight("w2", "edge_mlp.2.weight", False, lambda L, H: (L, H, H)),
    StackedWeight("b2", "edge_mlp.2.bias", False, lambda L, H: (L, H)),
    StackedWeight("watt", "att_mlp.0.weight", True, lambda L, H: (L, H)),
    StackedWeight("batt", "att_mlp.0.bias", True, lambda L, H: (L,)),
    StackedWeight("wc1", "coord_mlp.0.weight", False, lambda L, H: (L, H, H)),
    StackedWeight("bc1", "coord_mlp.0.bias", False, lambda L, H: (L, H)),
    StackedWeight("wc2", "coord_mlp.2.weight", True, lambda L, H: (L, H)),
    StackedWeight("wn1", "node_mlp.0.weight", False, lambda L, H: (L, H, 2 * H)),
    StackedWeight("bn1", "node_mlp.0.bias", False, lambda L, H: (L, H)),
    StackedWeight("wn2", "node_mlp.2.weight", False, lambda L, H: (L, H, H)),
    StackedWeight("bn2", "node_mlp.2.bias", False, lambda L, H: (L, H)),
)
WEIGHT_NAMES: tuple[str, ...] = tuple(w.name for w in STACKED_WEIGHTS)
N_WEIGHTS = len(STACKED_WEIGHTS)


def weight_shapes(n_layers: int, hidden: int) -> tuple[Shape, ...]:
    """Shapes of the stacked weights, in schema order, for L = n_layers and H = hidden."""
    return tuple(w.shape(n_layers, hidden) for w in STACKED_WEIGHTS)


# sqrt(r + EDGE_EPS) keeps the edge direction differentiable at r = 0 (coincident atoms).
EDGE_EPS = 1e-8
# CPU kernel: tangents x edges x H of one (molecule, chunk) work item. The kernel never holds that
# product at once (it walks edge rows in blocks); the bound keeps per-item memory O(T n H + T E)
# while chunks stay large, since every chunk recomputes the molecule's primal pass.
CPU_TANGENT_BUDGET = 1 << 23
# Torch implementation (the CUDA path): tangents x edges x H elements of one (group, chunk), i.e.
# fp32 tensors of 256 MiB of which about 8 are alive at once.
TORCH_TANGENT_BUDGET = 1 << 26
