"""Every ``tbg::`` operator, fully defined: registration and the typed wrappers users call.

The native library (``tbg._library``) holds the schemas (csrc/ops.cpp) and the compiled CPU/CUDA
kernels. This module, imported by ``import tbg``, adds for every op what Python defines:

==================  ==============  =========================================  =================================
op                  fake kernel     autograd                                   implementations
==================  ==============  =========================================  =================================
egnn_forward        yes             egnn_backward (first order)                CPU, CUDA: compiled (*)
egnn_backward       yes             raises (no second derivatives)             CPU, CUDA: compiled (*)
egnn_divergence     yes             raises (use ``EGNN.divergence``)           CPU: compiled; CUDA: see below
egnn_jvp            yes             raises (use ``EGNN.divergence``)           CPU: compiled; CUDA: see below
==================  ==============  =========================================  =================================

(*) TBG_TRITON=egnn puts the Triton kernels in place of the compiled CUDA ones (opt-in, see below).

Fake kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops without running
them. ``cuda_implementations`` is the one place where Python implementations are chosen for the
CUDA ops the library has no compiled kernel for; ``PYTHON_CUDA_OPS`` names the ops it serves (how an
implementation earns that place: docs/gpu.md).
Because all of it happens at import, ``tbg.has_kernel``, ``tbg info`` and direct
``torch.ops.tbg.*`` calls behave the same before and after the first model call.

The wrappers ``egnn_velocity``, ``egnn_divergence`` and ``egnn_jvp`` take the 13 stacked weights
as one sequence (order: ``tbg.nn.spec.STACKED_WEIGHTS``); their plain-PyTorch twins with the same
signatures are in ``tbg.nn.reference``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tbg._library import has_kernel
from tbg.nn import divergence_torch
from tbg.nn import triton as tbg_triton
from tbg.nn.layout import max_atoms
from tbg.nn.spec import CPU_TANGENT_BUDGET, N_WEIGHTS

__all__ = ["PYTHON_CUDA_IMPLEMENTATIONS", "PYTHON_CUDA_OPS", "default_tangent_chunk", "egnn_divergence", "egnn_jvp", "egnn_velocity"]


# ---- fake kernels ----------------------------------------------------------------------------------
@torch.library.register_fake("tbg::egnn_forward")
def _egnn_forward_fake(x: Tensor, h0: Tensor, mol_ptr: Tensor, w1: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    n_layers, (n_atoms, hidden) = w1.shape[0], h0.shape
    return x.new_empty(n_atoms, 3), h0.new_empty(n_layers, n_atoms, hidden), x.new_empty(n_layers, n_atoms, 3)


@torch.library.register_fake("tbg::egnn_backward")
def _egnn_backward_fake(grad_v: Tensor, x: Tensor, h0: Tensor, mol_ptr: Tensor, *rest: Any) -> tuple[Tensor, ...]:
    weights = rest[:N_WEIGHTS]
    return (torch.empty_like(x), torch.empty_like(h0), *(torch.empty_like(w) for w in weights))


@torch.library.register_fake("tbg::egnn_divergence")
def _egnn_divergence_fake(x: Tensor, h0: Tensor, mol_ptr: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
    tangent_chunk = rest[N_WEIGHTS + 1]
    torch._check(tangent_chunk >= 1)
    return x.new_empty(x.shape), x.new_empty(mol_ptr.shape[0] - 1)


@torch.library.register_fake("tbg::egnn_jvp")
def _egnn_jvp_fake(x: Tensor, h0: Tensor, mol_ptr: Tensor, *rest: Any) -> tuple[Tensor, Tensor]:
    tangents = rest[N_WEIGHTS]
    return x.new_empty(x.shape), tangents.new_empty(tangents.shape)


# ---- autograd --------------------------------------------------------------------------------------
def _forward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, h0, mol_ptr, *weights, coords_range = inputs
    _, h_states, x_states = output
    ctx.mark_non_differentiable(h_states, x_states)
    ctx.save_for_backward(x, h0, mol_ptr, *weights, h_states, x_states)
    ctx.coords_range = coords_range


def _forward_backward(ctx: Any, grad_v: Tensor | None, _grad_h: Tensor | None,
                      _grad_x: Tensor | None) -> tuple[Tensor | None, ...]:
    x, h0, mol_ptr, *rest = ctx.saved_tensors
    weights, (h_states, x_states) = rest[:N_WEIGHTS], rest[N_WEIGHTS:]
    if grad_v is None:
        grad_v = torch.zeros_like(x)
    grads = torch.ops.tbg.egnn_backward(grad_v.contiguous(), x, h0, mol_ptr, *weights, h_states, x_states,
                                        ctx.coords_range)
    return (grads[0], grads[1], None, *grads[2:], None)


def _no_saved_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    pass


def _raising_backward(message: str) -> Callable[..., tuple[Any, ...]]:
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        raise NotImplementedError(message)

    return backward


torch.library.register_autograd("tbg::egnn_forward", _forward_backward, setup_context=_forward_setup_context)
torch.library.register_autograd("tbg::egnn_backward", _raising_backward(
    "tbg::egnn_backward is not differentiable: the fused EGNN supports first-order gradients only. "
    "For second derivatives (e.g. gradients of a divergence) use backend='reference'."),
    setup_context=_no_saved_context)
# Without these, autograd would let a backward pass through the divergence ops silently produce
# no gradient (PyTorch's fallback only warns).
for _op in ("egnn_divergence", "egnn_jvp"):
    torch.library.register_autograd(f"tbg::{_op}", _raising_backward(
        f"tbg::{_op} has no autograd formula. For gradients of the divergence use EGNN.divergence, which "
        f"runs a differentiable implementation of the same algorithm when gradients are required."),
        setup_context=_no_saved_context)


# ---- device implementations --------------------------------------------------------------------------
def cuda_implementations() -> dict[str, Callable[..., Any]]:
    """The Python implementation of each op that runs on CUDA, keyed by op name (the functions take
    the op's schema).

    The torch implementation serves both divergence ops where the library has no compiled kernel for
    them. The Triton kernels serve the groups TBG_TRITON asks for (tbg.nn.triton: opt-in until they are
    verified on a GPU), also in place of compiled .cu kernels (TBG_TRITON=egnn). This is the one place
    to choose another: return it here; it is installed once, at import.
    """
    implementations = {"egnn_divergence": divergence_torch.egnn_divergence, "egnn_jvp": divergence_torch.egnn_jvp}
    implementations.update(tbg_triton.cuda_implementations())
    return implementations


def _install_cuda_implementations() -> dict[str, Callable[..., Any]]:
    installed = {}
    triton_modules = {group.module for group in tbg_triton.GROUPS.values()}
    for op, implementation in cuda_implementations().items():
        # Triton is asked for explicitly (TBG_TRITON): it replaces a compiled kernel too.
        if implementation.__module__ in triton_modules or not has_kernel(op, "cuda"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # replacing the .cu kernel is what was asked for
                torch.library.impl(f"tbg::{op}", "CUDA", implementation)
            installed[op] = implementation
    return installed


# The Python implementation serving each op on CUDA (``tbg info`` names them), and those ops.
PYTHON_CUDA_IMPLEMENTATIONS: dict[str, Callable[..., Any]] = _install_cuda_implementations()
PYTHON_CUDA_OPS: tuple[str, ...] = tuple(PYTHON_CUDA_IMPLEMENTATIONS)


# ---- the typed wrappers --------------------------------------------------------------------------------
def _check_weights(weights: Sequence[Tensor]) -> None:
    if len(weights) != N_WEIGHTS:
        raise ValueError(f"expected {N_WEIGHTS} stacked weight tensors, got {len(weights)}")


def _check_no_grad(op: str, tensors: Sequence[Tensor]) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"tbg::{op} has no autograd formula but an input requires grad; call it under "
                           f"torch.no_grad(), or use EGNN.divergence, which takes a differentiable path "
                           f"when gradients are needed")


def egnn_velocity(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: Sequence[Tensor], coords_range: float) -> Tensor:
    """Vector field v [M, 3] of the EGNN stack in ragged layout (per-molecule mean removed).

    x [M, 3] coordinates, h0 [M, H] embedded features, mol_ptr [B + 1] int64 offsets, weights the
    13 stacked per-layer tensors of ``EGNN.stacked_weights()``, coords_range the per-layer range.
    Differentiable in x, h0 and every weight (first order only).
    """
    _check_weights(weights)
    v, _, _ = torch.ops.tbg.egnn_forward(x, h0, mol_ptr, *weights, float(coords_range))
    return v


def default_tangent_chunk(mol_ptr: Tensor, hidden: int) -> int:
    """Tangents per chunk of tbg::egnn_divergence for mol_ptr's device.

    CPU: at most CPU_TANGENT_BUDGET / (edges x H) of the largest molecule, and small enough that the
    (molecule, chunk) work items keep every thread busy (a single molecule is split too). CUDA (the
    torch implementation): ``divergence_torch.default_tangent_chunk``.
    """
    if mol_ptr.device.type != "cpu":
        return divergence_torch.default_tangent_chunk(mol_ptr, hidden)
    n = max(max_atoms(mol_ptr), 2)
    per_thread = -(-3 * int(mol_ptr[-1]) // torch.get_num_threads())
    return max(1, min(3 * n, CPU_TANGENT_BUDGET // (n * (n - 1) * hidden), per_thread))


def egnn_divergence(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: Sequence[Tensor], coords_range: float,
                    tangent_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(v [M, 3], div [B]) by tbg::egnn_divergence on a ragged batch; tangent_chunk None picks one
    by memory. Not differentiable (``EGNN.divergence`` is)."""
    _check_weights(weights)
    _check_no_grad("egnn_divergence", (x, h0, *weights))
    if tangent_chunk is None:
        tangent_chunk = default_tangent_chunk(mol_ptr, h0.shape[1])
    return torch.ops.tbg.egnn_divergence(x, h0, mol_ptr, *weights, float(coords_range), tangent_chunk)


def egnn_jvp(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: Sequence[Tensor], tangents: Tensor,
             coords_range: float) -> tuple[Tensor, Tensor]:
    """(v [M, 3], (dv/dx) tangents[k] [K, M, 3]) by tbg::egnn_jvp on a ragged batch. Not differentiable."""
    _check_weights(weights)
    _check_no_grad("egnn_jvp", (x, h0, tangents, *weights))
    return torch.ops.tbg.egnn_jvp(x, h0, mol_ptr, *weights, tangents.contiguous(), float(coords_range))
