"""Plain-PyTorch reference of the published TBG vector field: the oracle for every kernel.

Written in the edge-list form of the published EGNN (``../shared/reference/tbg-model.md``):
flat atoms, receiver/sender index pairs (row, col), optional edge and node masks. Every batch
layout reduces to this form (``tbg.nn.layout``); the fused ops in ``tbg.nn.ops`` must agree with
it to rounding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tbg.nn.layout import molecule_index

if TYPE_CHECKING:
    from tbg.nn.egnn import EGNN


def egnn_displacement(egnn: "EGNN", h: Tensor, x: Tensor, row: Tensor, col: Tensor,
                      edge_mask: Tensor | None = None, node_mask: Tensor | None = None) -> Tensor:
    """x^(L) - x^(0) for flat atoms: h [M, H] (embedded features), x [M, 3].

    row/col [E]: edge i <- j (row receives). edge_mask [E, 1], node_mask [M, 1]: 1 for real.
    """
    x0 = x
    # The fixed edge attribute: squared distances of the input coordinates.
    a = (x[row] - x[col]).pow(2).sum(-1, keepdim=True)
    for gcl in egnn.layers:
        d = x[row] - x[col]
        r = d.pow(2).sum(-1, keepdim=True)
        n = d / (torch.sqrt(r + 1e-8) + 1)
        m = gcl.edge_mlp(torch.cat([h[row], h[col], r, a], dim=1))
        if gcl.att_mlp is not None:
            m = m * gcl.att_mlp(m)
        if edge_mask is not None:
            m = m * edge_mask
        trans = n * gcl.coord_mlp(m)
        if egnn.tanh:
            trans = trans * egnn.layer_range
        if edge_mask is not None:
            trans = trans * edge_mask
        x = x + torch.zeros_like(x).index_add(0, row, trans)
        agg = torch.zeros_like(h).index_add(0, row, m)
        h = h + gcl.node_mlp(torch.cat([h, agg], dim=1))
        if node_mask is not None:
            h = h * node_mask
            x = x * node_mask
    return x - x0


def remove_mean(v: Tensor, mol_ptr: Tensor, node_mask: Tensor | None = None) -> Tensor:
    """Subtract each molecule's mean over its real atoms; v [M, 3], node_mask [M, 1]."""
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
