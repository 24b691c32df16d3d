"""Divergence of the TBG vector field: exact traces and the Hutchinson estimator.

Exact log-likelihoods need div v = tr(dv/dx) over the 3 n_b coordinates of every molecule b.
This module holds

* plain-PyTorch reference traces of any ragged field ``field(x [M, 3]) -> v [M, 3]``:
  ``divergence_bruteforce`` (the published estimator: one autograd backward pass per coordinate),
  ``divergence_vmap_jvp`` (``torch.vmap`` over ``torch.func.jvp`` with unit tangents) and
  ``divergence_jacfwd`` (trace of the full Jacobian; tests only);
* the Hutchinson estimator on any Jacobian-vector product;
* the Python side of the fused ops ``tbg::egnn_divergence`` / ``tbg::egnn_jvp`` (fake kernels for
  tracing, wrappers, their CUDA implementation from ``tbg.nn.divergence_batched``), and
  ``module_divergence``, the engine behind ``EGNN.divergence``.

Unit tangents of a ragged batch: tangent (a, k) is 1 at coordinate k of the a-th atom of EVERY
molecule that has more than a atoms. Molecules never interact, so one tangent serves all molecules
at once and 3 * max(n_b) tangents give every trace.

Mean removal does not change the trace: v = P d (P removes the per-molecule mean) and
tr(P J_d) = tr(J_d) - sum_k (1/n) d(sum_i d_ik)/d(translation along k) = tr(J_d), since the
displacement d = x^L - x^0 is translation invariant. For the same reason J_v = P J_v P, so a
Hutchinson probe and its mean-free projection give the identical estimate eps^T J_v eps: mean-free
probes neither bias nor help (both facts are checked in tests/test_divergence.py).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

from tbg._library import has_kernel
from tbg.nn import divergence_batched, reference
from tbg.nn.layout import (local_index, max_atoms, molecule_index, per_molecule_sum, ragged_edges, to_ragged,
                           unit_tangents)

if TYPE_CHECKING:
    from tbg.nn.egnn import EGNN

log = logging.getLogger("tbg")

Field = Callable[[Tensor], Tensor]
Method = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]

# Bound on tangents x edges x H per tangent chunk. The CPU kernel never holds that product (it walks
# the edge rows in blocks); its per-chunk memory is O(T n H + T E), and every chunk recomputes the
# molecule's primal pass, so chunks should be large (measured in bench/RESULTS.md: 51 atoms, H = 128
# took 1.3x longer at 6 tangents per chunk than at 20-77).
_CHUNK_BUDGET = 1 << 23


# ---- reference traces ----------------------------------------------------------------------------
def divergence_bruteforce(field: Field, x: Tensor, mol_ptr: Tensor, *,
                          create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """The published estimator: one backward pass per local coordinate (3 max(n_b) passes).

    On a padded batch in flat form (mol_ptr = arange(B + 1) * N) this is exactly the published
    loop over the 3N coordinates. ``create_graph`` keeps the graph for gradients of div.
    """
    with torch.enable_grad():
        xr = x if x.requires_grad else x.detach().requires_grad_(True)
        v = field(xr)
        coord = local_index(mol_ptr).unsqueeze(1) * 3 + torch.arange(3, device=x.device)
        diag = torch.zeros_like(v)
        n_tan = 3 * max_atoms(mol_ptr)
        for c in range(n_tan):
            sel = coord == c
            (g,) = torch.autograd.grad((v * sel).sum(), xr, retain_graph=True, create_graph=create_graph)
            diag = diag + g * sel
    div = per_molecule_sum(diag.sum(1), mol_ptr)
    return (v, div) if create_graph else (v.detach(), div.detach())


def field_jvp(field: Field, x: Tensor, tangents: Tensor, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """v = field(x) and the JVPs (dv/dx) tangents[k], [K, M, 3], by vmap over torch.func.jvp."""
    v = field(x)
    if tangents.shape[0] == 0:
        return v, tangents.new_zeros(tangents.shape)
    jvp = torch.vmap(lambda tan: torch.func.jvp(field, (x,), (tan,))[1], chunk_size=chunk_size)(tangents)
    return v, jvp


def divergence_vmap_jvp(field: Field, x: Tensor, mol_ptr: Tensor,
                        chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact trace by torch.vmap over torch.func.jvp with the 3 max(n_b) shared unit tangents."""
    tangents = unit_tangents(mol_ptr, x.dtype)
    v, jvp = field_jvp(field, x, tangents, chunk_size)
    return v, per_molecule_sum((jvp * tangents).sum((0, 2)), mol_ptr)


