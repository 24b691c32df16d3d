"""The EGNN stack on the host side of the Triton ops, shared by tbg.nn.triton.divergence and
tbg.nn.triton.egnn: input checks, the weights rearranged for the kernels, the primal (forward) pass with
its edge kernel, and the per-molecule mean removal.

The primal pass runs per layer the node-level products [P | Q] = h [W1i^T | W1j^T] + (b1, 0) and the node
MLP as torch GEMMs (cuBLAS on a GPU) and the edge work in ``edge_forward_kernel``: tiles of receivers x
senders of one molecule (tbg.nn.triton.plan.EdgeTiles), the two H x H products as tl.dots over the tile's
edge rows (tbg.nn.triton.edge), the sums over senders in registers; every program owns the receivers it
writes (x_out, agg), so there are no atomics. Work items are (molecule, split), split s taking the
molecule's receiver tiles s, s + splits, ...; loop bounds come from mol_ptr on the device, so the grid
(molecules x splits) needs no device value on the host.

Precision: float64 throughout in float64. float32 dots use TF32 tensor cores (input_precision "tf32")
when the user allows TF32 through PyTorch's switch (``torch.backends.cuda.matmul.allow_tf32``, also set
by ``torch.set_float32_matmul_precision("high")``), "ieee" otherwise; the torch GEMMs follow the same
switch. On the CPU (interpreter) always "ieee".
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from tbg.nn import spec
from tbg.nn.triton.edge import edge_coordinate, edge_geometry, edge_message
from tbg.nn.triton.plan import EdgeTiles, default_edge_tiles, padded_hidden, work_split
from tbg.nn.triton.ragged import center_kernel


# ---- the primal edge kernel -----------------------------------------------------------------------------
@triton.jit
def edge_forward_kernel(x_ptr, x0_ptr, pq_ptr, mol_ptr,
                        wr_ptr, wa_ptr, w2t_ptr, b2_ptr, watt_ptr, batt_ptr, wc1t_ptr, bc1_ptr, wc2_ptr, range_ptr,
                        x_out_ptr, agg_ptr, H, n_items,
                        COORDS: tl.constexpr, AGG: tl.constexpr, SPLITS: tl.constexpr, EPS: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Primal edge pass of one layer from pq = [P | Q] [M, 2H] of its node features: with COORDS
    x_out[i] = x[i] + range sum_j phi_ij d_ij / s_ij, with AGG agg[i] = sum_j m_ij (without COORDS only
    the message half of the edge MLP runs). Program p takes the work items p, p + programs, ... < n_items;
    item w is split w % SPLITS of molecule w // SPLITS."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    c = tl.arange(0, 4)
    rows = tl.arange(0, BLOCK_I * BLOCK_J)
    row_i, row_j = rows // BLOCK_J, rows % BLOCK_J
    wr = tl.load(wr_ptr + offs_h, mask=h_ok, other=0.0)
    wa = tl.load(wa_ptr + offs_h, mask=h_ok, other=0.0)
    b2 = tl.load(b2_ptr + offs_h, mask=h_ok, other=0.0)
    watt = tl.load(watt_ptr + offs_h, mask=h_ok, other=0.0)
    bc1 = tl.load(bc1_ptr + offs_h, mask=h_ok, other=0.0)
    wc2 = tl.load(wc2_ptr + offs_h, mask=h_ok, other=0.0)
    batt = tl.load(batt_ptr)
    scale = tl.load(range_ptr)
    dtype = x_ptr.dtype.element_ty
    for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
        mol = item // SPLITS
        start = tl.load(mol_ptr + mol)
        end = tl.load(mol_ptr + mol + 1)
        for i0 in range(start + (item % SPLITS) * BLOCK_I, end, SPLITS * BLOCK_I):
            own = i0 + tl.arange(0, BLOCK_I)
            own_ok = own < end
            i = i0 + row_i
            i_ok = i < end
            p_i = tl.load(pq_ptr + own[:, None] * 2 * H + offs_h[None, :], mask=own_ok[:, None] & h_ok[None, :],
                          other=0.0)
            # Sums over senders per receiver tile: [BLOCK_I, .] accumulators keep few registers live.
            moved = tl.zeros((BLOCK_I, 4), dtype)
            agg = tl.zeros((BLOCK_I, BLOCK_H), dtype)
            for j0 in range(start, end, BLOCK_J):
                senders = j0 + tl.arange(0, BLOCK_J)
                q_j = tl.load(pq_ptr + senders[:, None] * 2 * H + H + offs_h[None, :],
                              mask=(senders < end)[:, None] & h_ok[None, :], other=0.0)
                j = j0 + row_j
                ok = i_ok & (j < end) & (j != i)
                d, r, sq, s, e = edge_geometry(x_ptr, x0_ptr, i, j, ok, EPS)
                pre1 = (tl.reshape(p_i[:, None, :] + q_j[None, :, :], (BLOCK_I * BLOCK_J, BLOCK_H))
                        + r[:, None] * wr[None, :] + tl.sum(e * e, axis=1)[:, None] * wa[None, :])
                _, _, _, _, _, _, m = edge_message(pre1, w2t_ptr, b2, watt, batt, offs_h, h_ok, H, PRECISION)
                if AGG:
                    agg += tl.sum(tl.reshape(tl.where(ok[:, None], m, 0.0), (BLOCK_I, BLOCK_J, BLOCK_H)), axis=1)
                if COORDS:
                    phi, _, _, _ = edge_coordinate(m, wc1t_ptr, bc1, wc2, offs_h, h_ok, H, PRECISION)
                    trans = tl.where(ok, phi / s, 0.0)[:, None] * d
                    moved += tl.sum(tl.reshape(trans, (BLOCK_I, BLOCK_J, 4)), axis=1)
            if COORDS:
                xc = own[:, None] * 3 + c[None, :]
                xc_ok = own_ok[:, None] & (c < 3)[None, :]
                tl.store(x_out_ptr + xc, tl.load(x_ptr + xc, mask=xc_ok, other=0.0) + scale * moved, mask=xc_ok)
            if AGG:
                tl.store(agg_ptr + own[:, None] * H + offs_h[None, :], agg, mask=own_ok[:, None] & h_ok[None, :])


def interpreted() -> bool:
    """Whether the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 when this module
    was imported): then they run on CPU tensors, not on a GPU."""
    return not isinstance(edge_forward_kernel, triton.runtime.JITFunction)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision: "tf32" for float32 on a GPU when PyTorch's TF32 switch is on, else "ieee"."""
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def alloc(*shape: int, like: Tensor) -> Tensor:
    """Uninitialised buffer like `like` (every element is written before it is read; the tests make
    this NaN-filled to check that)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


# ---- tiles -----------------------------------------------------------------------------------------------
_tiles_override: EdgeTiles | None = None


@contextlib.contextmanager
def use_tiles(tiles: EdgeTiles) -> Iterator[None]:
    """Run the edge kernels with these tiles inside the block (tests, tuning in bench/)."""
    global _tiles_override
    tiles.check(native=not interpreted())
    previous, _tiles_override = _tiles_override, tiles
    try:
        yield
    finally:
        _tiles_override = previous


# ---- inputs ----------------------------------------------------------------------------------------------
class Weights(NamedTuple):
    """The 13 stacked weights rearranged once per call for the kernels and the torch GEMMs."""

    w1h_t: Tensor   # [L, H, 2H]: h @ w1h_t[l] = [h W1i^T | h W1j^T]
    b1pq: Tensor    # [L, 2H]: (b1, 0), the bias of [P | Q]
    wr: Tensor      # [L, H] first-linear columns of r and a
    wa: Tensor
    w2t: Tensor     # [L, H, H] transposed (input-major) for tl.dot
    b2: Tensor
    watt: Tensor
    batt: Tensor    # [L]
    wc1t: Tensor
    bc1: Tensor
    wc2: Tensor
    wn1h_t: Tensor  # [L, H, H] node MLP, transposed for torch.mm
    wn1a_t: Tensor
    bn1: Tensor
    wn2_t: Tensor
    bn2: Tensor
    w2: Tensor      # [L, H, H] as given ([out, in]): the input gradients of the backward
    wc1: Tensor


def pack(weights: tuple[Tensor, ...]) -> Weights:
    w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2 = weights
    hidden = w1.shape[1]
    w1h_t = torch.cat([w1[:, :, :hidden].transpose(1, 2), w1[:, :, hidden:2 * hidden].transpose(1, 2)], dim=2)
    return Weights(w1h_t.contiguous(), torch.cat([b1, torch.zeros_like(b1)], dim=1),
                   w1[:, :, 2 * hidden].contiguous(), w1[:, :, 2 * hidden + 1].contiguous(),
                   w2.transpose(1, 2).contiguous(), b2.contiguous(), watt.contiguous(), batt.contiguous(),
                   wc1.transpose(1, 2).contiguous(), bc1.contiguous(), wc2.contiguous(),
                   wn1[:, :, :hidden].transpose(1, 2).contiguous(), wn1[:, :, hidden:].transpose(1, 2).contiguous(),
                   bn1.contiguous(), wn2.transpose(1, 2).contiguous(), bn2.contiguous(), w2.contiguous(),
                   wc1.contiguous())


def layer_edge_weights(w: Weights, layer: int) -> tuple[Tensor, ...]:
    """The edge weights of one layer in the kernels' argument order (wr ... wc2)."""
    return (w.wr[layer], w.wa[layer], w.w2t[layer], w.b2[layer], w.watt[layer], w.batt[layer:layer + 1],
            w.wc1t[layer], w.bc1[layer], w.wc2[layer])


