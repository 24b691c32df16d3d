"""The torch implementation of tbg::egnn_divergence and tbg::egnn_jvp: the ops' implementation on
CUDA (registered by ``tbg.nn.ops``), and the differentiable divergence of ``EGNN.divergence``
(autograd through ``divergence`` / ``jvp``).

The algorithm is the CPU kernel's (csrc/divergence/divergence_cpu.cpp): forward-mode
differentiation interleaved with the primal pass, layer by layer, with the same algebra (the first
edge linear split into node-level products, the h tangent starting at zero, no tangent through the
mean, layer 1 only on edges incident to a unit tangent's atom, the last layer only on the edges
that atom receives and without its node update). Where the CPU kernel walks one molecule at a time
with cache-sized blocks, this runs every step over a whole group of molecules as one large tensor
op, which is the shape a GPU wants: the two H x H edge products become [T * E, H] x [H, H] GEMMs.

Unit tangents are shared by the molecules of a group (tangent (a, k) moves atom a of every
molecule that has one; ``tbg.nn.layout.unit_tangents``), so a chunk of T tangents is one [T, M, 3]
tensor. Molecules are grouped, by size, so that T x edges x H stays under
``tbg.nn.spec.TORCH_TANGENT_BUDGET`` (memory O(T E H) per group), and every (group, chunk)
recomputes its primal pass, which costs about one tangent.

Written in device-generic torch ops, so the CPU test suite checks it against the references
(tests/test_divergence.py); on CPU the C++ kernel is the faster of the two (bench/RESULTS.md).
Without autograd the large [T, E, H] tensors are updated in place; with it they are not.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as fn
from torch import Tensor

from tbg.nn import spec
from tbg.nn.layout import (check_mol_ptr, local_index, max_atoms, mol_ptr_from_sizes, per_molecule_sum, ragged_edges,
                           unit_tangents)
from tbg.nn.reference import remove_mean


class _Layer(NamedTuple):
    """One layer's weights, split the way the algebra uses them."""

    w1i: Tensor
    w1j: Tensor
    wr: Tensor
    wa: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    watt: Tensor
    batt: Tensor
    wc1: Tensor
    bc1: Tensor
    wc2: Tensor
    wn1h: Tensor
    wn1a: Tensor
    bn1: Tensor
    wn2: Tensor
    bn2: Tensor


class _EdgeCache(NamedTuple):
    """The primal edge activations the tangents need, [E, ...]."""

    d: Tensor       # x_i - x_j [E, 3]
    sq: Tensor      # sqrt(r + eps) [E]
    s: Tensor       # sq + 1 [E]
    nv: Tensor      # d / s [E, 3]
    slope1: Tensor  # SiLU slopes of the two edge linears [E, H]
    slope2: Tensor
    m0: Tensor      # message before the attention gate [E, H]
    g: Tensor       # attention gate [E]
    slopec: Tensor  # SiLU slope of the coordinate MLP [E, H]
    phi: Tensor     # tanh coordinate weight [E]

    def take(self, index: Tensor) -> "_EdgeCache":
        return _EdgeCache(*(f[index] for f in self))


def _split_layers(weights: tuple[Tensor, ...]) -> list[_Layer]:
    w = dict(zip(spec.WEIGHT_NAMES, weights))  # the stacked weights by schema name
    hidden = w["w1"].shape[1]
    return [_Layer(w["w1"][l, :, :hidden], w["w1"][l, :, hidden:2 * hidden], w["w1"][l, :, 2 * hidden],
                   w["w1"][l, :, 2 * hidden + 1], w["b1"][l], w["w2"][l], w["b2"][l], w["watt"][l], w["batt"][l],
                   w["wc1"][l], w["bc1"][l], w["wc2"][l], w["wn1"][l, :, :hidden], w["wn1"][l, :, hidden:],
                   w["bn1"][l], w["wn2"][l], w["bn2"][l]) for l in range(w["w1"].shape[0])]