def divergence_jacfwd(field: Field, x: Tensor, mol_ptr: Tensor) -> tuple[Tensor, Tensor]:
    """Trace of the full Jacobian from torch.func.jacfwd (O(M^2) memory: small tests only)."""
    jac = torch.func.jacfwd(field)(x)  # [M, 3, M, 3]
    m = x.shape[0]
    diag = jac.reshape(3 * m, 3 * m).diagonal().reshape(m, 3)
    return field(x), per_molecule_sum(diag.sum(1), mol_ptr)


# ---- Hutchinson ------------------------------------------------------------------------------------
def probes(n_probes: int, like: Tensor, probe: Probe = "rademacher",
           generator: torch.Generator | None = None) -> Tensor:
    """K probes [K, M, 3] with E[eps eps^T] = I: Rademacher (+-1) or standard Gaussian."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    shape = (n_probes, *like.shape)
    if probe == "gaussian":
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)
    if probe == "rademacher":
        bits = torch.randint(0, 2, shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")


def hutchinson_trace(jvp_fn: Callable[[Tensor], tuple[Tensor, Tensor]], eps: Tensor,
                     mol_ptr: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased trace estimate mean_k eps_k^T J eps_k per molecule; jvp_fn(eps) -> (v, J eps)."""
    v, jvp = jvp_fn(eps)
    return v, per_molecule_sum((eps * jvp).sum((0, 2)), mol_ptr) / eps.shape[0]


# ---- fused ops: fake kernels and wrappers ---------------------------------------------------------
@torch.library.register_fake("tbg::egnn_divergence")
def _egnn_divergence_fake(x, h0, mol_ptr, w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2,
                          coords_range, tangent_chunk):
    torch._check(tangent_chunk >= 1)
    return x.new_empty(x.shape), x.new_empty(mol_ptr.shape[0] - 1)


@torch.library.register_fake("tbg::egnn_jvp")
def _egnn_jvp_fake(x, h0, mol_ptr, w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2,
                   tangents, coords_range):
    return x.new_empty(x.shape), tangents.new_empty(tangents.shape)


# CUDA has no hand-written divergence kernel yet: the batched torch-ops implementation serves there.
BATCHED_CUDA_OPS = tuple(op for op in ("egnn_divergence", "egnn_jvp") if not has_kernel(op, "cuda"))
for _op in BATCHED_CUDA_OPS:
    torch.library.impl(f"tbg::{_op}", "CUDA", getattr(divergence_batched, _op))


def _check_no_grad(op: str, tensors) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"tbg::{op} has no autograd formula but an input requires grad; call it under "
                           f"torch.no_grad(), or use EGNN.divergence, which takes the differentiable "
                           f"reference path when gradients are needed")