def check_inputs(op: str, x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...]) -> None:
    """Shape, dtype and device checks (metadata only, no device read), as RuntimeError."""
    spec.check_points(op, x, h0)
    if mol_ptr.device != x.device or mol_ptr.dtype != torch.long or mol_ptr.dim() != 1 or mol_ptr.numel() < 1:
        raise RuntimeError(f"{op}: mol_ptr must be a 1-d int64 tensor of length n_molecules + 1 on {x.device}, "
                           f"got shape {tuple(mol_ptr.shape)}, {mol_ptr.dtype} on {mol_ptr.device}")
    spec.check_weights(op, x, h0, weights)


def assert_mol_ptr(op: str, mol_ptr: Tensor, n_atoms: int) -> None:
    """Checks on the device, without a host read, that mol_ptr starts at 0, never decreases and ends at
    n_atoms: on a GPU a failure is a device-side assertion when the check runs (like the .cu kernels'),
    on the CPU a RuntimeError here."""
    ok = (mol_ptr[0] == 0) & (mol_ptr[-1] == n_atoms) & (mol_ptr.diff() >= 0).all()
    torch._assert_async(ok, f"{op}: mol_ptr must start at 0, never decrease and end at M = {n_atoms}")


class Batch(NamedTuple):
    """What every launch of a call shares."""

    x0: Tensor
    mol_ptr: Tensor
    weights: Weights
    range_: Tensor      # [1] coords_range in x's dtype (a float argument would be float32)
    tiles: EdgeTiles
    block_h: int
    precision: str
    splits: int         # work items per molecule
    programs: int       # the most programs of a backward launch