def _silu_and_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def _check_args(op: str, x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...]) -> None:
    """The checks of csrc/common/egnn_args.h (and mol_ptr on every device), as RuntimeError."""
    spec.check_points(op, x, h0)
    if mol_ptr.device != x.device:
        raise RuntimeError(f"{op}: mol_ptr is on {mol_ptr.device} but x is on {x.device}")
    try:
        check_mol_ptr(mol_ptr, x.shape[0])
    except ValueError as err:
        raise RuntimeError(f"{op}: {err}") from None
    spec.check_weights(op, x, h0, weights)
    if not bool(torch.isfinite(x).all()):
        raise RuntimeError(f"{op}: x contains NaN or infinite values")


# ---- one layer ----------------------------------------------------------------------------------
def _primal_layer(w: _Layer, h: Tensor, x: Tensor, a: Tensor, row: Tensor, col: Tensor,
                  coords_range: float) -> tuple[_EdgeCache, Tensor, Tensor]:
    """Primal edge pass: the cache, x after the coordinate update, and agg = sum_j m_ij."""
    d = x[row] - x[col]
    r = (d * d).sum(1)
    sq = torch.sqrt(r + spec.EDGE_EPS)
    s = sq + 1
    pre1 = (fn.linear(h, w.w1i, w.b1)[row] + fn.linear(h, w.w1j)[col] + r.unsqueeze(1) * w.wr
            + a.unsqueeze(1) * w.wa)
    u, slope1 = _silu_and_slope(pre1)
    m0, slope2 = _silu_and_slope(fn.linear(u, w.w2, w.b2))
    g = torch.sigmoid(m0 @ w.watt + w.batt)
    m = m0 * g.unsqueeze(1)
    c, slopec = _silu_and_slope(fn.linear(m, w.wc1, w.bc1))
    phi = torch.tanh(c @ w.wc2)
    nv = d / s.unsqueeze(1)
    x_next = x.index_add(0, row, nv * (phi * coords_range).unsqueeze(1))
    agg = torch.zeros_like(h).index_add(0, row, m)
    return _EdgeCache(d, sq, s, nv, slope1, slope2, m0, g, slopec, phi), x_next, agg


def _mul(a: Tensor, b: Tensor, inplace: bool) -> Tensor:
    return a.mul_(b) if inplace else a * b


def _addcmul(a: Tensor, b: Tensor, c: Tensor, inplace: bool) -> Tensor:
    return a.addcmul_(b, c) if inplace else torch.addcmul(a, b, c)


