"""Plain-PyTorch reference of the published TBG vector field and of its divergence: the oracle for
every kernel.

The vector field (docs/model.md, "The vector field") in the edge-list form of the published EGNN:
flat atoms, receiver/sender index pairs (row, col), optional edge and node masks. Every batch
layout reduces to this form (``tbg.nn.layout``). Two entry points share one implementation:

* ``egnn_displacement(egnn, ...)`` on an ``EGNN`` module (any attention / tanh option), which
  ``EGNN.forward(backend="reference")`` runs;
* the twins of the fused ops, with their signatures (``tbg.nn.ops``): ``egnn_velocity``,
  ``egnn_divergence`` and ``egnn_jvp`` on a ragged batch and the 13 stacked weights.

Traces of any ragged field ``field(x [M, 3]) -> v [M, 3]`` (mol_ptr [B + 1] gives the molecules):
``divergence_bruteforce`` (the published estimator: one backward pass per coordinate),
``divergence_vmap_jvp`` (``torch.vmap`` over ``torch.func.jvp`` with unit tangents) and
``divergence_jacfwd`` (trace of the full Jacobian; small inputs only).

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

from typing import Callable, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as fn
from torch import Tensor, nn

from tbg.nn.layout import local_index, max_atoms, molecule_index, per_molecule_sum, ragged_edges, unit_tangents
from tbg.nn.spec import EDGE_EPS, N_WEIGHTS, STACKED_WEIGHTS, WEIGHT_NAMES

Field = Callable[[Tensor], Tensor]


class LayerWeights(NamedTuple):
    """One E_GCL layer's parameters in PyTorch Linear layout ([out, in]); watt/batt are None
    without attention. watt [1, H], batt [1] and wc2 [1, H] keep their one-output shapes."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    watt: Tensor | None
    batt: Tensor | None
    wc1: Tensor
    bc1: Tensor
    wc2: Tensor
    wn1: Tensor
    bn1: Tensor
    wn2: Tensor
    bn2: Tensor

    @staticmethod
    def of(gcl: nn.Module) -> "LayerWeights":
        """The parameters of an EGCL module (the tensors themselves, so autograd reaches them)."""
        att = gcl.att_mlp[0] if gcl.att_mlp is not None else None
        return LayerWeights(gcl.edge_mlp[0].weight, gcl.edge_mlp[0].bias, gcl.edge_mlp[2].weight, gcl.edge_mlp[2].bias,
                            None if att is None else att.weight, None if att is None else att.bias,
                            gcl.coord_mlp[0].weight, gcl.coord_mlp[0].bias, gcl.coord_mlp[2].weight,
                            gcl.node_mlp[0].weight, gcl.node_mlp[0].bias, gcl.node_mlp[2].weight,
                            gcl.node_mlp[2].bias)


def unstack_weights(weights: Sequence[Tensor]) -> list[LayerWeights]:
    """The 13 stacked tensors of the fused ops (``tbg.nn.spec.STACKED_WEIGHTS``) as per-layer weights."""
    if len(weights) != N_WEIGHTS:
        raise ValueError(f"expected {N_WEIGHTS} stacked weight tensors, got {len(weights)}")
    w = dict(zip(WEIGHT_NAMES, weights))  # LayerWeights' fields are the schema names
    # The one-output linears get their [1, H] weight / [1] bias shape back (first_row in the spec).
    first_row = {entry.name for entry in STACKED_WEIGHTS if entry.first_row}
    return [LayerWeights(**{name: t[l:l + 1] if name in first_row else t[l] for name, t in w.items()})
            for l in range(w["w1"].shape[0])]


class _EGNNLike(Protocol):
    """What the reference reads from an ``EGNN`` module."""

    layers: list[nn.Module]
    tanh: bool
    layer_range: float


# ---- the vector field ----------------------------------------------------------------------------
def displacement(layers: Sequence[LayerWeights], h: Tensor, x: Tensor, row: Tensor, col: Tensor,
                 layer_range: float | None, edge_mask: Tensor | None = None,
                 node_mask: Tensor | None = None) -> Tensor:
    """x^(L) - x^(0) for flat atoms: h [M, H] (embedded features), x [M, 3].

    row/col [E]: edge i <- j (row receives). layer_range: the tanh coordinate head's range per
    layer, None for a head without tanh. edge_mask [E, 1], node_mask [M, 1]: 1 for real.
    """
    x0 = x
    # The fixed edge attribute: squared distances of the input coordinates.
    a = (x[row] - x[col]).pow(2).sum(-1, keepdim=True)
    for w in layers:
        d = x[row] - x[col]
        r = d.pow(2).sum(-1, keepdim=True)
        n = d / (torch.sqrt(r + EDGE_EPS) + 1)
        m = fn.silu(fn.linear(fn.silu(fn.linear(torch.cat([h[row], h[col], r, a], dim=1), w.w1, w.b1)), w.w2, w.b2))
        if w.watt is not None:
            m = m * torch.sigmoid(fn.linear(m, w.watt, w.batt))
        if edge_mask is not None:
            m = m * edge_mask
        phi = fn.linear(fn.silu(fn.linear(m, w.wc1, w.bc1)), w.wc2)
        trans = n * (torch.tanh(phi) if layer_range is not None else phi)
        if layer_range is not None:
            trans = trans * layer_range
        if edge_mask is not None:
            trans = trans * edge_mask
        x = x + torch.zeros_like(x).index_add(0, row, trans)
        agg = torch.zeros_like(h).index_add(0, row, m)
        h = h + fn.linear(fn.silu(fn.linear(torch.cat([h, agg], dim=1), w.wn1, w.bn1)), w.wn2, w.bn2)
        if node_mask is not None:
            h = h * node_mask
            x = x * node_mask
    return x - x0


