"""What the Python layer and the native kernels must agree on, defined once for Python.

* ``STACKED_WEIGHTS``: the 13 per-layer weight tensors of the fused ops in schema order (csrc/ops.cpp),
  each with the EGCL parameter it is stacked from and its shape as a function of the number of
  layers L and the hidden size H. ``EGNN.stacked_weights``, the ops' wrappers, the reference's op twins
  and the input checks of the Python implementations (``check_points``, ``check_weights``, the checks
  of csrc/common/egnn_args.h restated for them) all read this table.
* ``EDGE_EPS``: the edge direction is n_ij = d_ij / (sqrt(r_ij + EDGE_EPS) + 1) (docs/model.md).
* Tangent budgets: how many tangents x edges x H elements one chunk of the exact divergence may hold.

The C++ side keeps its own copies (csrc/common/egnn_args.h names and checks the weights,
csrc/common/constants.h holds the numbers); tests/test_nn_structure.py checks that the compiled
library agrees with this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

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


def check_points(op: str, x: Tensor, h0: Tensor) -> None:
    """x [M, 3] float32/float64 and h0 [M, H] of its dtype and device, else RuntimeError naming ``op``
    (metadata only: no device read)."""
    import torch

    if x.dim() != 2 or x.shape[1] != 3:
        raise RuntimeError(f"{op}: x must have shape [M, 3], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    if h0.dim() != 2 or h0.shape[0] != x.shape[0] or h0.dtype != x.dtype or h0.device != x.device:
        raise RuntimeError(f"{op}: h0 must have shape [M, H] with M = {x.shape[0]} and match x in dtype and "
                           f"device, got {tuple(h0.shape)} {h0.dtype} on {h0.device}")


def check_weights(op: str, x: Tensor, h0: Tensor, weights: tuple[Tensor, ...]) -> None:
    """The 13 stacked weights in schema order, shaped for L layers and H = h0.shape[1], of x's dtype and
    device, else RuntimeError naming ``op`` (metadata only)."""
    if len(weights) != N_WEIGHTS:
        raise RuntimeError(f"{op}: expected {N_WEIGHTS} stacked weight tensors, got {len(weights)}")
    n_layers, hidden = (weights[0].shape[0] if weights[0].dim() == 3 else 0), h0.shape[1]
    if n_layers < 1:
        raise RuntimeError(f"{op}: w1 must have shape [L, H, 2H + 2], got {tuple(weights[0].shape)}")
    for name, w, shape in zip(WEIGHT_NAMES, weights, weight_shapes(n_layers, hidden)):
        if tuple(w.shape) != shape:
            raise RuntimeError(f"{op}: weight {name} must have shape {list(shape)} for L = {n_layers}, "
                               f"H = {hidden}, got {list(w.shape)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise RuntimeError(f"{op}: weight {name} is {w.dtype} on {w.device} but x is {x.dtype} on {x.device}")


# sqrt(r + EDGE_EPS) keeps the edge direction differentiable at r = 0 (coincident atoms).
EDGE_EPS = 1e-8
# CPU kernel: tangents x edges x H of one (molecule, chunk) work item. The kernel never holds that
# product at once (it walks edge rows in blocks); the bound keeps per-item memory O(T n H + T E)
# while chunks stay large, since every chunk recomputes the molecule's primal pass.
CPU_TANGENT_BUDGET = 1 << 23
# Torch implementation (the CUDA path): tangents x edges x H elements of one (group, chunk), i.e.
# fp32 tensors of 256 MiB of which about 8 are alive at once.
TORCH_TANGENT_BUDGET = 1 << 26