def default_tangent_chunk(mol_ptr: Tensor, hidden: int) -> int:
    """Tangents per chunk of the divergence kernel for mol_ptr's device.

    CPU: at most _CHUNK_BUDGET / (edges x H) of the largest molecule, and small enough that the
    (molecule, chunk) work items keep every thread busy (a single molecule is split too). CUDA (the
    batched implementation): see divergence_batched.default_tangent_chunk.
    """
    if mol_ptr.device.type != "cpu":
        return divergence_batched.default_tangent_chunk(mol_ptr, hidden)
    n = max(max_atoms(mol_ptr), 2)
    per_thread = -(-3 * int(mol_ptr[-1]) // torch.get_num_threads())
    return max(1, min(3 * n, _CHUNK_BUDGET // (n * (n - 1) * hidden), per_thread))


def fused_divergence(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...], coords_range: float,
                     tangent_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """tbg::egnn_divergence on a ragged batch; tangent_chunk None picks one by memory."""
    _check_no_grad("egnn_divergence", (x, h0, *weights))
    if tangent_chunk is None:
        tangent_chunk = default_tangent_chunk(mol_ptr, h0.shape[1])
    return torch.ops.tbg.egnn_divergence(x, h0, mol_ptr, *weights, coords_range, tangent_chunk)


def fused_jvp(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...], tangents: Tensor,
              coords_range: float) -> tuple[Tensor, Tensor]:
    """tbg::egnn_jvp: v and (dv/dx) tangents[k] on a ragged batch."""
    _check_no_grad("egnn_jvp", (x, h0, tangents, *weights))
    return torch.ops.tbg.egnn_jvp(x, h0, mol_ptr, *weights, tangents.contiguous(), coords_range)


# ---- the module front ------------------------------------------------------------------------------
def reference_field(egnn: "EGNN", h0: Tensor, mol_ptr: Tensor) -> Field:
    """x [M, 3] -> v [M, 3] on a ragged batch with fixed embeddings h0, by the reference."""
    row, col = ragged_edges(mol_ptr)

    def field(x: Tensor) -> Tensor:
        return reference.remove_mean(reference.egnn_displacement(egnn, h0, x, row, col), mol_ptr)

    return field


def module_divergence(egnn: "EGNN", t: Tensor, x: Tensor, features: Tensor, node_mask: Tensor | None,
                      mol_ptr: Tensor | None, *, method: Method, n_probes: int, probe: Probe,
                      generator: torch.Generator | None, backend: str,
                      tangent_chunk: int | None) -> tuple[Tensor, Tensor]:
    """EGNN.divergence on validated inputs (t [B]); see there."""
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    if tangent_chunk is not None and tangent_chunk < 1:
        raise ValueError(f"tangent_chunk must be >= 1, got {tangent_chunk}")
    view, x_r, features_r, ptr = to_ragged(x, features, node_mask, mol_ptr)
    h0 = egnn.embed(t[molecule_index(ptr)].unsqueeze(1), features_r)
    # The fused ops have no autograd. When a gradient of div is wanted (training through the
    # likelihood), models the fused ops support take the batched torch-ops code of the same
    # algorithm with autograd through it, the others (and backend='reference') the reference path;
    # both are differentiable w.r.t. x, t, features and parameters.
    needs_grad = torch.is_grad_enabled() and (h0.requires_grad or x_r.requires_grad)
    op = "egnn_divergence" if method == "exact" else "egnn_jvp"
    resolved = egnn.resolve_backend(backend, x.device) if backend != "reference" else "reference"
    fused = resolved == "fused" and has_kernel(op, x.device) and not needs_grad
    batched = resolved == "fused" and needs_grad
    if backend == "fused" and not fused:
        raise RuntimeError(f"backend='fused' cannot compute this divergence: "
                           f"{'gradients are required and the fused op has none' if needs_grad else f'no {op} kernel for {x.device.type}'}; "
                           f"use backend='auto' or 'reference'")
    weights = egnn.stacked_weights() if fused or batched else ()
    if method == "hutchinson":
        eps = probes(n_probes, x_r, probe, generator)
        if fused:
            jvp_fn = lambda e: fused_jvp(x_r, h0, ptr, weights, e, egnn.layer_range)  # noqa: E731
        elif batched:
            jvp_fn = lambda e: divergence_batched.jvp(x_r, h0, ptr, weights, e, egnn.layer_range)  # noqa: E731
        else:
            field = reference_field(egnn, h0, ptr)
            jvp_fn = lambda e: field_jvp(field, x_r, e)  # noqa: E731
        v, div = hutchinson_trace(jvp_fn, eps, ptr)
    elif fused:
        v, div = fused_divergence(x_r, h0, ptr, weights, egnn.layer_range, tangent_chunk)
    elif batched:
        chunk = tangent_chunk or divergence_batched.default_tangent_chunk(ptr, egnn.hidden)
        v, div = divergence_batched.divergence(x_r, h0, ptr, weights, egnn.layer_range, chunk)
    else:
        v, div = divergence_vmap_jvp(reference_field(egnn, h0, ptr), x_r, ptr, tangent_chunk)
    return (v if view is None else view.scatter(v)), div