def egnn_displacement(egnn: _EGNNLike, h: Tensor, x: Tensor, row: Tensor, col: Tensor,
                      edge_mask: Tensor | None = None, node_mask: Tensor | None = None) -> Tensor:
    """``displacement`` with the layers of an ``EGNN`` module (as ``EGNN.forward(backend="reference")``)."""
    return displacement([LayerWeights.of(gcl) for gcl in egnn.layers], h, x, row, col,
                        egnn.layer_range if egnn.tanh else None, edge_mask, node_mask)


def remove_mean(v: Tensor, mol_ptr: Tensor, node_mask: Tensor | None = None) -> Tensor:
    """Subtract each molecule's mean over its real atoms; v [M, D], node_mask [M, 1]."""
    mol = molecule_index(mol_ptr)
    n_mol = mol_ptr.numel() - 1
    if node_mask is not None:
        v = v * node_mask
        counts = torch.zeros(n_mol, 1, dtype=v.dtype, device=v.device).index_add(0, mol, node_mask)
    else:
        counts = mol_ptr.diff().unsqueeze(1).to(v.dtype)
    mean = torch.zeros(n_mol, v.shape[1], dtype=v.dtype, device=v.device).index_add(0, mol, v)
    mean = mean / counts.clamp(min=1)
    out = v - mean[mol]
    return out * node_mask if node_mask is not None else out


def layers_field(layers: Sequence[LayerWeights], h0: Tensor, mol_ptr: Tensor, layer_range: float | None) -> Field:
    """x [M, 3] -> v [M, 3] on a ragged batch with fixed embeddings h0 [M, H]."""
    row, col = ragged_edges(mol_ptr)

    def field(x: Tensor) -> Tensor:
        return remove_mean(displacement(layers, h0, x, row, col, layer_range), mol_ptr)

    return field


def egnn_field(egnn: _EGNNLike, h0: Tensor, mol_ptr: Tensor) -> Field:
    """``layers_field`` of an ``EGNN`` module."""
    return layers_field([LayerWeights.of(gcl) for gcl in egnn.layers], h0, mol_ptr,
                        egnn.layer_range if egnn.tanh else None)


# ---- the fused ops' twins ------------------------------------------------------------------------
def egnn_velocity(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: Sequence[Tensor], coords_range: float) -> Tensor:
    """Reference of ``tbg.nn.ops.egnn_velocity``: v [M, 3] of the EGNN stack (attention, tanh head
    of range coords_range per layer) on a ragged batch; differentiable to any order."""
    return layers_field(unstack_weights(weights), h0, mol_ptr, coords_range)(x)


def egnn_divergence(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: Sequence[Tensor], coords_range: float,
                    tangent_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Reference of ``tbg.nn.ops.egnn_divergence``: (v [M, 3], div [B]) by vmap(jvp) over the unit
    tangents, tangent_chunk at a time (None: all at once)."""
    return divergence_vmap_jvp(layers_field(unstack_weights(weights), h0, mol_ptr, coords_range), x, mol_ptr,
                               tangent_chunk)


def egnn_jvp(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: Sequence[Tensor], tangents: Tensor,
             coords_range: float) -> tuple[Tensor, Tensor]:
    """Reference of ``tbg.nn.ops.egnn_jvp``: (v [M, 3], (dv/dx) tangents[k] [K, M, 3])."""
    return field_jvp(layers_field(unstack_weights(weights), h0, mol_ptr, coords_range), x, tangents)


# ---- traces of any ragged field ------------------------------------------------------------------
def divergence_bruteforce(field: Field, x: Tensor, mol_ptr: Tensor, *,
                          create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """The published estimator: one backward pass per local coordinate (3 max(n_b) passes).

    On a padded batch in flat form (mol_ptr = arange(B + 1) * N) this is exactly the published
    loop over the 3N coordinates. ``create_graph`` keeps the graph for gradients of (v, div).
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
