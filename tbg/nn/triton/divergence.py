"""tbg::egnn_divergence and tbg::egnn_jvp in Triton: exact divergence and JVPs with the (tangent,
edge, H) rows kept on chip.

Algorithm: the CPU kernel's (csrc/divergence/divergence_cpu.cpp) forward-mode differentiation, layer
by layer, with its structure: the first edge linear split into node-level products (P = h W1i^T + b1,
Q = h W1j^T, and their tangents dP, dQ), the h tangent zero at layer 1, no tangent through the mean
removal, the last layer only on the edges a unit tangent's atom receives and only its own coordinate,
no node update in the last layer. Differences, both exact:

- Layer 1 is done per edge, not per (tangent, edge). There the h tangent is zero, so the first edge
  linear's tangent is dr (wr + wa) for every tangent (da = dr at layer 1): each edge's message and
  coordinate-weight tangents are dr times one per-edge vector (dm1 [H], dphi1), computed with the two
  H x H products once per edge tile; the tangents combine them by one [T, J] x [J, H] dot. This costs
  less than the CPU kernel's GEMMs over the 2 (n - 1) incident edges of each unit tangent, and the same
  code serves Hutchinson probes (JVP), whose layer 1 touches every edge.
- The primal edge activations are recomputed in each program instead of cached: a [J, H] tile costs
  1 / BLOCK_T of the tangent work on it and saves an [E, H] cache in global memory.

Layout and programs. Tangents are shared by the molecules of the batch (tangent (a, k) moves atom a
of every molecule that has one, tbg.nn.layout.unit_tangents), so the tangent state of a chunk of T
tangents is [T, M, ...]: dX [T, M, 3], dPQ [T, M, 2H], dH and dagg [T, M, H], O(T M H) memory. Per
layer, ``_tangent_layer_kernel`` runs one program per (receiver atom i, tile of BLOCK_T tangents),
looping over sender tiles of its molecule with run-time bounds from mol_ptr; per tile it recomputes the
primal edge MLP ([J, H] x [H, H] dots, tbg.nn.triton.edge) and pushes the BLOCK_T x J rows
through the two H x H products as [BLOCK_T J, H] x [H, H] tl.dots with the SiLU slopes, the attention
gate and the coordinate head as epilogues (edge_mlp_tangent), summing over senders in registers. Every
program owns its outputs (dX' and dagg at (t, i)), so there are no atomics and no [T, E, H] tensor in
global memory. The node-level tangent products ([T M, H] x [H, H]: Wn1, Wn2, the next layer's W1
halves) run as torch GEMMs (cuBLAS on a GPU); the primal pass is the one every EGNN op shares
(tbg.nn.triton.stack: its input checks, edge kernel and mean removal too). The last layer of the exact
divergence runs one program per atom over its own 3 tangents and adds its trace to diag[i]; per-molecule
sums and mean removals are Triton kernels with one program per molecule (tbg.nn.triton.ragged):
deterministic, no atomics.

Precision: float64 throughout in float64. float32 dots use TF32 tensor cores (input_precision "tf32")
when the user allows TF32 through PyTorch's switch (``torch.backends.cuda.matmul.allow_tf32``, also set
by ``torch.set_float32_matmul_precision("high")``), "ieee" otherwise; the torch GEMMs follow the same
switch. On the CPU (interpreter) always "ieee".

Host synchronisation: one per call, before any kernel: mol_ptr and the finiteness flags of the inputs
come to the host in a single copy (``_host_view``). They give the input checks and the largest molecule
n_max, which sizes the grid (3 n_max unit tangents) and the chunk loop; nothing inside the layer and
chunk loops reads device values.

Registration (why not ``torch.library.triton_op``): triton_op defines a new operator with its own
schema; our operators are defined once in C++ (csrc/ops.cpp) with their CPU kernels and the fake
kernels of tbg.nn.ops, and must stay the one public interface. So ``egnn_divergence`` / ``egnn_jvp``
below are plain Python implementations with the ops' signatures, registered for the CUDA dispatch key
by tbg.nn.ops (``torch.library.impl``; tbg.nn.triton.cuda_implementations hands them over);
torch.compile treats the op as opaque through its fake kernel and calls this code at run time. Kernels
are launched through ``torch.library.wrap_triton``, so the implementation functions themselves can
also be traced (torch.compile / make_fx record the launches as triton_kernel_wrapper nodes instead of
breaking on them).

FLOP and byte counts, tiles and chunks: tbg.nn.triton.plan (the formulas are in its docstring;
bench/bench_divergence.py reports achieved rates with them).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from tbg.nn import spec
from tbg.nn.layout import check_mol_ptr
from tbg.nn.triton import stack
from tbg.nn.triton.edge import edge_coordinate, edge_geometry, edge_message, edge_mlp_tangent
from tbg.nn.triton.plan import Blocks, default_blocks, jvp_chunk
from tbg.nn.triton.ragged import molecule_sum_kernel
from tbg.nn.triton.stack import dot_precision, interpreted  # noqa: F401 - part of this module's interface



# ---- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _tangent_layer_kernel(x_ptr, x0_ptr, pq_ptr, mol_ptr, mol_of_ptr,
                          wr_ptr, wa_ptr, w2t_ptr, b2_ptr, watt_ptr, batt_ptr, wc1t_ptr, bc1_ptr, wc2_ptr, range_ptr,
                          tan_ptr, dx_ptr, dpq_ptr, dx_out_ptr, dagg_ptr, diag_ptr,
                          M, H, n_tan, t0,
                          FIRST: tl.constexpr, LAST: tl.constexpr, OWN: tl.constexpr, UNIT: tl.constexpr,
                          EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Tangent step of one layer for the chunk of n_tan tangents starting at global tangent t0.

    Program (receiver i, tangent tile). Reads dX = tangent of the layer's x [n_tan, M, 3] (dx_ptr; at
    layer 1 of unit tangents implicit) and dPQ = tangent of [P | Q] [n_tan, M, 2H] (not at layer 1);
    writes dX' = dX + tangent of the coordinate update (dx_out_ptr) and, unless LAST, dagg = tangent of
    sum_j m_ij [n_tan, M, H]. UNIT: tangent t is unit tangent t0 + t = 3 a + k (a local atom index),
    else tangents are read from tan_ptr [n_tan, M, 3] (the x^0 tangent, for the edge attribute). OWN
    (unit tangents, last layer): the tile is atom i's own 3 tangents and diag[i] += sum_k (dX'[(i, k), i,
    k] - 1) is all that is written. Rows of tangents a molecule does not have are written as zeros.
    Coordinates are padded to 4 (the 4th stays zero).
    """
    i = tl.program_id(0).to(tl.int64)
    mol = tl.load(mol_of_ptr + i)
    start = tl.load(mol_ptr + mol)
    end = tl.load(mol_ptr + mol + 1)
    dtype = x_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    c = tl.arange(0, 4)
    c_ok = c < 3
    rows = tl.arange(0, BLOCK_T).to(tl.int64)
    if OWN:
        t = 3 * (i - start) + rows - t0
        t_ok = (rows < 3) & (t >= 0) & (t < n_tan)
    else:
        t = tl.program_id(1).to(tl.int64) * BLOCK_T + rows
        t_ok = t < n_tan
        if UNIT:
            t_ok = t_ok & (t0 + t < 3 * (end - start))
    t = tl.where(t_ok, t, 0)
    # Unit tangent t0 + t is coordinate k_t of the atom with local index a_t: unit_i [BLOCK_T, 4] is its
    # value at atom i, (a_t == local j) & unit_k its value at the senders.
    a_t = (t0 + t) // 3
    unit_k = ((t0 + t) % 3)[:, None] == c[None, :]
    unit_i = ((a_t == i - start)[:, None] & unit_k).to(dtype)
    row_i = t * M + i
    tc_ok = t_ok[:, None] & c_ok[None, :]

    # The receiver's side: its x tangent, its x^0 tangent and dP_i of the first linear's tangent.
    if FIRST and UNIT:
        dx_i = unit_i
    else:
        dx_i = tl.load(dx_ptr + row_i[:, None] * 3 + c[None, :], mask=tc_ok, other=0.0)
    if not FIRST:
        dp_i = tl.load(dpq_ptr + row_i[:, None] * 2 * H + offs_h[None, :], mask=t_ok[:, None] & h_ok[None, :],
                       other=0.0)
        if UNIT:
            de_i = unit_i
        else:
            de_i = tl.load(tan_ptr + row_i[:, None] * 3 + c[None, :], mask=tc_ok, other=0.0)

    wr = tl.load(wr_ptr + offs_h, mask=h_ok, other=0.0)
    wa = tl.load(wa_ptr + offs_h, mask=h_ok, other=0.0)
    b2 = tl.load(b2_ptr + offs_h, mask=h_ok, other=0.0)
    watt = tl.load(watt_ptr + offs_h, mask=h_ok, other=0.0)
    bc1 = tl.load(bc1_ptr + offs_h, mask=h_ok, other=0.0)
    wc2 = tl.load(wc2_ptr + offs_h, mask=h_ok, other=0.0)
    batt = tl.load(batt_ptr)
    p_i = tl.load(pq_ptr + i * 2 * H + offs_h, mask=h_ok, other=0.0)
    acc = tl.full((BLOCK_T, 4), 0, dtype)
    dagg = tl.full((BLOCK_T, BLOCK_H), 0, dtype)
    # Tiles without a tangent of this molecule skip the sender loop (their rows are written as zeros).
    stop = tl.where(tl.max(t_ok.to(tl.int32), axis=0) > 0, end, start)
    for j0 in range(start, stop, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = (j < end) & (j != i)
        valid = t_ok[:, None] & j_ok[None, :]
        d, r, sq, s, e = edge_geometry(x_ptr, x0_ptr, i, j, j_ok, EPS)
        q_j = tl.load(pq_ptr + j[:, None] * 2 * H + H + offs_h[None, :], mask=j_ok[:, None] & h_ok[None, :],
                      other=0.0)
        pre1 = p_i[None, :] + q_j + r[:, None] * wr[None, :] + tl.sum(e * e, axis=1)[:, None] * wa[None, :]
        _, slope1, w2t, m0, slope2, g, m = edge_message(pre1, w2t_ptr, b2, watt, batt, offs_h, h_ok, H, PRECISION)
        phi, wc1t, _, slopec = edge_coordinate(m, wc1t_ptr, bc1, wc2, offs_h, h_ok, H, PRECISION)

        # Tangent of d_ij = x_i - x_j [BLOCK_T, BLOCK_J, 4] and of r_ij [BLOCK_T, BLOCK_J].
        row_j = (t[:, None] * M + j[None, :])[:, :, None] * 3 + c[None, None, :]
        valid_c = valid[:, :, None] & c_ok[None, None, :]
        unit_j = ((a_t[:, None] == j[None, :] - start)[:, :, None] & unit_k[:, None, :]).to(dtype)
        if FIRST and UNIT:
            dd = dx_i[:, None, :] - unit_j
        else:
            dd = dx_i[:, None, :] - tl.load(dx_ptr + row_j, mask=valid_c, other=0.0)
        dr = tl.where(valid, 2 * tl.sum(dd * d[None, :, :], axis=2), 0.0)

        if FIRST:
            # Layer 1: every row's first-linear tangent is dr (wr + wa): per-edge unit responses.
            du1 = ((wr + wa)[None, :] * slope1)[None, :, :]
            dm1, dphi1 = edge_mlp_tangent(du1, slope2, m0, g, slopec, phi, w2t, watt, wc1t, wc2, PRECISION)
            if not LAST:
                if BLOCK_J >= 16:  # tl.dot's contraction side needs >= 16 on a GPU
                    dagg += tl.dot(dr, tl.reshape(dm1, (BLOCK_J, BLOCK_H)), input_precision=PRECISION, out_dtype=dtype)
                else:
                    dagg += tl.sum(dr[:, :, None] * dm1, axis=1)
            dphi = dr * tl.reshape(dphi1, (BLOCK_J,))[None, :]
        else:
            # Tangent of the fixed attribute a_ij = |x0_i - x0_j|^2 from the x^0 tangent.
            if UNIT:
                de = de_i[:, None, :] - unit_j
            else:
                de = de_i[:, None, :] - tl.load(tan_ptr + row_j, mask=valid_c, other=0.0)
            da = 2 * tl.sum(de * e[None, :, :], axis=2)
            row_jh = (t[:, None] * M + j[None, :])[:, :, None] * 2 * H + H + offs_h[None, None, :]
            dq_j = tl.load(dpq_ptr + row_jh, mask=valid[:, :, None] & h_ok[None, None, :], other=0.0)
            dpre = (dr[:, :, None] * wr[None, None, :] + da[:, :, None] * wa[None, None, :] + dp_i[:, None, :]
                    + dq_j)
            dm, dphi = edge_mlp_tangent(dpre * slope1[None, :, :], slope2, m0, g, slopec, phi, w2t, watt, wc1t,
                                        wc2, PRECISION)
            if not LAST:
                dagg += tl.sum(tl.where(valid[:, :, None], dm, 0.0), axis=1)

        # Tangent of the coordinate update phi d / s, summed over the senders.
        inv_s = 1 / s
        coef = dr * (inv_s * inv_s / (2 * sq))[None, :]
        dtrans = ((dd * inv_s[None, :, None] - d[None, :, :] * coef[:, :, None]) * phi[None, :, None]
                  + (d * inv_s[:, None])[None, :, :] * dphi[:, :, None])
        acc += tl.sum(tl.where(valid[:, :, None], dtrans, 0.0), axis=1)

    out = tl.where(tc_ok, dx_i + tl.load(range_ptr) * acc, 0.0)
    if OWN:
        own = tl.sum(tl.where(tc_ok & (rows[:, None] == c[None, :]), out, 0.0)) - tl.sum(t_ok.to(dtype))
        tl.store(diag_ptr + i, tl.load(diag_ptr + i) + own)
    else:
        t_w = tl.program_id(1).to(tl.int64) * BLOCK_T + rows
        row_w = t_w * M + i
        tl.store(dx_out_ptr + row_w[:, None] * 3 + c[None, :], out, mask=(t_w < n_tan)[:, None] & c_ok[None, :])
        if not LAST:
            tl.store(dagg_ptr + row_w[:, None] * H + offs_h[None, :], dagg,
                     mask=(t_w < n_tan)[:, None] & h_ok[None, :])


# ---- launch configuration ---------------------------------------------------------------------------
_blocks_override: Blocks | None = None


@contextlib.contextmanager
def use_blocks(blocks: Blocks) -> Iterator[None]:
    """Run the kernels with these tiles inside the block (tests, tuning in bench/)."""
    global _blocks_override
    blocks.check(native=not interpreted())
    previous, _blocks_override = _blocks_override, blocks
    try:
        yield
    finally:
        _blocks_override = previous


# ---- host side ----------------------------------------------------------------------------------------
def _host_view(op: str, x: Tensor, mol_ptr: Tensor, *checked: Tensor) -> int:
    """The call's one device-to-host copy: mol_ptr and whether every `checked` tensor is finite.
    Validates mol_ptr and the values; returns the largest molecule's atom count."""
    finite = torch.stack([torch.isfinite(t).all() for t in checked]).to(torch.long)
    host = torch.cat([mol_ptr, finite]).cpu()
    ptr, flags = host[:mol_ptr.numel()], host[mol_ptr.numel():]
    try:
        check_mol_ptr(ptr, x.shape[0])
    except ValueError as err:
        raise RuntimeError(f"{op}: {err}") from None
    if not bool(flags.all()):
        raise RuntimeError(f"{op}: x or tangents contain NaN or infinite values")
    return int(ptr.diff().max()) if ptr.numel() > 1 else 0


class _Batch(NamedTuple):
    """What every launch of a call shares: the stack's (tbg.nn.triton.stack.Batch), the molecule of every
    atom and the tangent kernels' tiles."""

    stack: stack.Batch
    mol_of: Tensor      # [M]
    blocks: Blocks


def _batch(x: Tensor, h0: Tensor, mol_ptr: Tensor, weights: tuple[Tensor, ...], coords_range: float) -> _Batch:
    blocks = _blocks_override or default_blocks(h0.shape[1])
    blocks.check(native=not interpreted())
    # Molecule of each atom without a host read: the number of molecule ends <= the atom index.
    mol_of = torch.searchsorted(mol_ptr[1:], torch.arange(x.shape[0], device=x.device), right=True)
    return _Batch(stack.batch(x, h0, mol_ptr, weights, coords_range), mol_of, blocks)


class _Primal(NamedTuple):
    xs: Tensor          # [L + 1, M, 3] x entering each layer, then the output
    pq: Tensor          # [L, M, 2H] [P | Q] of each layer
    node_slope: Tensor  # [L - 1, M, H] SiLU slope of each node update but the last (unused)


def _primal(b: _Batch, h0: Tensor) -> _Primal:
    """The forward pass, storing what the tangent pass reads (node-level tensors only)."""
    n_atoms, hidden = h0.shape
    n_layers = b.stack.weights.w2t.shape[0]
    p = _Primal(stack.alloc(n_layers + 1, n_atoms, 3, like=h0), stack.alloc(n_layers, n_atoms, 2 * hidden, like=h0),
                stack.alloc(max(n_layers - 1, 0), n_atoms, hidden, like=h0))
    stack.primal(b.stack, h0, p.xs, pq=p.pq, node_slope=p.node_slope)
    return p


def _tangent_pass(b: _Batch, p: _Primal, n_tan: int, t0: int, tangents: Tensor | None, diag: Tensor | None
                  ) -> Tensor | None:
    """Forward-mode pass of one chunk of n_tan tangents through every layer.

    Unit tangents t0 ... t0 + n_tan - 1 (tangents None): adds each atom's trace part to diag [M] and
    returns None. Given tangents [n_tan, M, 3]: returns the tangents of x^L [n_tan, M, 3].
    """
    n_layers, n_atoms, hidden = p.pq.shape[0], p.pq.shape[1], p.pq.shape[2] // 2
    w, blocks = b.stack.weights, b.blocks
    unit = tangents is None
    like = b.stack.x0
    dx = (stack.alloc(n_tan, n_atoms, 3, like=like), stack.alloc(n_tan, n_atoms, 3, like=like))
    state = n_layers > 1
    dpq = stack.alloc(n_tan, n_atoms, 2 * hidden, like=like) if state else None
    dagg = stack.alloc(n_tan, n_atoms, hidden, like=like) if state else None
    dh = stack.alloc(n_tan * n_atoms, hidden, like=like) if state else None
    dz = stack.alloc(n_tan * n_atoms, hidden, like=like) if state else None
    dx_in = tangents if tangents is not None else dx[1]  # layer 1 of unit tangents reads no dX
    for layer in range(n_layers):
        first, last = layer == 0, layer + 1 == n_layers
        own = unit and last
        tile = 4 if own else blocks.first_tangents if first else blocks.tangents
        grid = (n_atoms, 1 if own else triton.cdiv(n_tan, tile))
        dx_out = dx[layer % 2]
        torch.library.wrap_triton(_tangent_layer_kernel)[grid](
            p.xs[layer], b.stack.x0, p.pq[layer], b.stack.mol_ptr, b.mol_of, *stack.layer_edge_weights(w, layer),
            b.stack.range_,
            tangents if tangents is not None else dx_in, dx_in, dpq if dpq is not None else dx_in, dx_out,
            dagg if dagg is not None else dx_out, diag if diag is not None else dx_out,
            n_atoms, hidden, n_tan, t0,
            FIRST=first, LAST=last, OWN=own, UNIT=unit, EPS=spec.EDGE_EPS, BLOCK_T=tile, BLOCK_J=blocks.senders,
            BLOCK_H=b.stack.block_h, PRECISION=b.stack.precision, num_warps=blocks.warps,
            num_stages=blocks.stages)
        dx_in = dx_out
        if last:
            break
        # Node-level tangent products: dz = (dagg Wn1a^T + dH Wn1h^T) * slope, dH += dz Wn2^T,
        # then the next layer's dP | dQ = dH [W1i^T | W1j^T].
        torch.mm(dagg.view(-1, hidden), w.wn1a_t[layer], out=dz)
        if not first:
            dz.addmm_(dh, w.wn1h_t[layer])
        dz.view(n_tan, n_atoms, hidden).mul_(p.node_slope[layer])
        if first:
            torch.mm(dz, w.wn2_t[layer], out=dh)
        else:
            dh.addmm_(dz, w.wn2_t[layer])
        torch.mm(dh, w.w1h_t[layer + 1], out=dpq.view(-1, 2 * hidden))
    return None if unit else dx_in


# ---- the op implementations ---------------------------------------------------------------------------
@torch.no_grad()
def egnn_divergence(x: Tensor, h0: Tensor, mol_ptr: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    """tbg::egnn_divergence (v [M, 3], div [B]); after mol_ptr: the 13 weights, coords_range,
    tangent_chunk (tangents per chunk; the tangent state is O(tangent_chunk M H))."""
    weights, (coords_range, tangent_chunk) = args[:spec.N_WEIGHTS], args[spec.N_WEIGHTS:]
    stack.check_inputs("egnn_divergence", x, h0, mol_ptr, weights)
    if tangent_chunk < 1:
        raise RuntimeError(f"egnn_divergence: tangent_chunk must be >= 1, got {tangent_chunk}")
    n_max = _host_view("egnn_divergence", x, mol_ptr, x)
    n_mol = mol_ptr.numel() - 1
    div = stack.alloc(n_mol, like=x)
    if x.shape[0] == 0:
        return torch.zeros_like(x), div.zero_()
    b = _batch(x.contiguous(), h0.contiguous(), mol_ptr, weights, coords_range)
    p = _primal(b, h0.contiguous())
    diag = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for t0 in range(0, 3 * n_max, tangent_chunk):
        _tangent_pass(b, p, min(tangent_chunk, 3 * n_max - t0), t0, None, diag)
    if n_mol:
        torch.library.wrap_triton(molecule_sum_kernel)[(n_mol,)](diag, div, mol_ptr, BLOCK=32)
    return stack.center(p.xs[-1], b.stack.x0, mol_ptr), div


@torch.no_grad()
def egnn_jvp(x: Tensor, h0: Tensor, mol_ptr: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    """tbg::egnn_jvp (v [M, 3], (dv/dx) tangents[k] [K, M, 3]); after mol_ptr: the 13 weights,
    tangents [K, M, 3], coords_range."""
    weights, (tangents, coords_range) = args[:spec.N_WEIGHTS], args[spec.N_WEIGHTS:]
    stack.check_inputs("egnn_jvp", x, h0, mol_ptr, weights)
    if tangents.dim() != 3 or tangents.shape[1:] != x.shape:
        raise RuntimeError(f"egnn_jvp: tangents must have shape [K, M, 3] with M = {x.shape[0]}, "
                           f"got {tuple(tangents.shape)}")
    if tangents.dtype != x.dtype or tangents.device != x.device or not tangents.is_contiguous():
        raise RuntimeError("egnn_jvp: tangents must be contiguous and match x in dtype and device")
    _host_view("egnn_jvp", x, mol_ptr, x, tangents)
    jvp = stack.alloc(*tangents.shape, like=x)
    if x.shape[0] == 0:
        return torch.zeros_like(x), jvp
    b = _batch(x.contiguous(), h0.contiguous(), mol_ptr, weights, coords_range)
    p = _primal(b, h0.contiguous())
    chunk = jvp_chunk(x.shape[0], h0.shape[1], tangents.shape[0])
    for k0 in range(0, tangents.shape[0], chunk):
        tan = tangents[k0:k0 + chunk]
        jvp[k0:k0 + chunk] = stack.center(_tangent_pass(b, p, tan.shape[0], 0, tan, None), tan, mol_ptr)
    return stack.center(p.xs[-1], b.stack.x0, mol_ptr), jvp