def batch(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...], coords_range: float) -> Batch:
    hidden = h0.shape[1]
    tiles = _tiles_override or default_edge_tiles(hidden)
    tiles.check(native=not interpreted())
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else None
    splits, programs = work_split(mol_ptr.numel() - 1, tiles, sm_count)
    return Batch(x, mol_ptr, pack(weights), torch.full((1,), coords_range, dtype=x.dtype, device=x.device), tiles,
                 padded_hidden(hidden), dot_precision(x.dtype, x.device), splits, programs)


# ---- the primal pass -------------------------------------------------------------------------------------
def edge_pass(b: Batch, layer: int, x: Tensor, pq: Tensor, x_out: Tensor | None, agg: Tensor | None) -> None:
    """The edge work of one layer (edge_forward_kernel): x_out and / or agg, whichever is given."""
    n_items = (b.mol_ptr.numel() - 1) * b.splits
    if n_items == 0:
        return
    torch.library.wrap_triton(edge_forward_kernel)[(n_items,)](
        x, b.x0, pq, b.mol_ptr, *layer_edge_weights(b.weights, layer), b.range_,
        x_out if x_out is not None else x, agg if agg is not None else pq, pq.shape[1] // 2, n_items,
        COORDS=x_out is not None, AGG=agg is not None, SPLITS=b.splits, EPS=spec.EDGE_EPS,
        BLOCK_I=b.tiles.receivers, BLOCK_J=b.tiles.senders, BLOCK_H=b.block_h, PRECISION=b.precision,
        num_warps=b.tiles.warps, num_stages=b.tiles.stages)


def primal(b: Batch, h0: Tensor, xs: Tensor, *, h_states: Tensor | None = None, pq: Tensor | None = None,
           node_slope: Tensor | None = None) -> None:
    """The forward pass: xs [L + 1, M, 3] gets x entering each layer, then the output; optionally
    h_states [L, M, H] the h entering each layer, pq [L, M, 2H] each layer's [P | Q] and node_slope
    [L - 1, M, H] the SiLU slope of each node update (the last layer's node update feeds nothing and is
    skipped)."""
    n_atoms, hidden = h0.shape
    w = b.weights
    n_layers = w.w2t.shape[0]
    agg = alloc(n_atoms, hidden, like=h0)
    scratch = alloc(n_atoms, 2 * hidden, like=h0) if pq is None else None
    xs[0] = b.x0
    h = h0
    for layer in range(n_layers):
        if h_states is not None:
            h_states[layer] = h
        last = layer + 1 == n_layers
        pq_l = torch.addmm(w.b1pq[layer], h, w.w1h_t[layer], out=scratch if pq is None else pq[layer])
        edge_pass(b, layer, xs[layer], pq_l, xs[layer + 1], None if last else agg)
        if not last:
            z = torch.addmm(w.bn1[layer], h, w.wn1h_t[layer]).addmm_(agg, w.wn1a_t[layer])
            sig = torch.sigmoid(z)
            if node_slope is not None:
                torch.mul(sig, 1 + z * (1 - sig), out=node_slope[layer])
            h = torch.addmm(w.bn2[layer], z * sig, w.wn2_t[layer]).add_(h)


def center(a: Tensor, b: Tensor | None, mol_ptr: Tensor) -> Tensor:
    """a - b (or a) with each molecule's mean removed, per leading index: [K, M, 3] or [M, 3]."""
    out = alloc(*a.shape, like=a)
    n_mol, n_rows = mol_ptr.numel() - 1, a.shape[0] if a.dim() == 3 else 1
    if n_mol and out.numel():
        torch.library.wrap_triton(center_kernel)[(n_mol, n_rows)](
            a, b if b is not None else a, out, mol_ptr, a.shape[-2], SUBTRACT_B=b is not None, BLOCK=32)
    return out