def _edge_tangent(w: _Layer, c: _EdgeCache, dd: Tensor, dpq: Tensor | None, da: Tensor | None,
                  coords_range: float, inplace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Tangents of the edge MLP and coordinate head on (tangent, edge) pairs of any leading shape.

    dd [..., 3] tangent of d_ij; dpq [..., H] the h part of the first edge linear (None while the h
    tangent is zero; overwritten when inplace); da [...] tangent of the edge attribute, None at layer
    1, where it equals the distance tangent. The cache c broadcasts against the leading shape.
    Returns the coordinate update tangent [..., 3], the message tangent [..., H] and da. The
    [..., H] tensors carry the memory traffic, so they are updated in place unless autograd records.
    """
    dr = 2 * (dd * c.d).sum(-1)
    da = dr if da is None else da
    dpre = dr.unsqueeze(-1) * w.wr if dpq is None else _addcmul(dpq, dr.unsqueeze(-1), w.wr, inplace)
    dpre = _mul(_addcmul(dpre, da.unsqueeze(-1), w.wa, inplace), c.slope1, inplace)
    y = _mul(fn.linear(dpre, w.w2), c.slope2, inplace)
    gate = (y @ w.watt) * c.g * (1 - c.g)  # before y is overwritten below
    dm = _addcmul(_mul(y, c.g.unsqueeze(-1), inplace), c.m0, gate.unsqueeze(-1), inplace)
    dphi = (1 - c.phi * c.phi) * (_mul(fn.linear(dm, w.wc1), c.slopec, inplace) @ w.wc2)
    dn = dd / c.s.unsqueeze(-1) - c.d * (dr / (2 * c.sq * c.s * c.s)).unsqueeze(-1)
    dtrans = (dn * c.phi.unsqueeze(-1) + c.nv * dphi.unsqueeze(-1)) * coords_range
    return dtrans, dm, da


# ---- the stack ----------------------------------------------------------------------------------
Rows = tuple[Tensor, Tensor]  # (tangent index, edge index) pairs


def _forward_mode(layers: list[_Layer], x: Tensor, h0: Tensor, row: Tensor, col: Tensor, dX: Tensor,
                  coords_range: float, first_rows: Rows | None = None,
                  last_rows: Rows | None = None) -> tuple[Tensor, Tensor]:
    """x^L and its tangents [T, M, 3] for tangents dX [T, M, 3] of x (h^0 carries none).

    first_rows / last_rows restrict layer 1 / the last layer to the given (tangent, edge) pairs,
    for unit tangents whose other pairs are zero there (layer 1) or not needed (last layer).
    """
    n_tan, n_atoms = dX.shape[:2]
    hidden = h0.shape[1]
    inplace = not torch.is_grad_enabled()
    a = (x[row] - x[col]).pow(2).sum(1)
    h = h0
    dP = dQ = dH = da = None
    for l, w in enumerate(layers):
        first, last = l == 0, l + 1 == len(layers)
        cache, x_next, agg = _primal_layer(w, h, x, a, row, col, coords_range)
        rows = last_rows if last else first_rows if first else None
        if rows is None:
            dd = dX.index_select(1, row) - dX.index_select(1, col)
            dpq = None if dP is None else dP.index_select(1, row) + dQ.index_select(1, col)
            dtrans, dm, da_l = _edge_tangent(w, cache, dd, dpq, None if first else da, coords_range, inplace)
            target = (torch.arange(n_tan, device=x.device).unsqueeze(1) * n_atoms + row).reshape(-1)
        else:
            t_idx, e_idx = rows
            r_idx, c_idx = row[e_idx], col[e_idx]
            dd = dX[t_idx, r_idx] - dX[t_idx, c_idx]
            dpq = None if dP is None else dP[t_idx, r_idx] + dQ[t_idx, c_idx]
            da_r = None if first else da[t_idx, e_idx]
            dtrans, dm, da_l = _edge_tangent(w, cache.take(e_idx), dd, dpq, da_r, coords_range, inplace)
            target = t_idx * n_atoms + r_idx
        if first:
            # Unit tangents leave the attributes of the edges outside first_rows at zero.
            da = da_l if rows is None else dX.new_zeros(n_tan, row.numel()).index_put((t_idx, e_idx), da_l)
        dX = dX.reshape(-1, 3).index_add(0, target, dtrans.reshape(-1, 3)).view(n_tan, n_atoms, 3)
        x = x_next
        if last:
            break
        dagg = dX.new_zeros(n_tan * n_atoms, hidden).index_add(0, target, dm.reshape(-1, hidden))
        hz, slope = _silu_and_slope(fn.linear(h, w.wn1h, w.bn1) + fn.linear(agg, w.wn1a))
        h = h + fn.linear(hz, w.wn2, w.bn2)
        dz = fn.linear(dagg.view(n_tan, n_atoms, hidden), w.wn1a)
        if dH is not None:
            dz = dz + fn.linear(dH, w.wn1h)
        dh = fn.linear(dz * slope, w.wn2)
        dH = dh if dH is None else dH + dh
        dP, dQ = fn.linear(dH, layers[l + 1].w1i), fn.linear(dH, layers[l + 1].w1j)
    return x, dX


def _rows_at_atom(local_end: Tensor, t0: int, n_tan: int) -> Rows:
    """(t, e) pairs where the edge end local_end[e] (an atom's index in its molecule) is the atom of
    unit tangent t0 + t, i.e. (t0 + t) // 3."""
    lo, hi = t0 // 3, (t0 + n_tan - 1) // 3
    e = ((local_end >= lo) & (local_end <= hi)).nonzero().squeeze(1)
    t = 3 * local_end[e].unsqueeze(1) + torch.arange(3, device=e.device) - t0  # [S, 3]
    keep = (t >= 0) & (t < n_tan)
    return t[keep], e.unsqueeze(1).expand_as(t)[keep]


def _groups(sizes: list[int], per_edge: int) -> list[list[int]]:
    """Molecules in groups whose edges x per_edge stay under the budget (at least one molecule each),
    smallest molecules first: a group computes 3 x its largest molecule's atoms tangents for every
    member, so members of similar size waste little."""
    groups: list[list[int]] = [[]]
    load = 0
    for b in sorted(range(len(sizes)), key=sizes.__getitem__):
        cost = sizes[b] * (sizes[b] - 1) * per_edge
        if groups[-1] and load + cost > spec.TORCH_TANGENT_BUDGET:
            groups.append([])
            load = 0
        groups[-1].append(b)
        load += cost
    return groups


def _remove_mean_tangents(v: Tensor, mol_ptr: Tensor) -> Tensor:
    """Per-molecule mean removal of tangents [T, M, 3] (reference.remove_mean, batched over T)."""
    n_tan, n_atoms = v.shape[:2]
    flat = v.permute(1, 0, 2).reshape(n_atoms, 3 * n_tan)
    return remove_mean(flat, mol_ptr).view(n_atoms, n_tan, 3).permute(1, 0, 2)


class _Group(NamedTuple):
    """Some whole molecules: their atoms (indices into the batch), molecule ids, largest size, and
    their inputs as a ragged batch of its own (offsets from 0, edges)."""

    atoms: Tensor
    molecules: Tensor
    max_atoms: int
    x: Tensor
    h0: Tensor
    mol_ptr: Tensor
    row: Tensor
    col: Tensor


def _each_group(x: Tensor, h0: Tensor, mol_ptr: Tensor, per_edge: int) -> Iterator[_Group]:
    ptr = mol_ptr.tolist()
    sizes = [q - p for p, q in zip(ptr[:-1], ptr[1:])]
    for members in _groups(sizes, per_edge):
        n = [sizes[b] for b in members]
        gptr = mol_ptr_from_sizes(n, device="cpu")  # index arithmetic on the host, one copy over
        starts = torch.tensor([ptr[b] for b in members], dtype=torch.long, device="cpu")
        atoms = (torch.repeat_interleave(starts - gptr[:-1], torch.tensor(n, dtype=torch.long, device="cpu"))
                 + torch.arange(int(gptr[-1]), device="cpu")).to(x.device)
        gptr = gptr.to(x.device)
        row, col = ragged_edges(gptr)
        yield _Group(atoms, torch.tensor(members, dtype=torch.long, device=x.device), max(n, default=0),
                     x[atoms], h0[atoms], gptr, row, col)


def default_tangent_chunk(mol_ptr: Tensor, hidden: int) -> int:
    """Every tangent of the largest molecule in one chunk when that molecule fits the budget (so the
    primal pass is computed once per group); groups then fill the budget."""
    n = max(max_atoms(mol_ptr), 2)
    return max(1, min(3 * n, spec.TORCH_TANGENT_BUDGET // (n * (n - 1) * hidden)))


def divergence(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...], coords_range: float,
               tangent_chunk: int) -> tuple[Tensor, Tensor]:
    """(v [M, 3], div [B]) on a ragged batch; differentiable in x, h0 and the weights when autograd
    records (then without the in-place updates, so slower and with every chunk's activations kept)."""
    _check_args("egnn_divergence", x, h0, mol_ptr, weights)
    if tangent_chunk < 1:
        raise RuntimeError(f"egnn_divergence: tangent_chunk must be >= 1, got {tangent_chunk}")
    layers = _split_layers(weights)
    v, div = torch.zeros_like(x), x.new_zeros(mol_ptr.numel() - 1)
    for g in _each_group(x, h0, mol_ptr, tangent_chunk * h0.shape[1]):
        local = local_index(g.mol_ptr)
        loc_row, loc_col = local[g.row], local[g.col]
        diag = torch.zeros_like(g.x[:, 0])  # d(x^L - x^0)_ak / dx_ak summed over k, per atom
        for t0 in range(0, max(3 * g.max_atoms, 1), tangent_chunk):
            n_tan = min(tangent_chunk, 3 * g.max_atoms - t0)
            tangents = unit_tangents(g.mol_ptr, x.dtype, t0, t0 + n_tan)
            received, sent = _rows_at_atom(loc_row, t0, n_tan), _rows_at_atom(loc_col, t0, n_tan)
            incident = (torch.cat([received[0], sent[0]]), torch.cat([received[1], sent[1]]))
            xl, dX = _forward_mode(layers, g.x, g.h0, g.row, g.col, tangents, coords_range, incident, received)
            diag = diag + ((dX - tangents) * tangents).sum((0, 2))
        v[g.atoms] = remove_mean(xl - g.x, g.mol_ptr)
        div[g.molecules] = per_molecule_sum(diag, g.mol_ptr)
    return v, div


def jvp(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...], tangents: Tensor,
        coords_range: float) -> tuple[Tensor, Tensor]:
    """(v [M, 3], (dv/dx) tangents[k] [K, M, 3]) on a ragged batch; differentiable like divergence."""
    _check_args("egnn_jvp", x, h0, mol_ptr, weights)
    if tangents.dim() != 3 or tangents.shape[1:] != x.shape:
        raise RuntimeError(f"egnn_jvp: tangents must have shape [K, M, 3] with M = {x.shape[0]}, "
                           f"got {tuple(tangents.shape)}")
    if tangents.dtype != x.dtype or tangents.device != x.device:
        raise RuntimeError("egnn_jvp: tangents must match x in dtype and device")
    if not bool(torch.isfinite(tangents).all()):
        raise RuntimeError("egnn_jvp: x or tangents contain NaN or infinite values")
    layers = _split_layers(weights)
    n_probe = tangents.shape[0]
    chunk = max(1, min(n_probe, default_tangent_chunk(mol_ptr, h0.shape[1])))
    v, out = torch.zeros_like(x), torch.zeros_like(tangents)
    for g in _each_group(x, h0, mol_ptr, chunk * h0.shape[1]):
        for k0 in range(0, max(n_probe, 1), chunk):  # one pass even for K = 0: it computes v
            tan = tangents[k0:k0 + chunk].index_select(1, g.atoms)
            xl, dX = _forward_mode(layers, g.x, g.h0, g.row, g.col, tan, coords_range)
            out[k0:k0 + chunk, g.atoms] = _remove_mean_tangents(dX - tan, g.mol_ptr)
        v[g.atoms] = remove_mean(xl - g.x, g.mol_ptr)
    return v, out


# The op implementations with the ops' schemas (registered for CUDA by tbg.nn.ops).
@torch.no_grad()
def egnn_divergence(x: Tensor, h0: Tensor, mol_ptr: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    """tbg::egnn_divergence: the 13 weights, coords_range, tangent_chunk after mol_ptr."""
    return divergence(x, h0, mol_ptr, args[:spec.N_WEIGHTS], *args[spec.N_WEIGHTS:])


@torch.no_grad()
def egnn_jvp(x: Tensor, h0: Tensor, mol_ptr: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    """tbg::egnn_jvp: the 13 weights, tangents, coords_range after mol_ptr."""
    return jvp(x, h0, mol_ptr, args[:spec.N_WEIGHTS], *args[spec.N_WEIGHTS:])
