"""Python side of the fused EGNN ops: fake (meta) kernels and autograd for ``torch.ops.tbg``.

``egnn_forward`` returns the vector field and the per-layer inputs (``h_states`` [L, M, H],
``x_states`` [L, M, 3]); its autograd formula hands those to ``egnn_backward``, which recomputes
the edge activations layer by layer (memory O(M H)). The fake kernels let ``torch.compile`` and
``torch.library.opcheck`` trace the ops without running them. Semantics: ``tbg.nn.reference``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import tbg._library  # noqa: F401 - loads the native library that defines torch.ops.tbg

__all__ = ["egnn_velocity"]

_N_WEIGHTS = 13


def egnn_velocity(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...],
                  coords_range: float) -> Tensor:
    """Vector field v [M, 3] of the EGNN stack in ragged layout (per-molecule mean removed).

    x [M, 3] coordinates, h0 [M, H] embedded features, mol_ptr [B + 1] int64 offsets, weights the
    13 stacked per-layer tensors of ``EGNN.stacked_weights()``, coords_range the per-layer range.
    Differentiable in x, h0 and every weight (first order only).
    """
    if len(weights) != _N_WEIGHTS:
        raise ValueError(f"expected {_N_WEIGHTS} stacked weight tensors, got {len(weights)}")
    v, _, _ = torch.ops.tbg.egnn_forward(x, h0, mol_ptr, *weights, float(coords_range))
    return v


@torch.library.register_fake("tbg::egnn_forward")
def _egnn_forward_fake(x: Tensor, h0: Tensor, mol_ptr: Tensor, w1: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    n_layers, (n_atoms, hidden) = w1.shape[0], h0.shape
    return x.new_empty(n_atoms, 3), h0.new_empty(n_layers, n_atoms, hidden), x.new_empty(n_layers, n_atoms, 3)


@torch.library.register_fake("tbg::egnn_backward")
def _egnn_backward_fake(grad_v: Tensor, x: Tensor, h0: Tensor, mol_ptr: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    weights = rest[:_N_WEIGHTS]
    return (torch.empty_like(x), torch.empty_like(h0), *(torch.empty_like(w) for w in weights))


def _forward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, h0, mol_ptr, *weights, coords_range = inputs
    _, h_states, x_states = output
    ctx.mark_non_differentiable(h_states, x_states)
    ctx.save_for_backward(x, h0, mol_ptr, *weights, h_states, x_states)
    ctx.coords_range = coords_range


def _forward_backward(ctx: Any, grad_v: Tensor | None, _grad_h: Tensor | None,
                      _grad_x: Tensor | None) -> tuple[Tensor | None, ...]:
    x, h0, mol_ptr, *rest = ctx.saved_tensors
    weights, (h_states, x_states) = rest[:_N_WEIGHTS], rest[_N_WEIGHTS:]
    if grad_v is None:
        grad_v = torch.zeros_like(x)
    grads = torch.ops.tbg.egnn_backward(grad_v.contiguous(), x, h0, mol_ptr, *weights, h_states, x_states,
                                        ctx.coords_range)
    return (grads[0], grads[1], None, *grads[2:], None)


torch.library.register_autograd("tbg::egnn_forward", _forward_backward, setup_context=_forward_setup_context)


def _no_double_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise NotImplementedError(
        "tbg::egnn_backward is not differentiable: the fused EGNN supports first-order gradients only. "
        "For second derivatives (e.g. gradients of a divergence) use backend='reference'.")


def _backward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    pass


torch.library.register_autograd("tbg::egnn_backward", _no_double_backward, setup_context=_backward_setup_context)
