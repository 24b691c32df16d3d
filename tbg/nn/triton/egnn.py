"""tbg::egnn_forward and tbg::egnn_backward in Triton: the EGNN stack and its gradients with the per-edge
H x H products on tensor cores (tl.dot; TF32 under PyTorch's TF32 switch, IEEE otherwise, float64 in
float64) and no edge tensor in global memory.

Same schemas and outputs as the C++ and .cu kernels (csrc/ops.cpp), h_states [L, M, H] and x_states
[L, M, 3] included (the inputs of every layer), so the autograd formula and fake kernels of tbg.nn.ops
serve unchanged. Opt-in on CUDA with TBG_TRITON=egnn (tbg.nn.triton); the .cu kernels stay the default
until this has passed the CUDA tests on a GPU.

Forward: the primal pass shared with the divergence ops (tbg.nn.triton.stack): per layer [P | Q] and the
node MLP as torch GEMMs, the edge work in one receiver-tile kernel (W2 and Wc1 as tl.dots over a tile's
receivers x senders edge rows, the sums over senders in registers). The last layer's node update feeds
nothing and is skipped, as in the C++ kernel.

Backward, per layer from the last: [P | Q] again (torch), the message sums agg (the edge kernel with the
message half only) and the node MLP's backward (torch GEMMs), then ``_edge_backward_kernel``: per edge
tile it recomputes the edge MLP and back-propagates at once (tbg.nn.triton.edge.edge_mlp_backward: the
input gradients through Wc1 and W2 as tl.dots) - memory O(M H), as the .cu kernels - and sums

- receiver-side gradients (gP_i = dL/dP_i, the coordinate gradients of i) over the sender loop in
  registers: the program owns its receivers and writes them once;
- sender-side gradients (gQ_j, the coordinate gradients of j) over the tile's receivers, added to the
  rows of molecule b in the program's own split slice of a [splits, M, .] buffer (read-modify-write by
  one program only, after a barrier per receiver tile); torch sums the slices in split order;
- weight gradients of W2 and Wc1 (the [H, R] x [R, H] dots of the gradients and the activations over
  the tile's R rows) and of the vectors in registers over all of the program's work, stored once into the
  program's own slot; torch sums the slots in program order.

So there are no atomics and the result is the same bits on every call. Why per-program slots and not
atomics: the .cu kernels' atomics make fp32 gradients differ between calls (~1e-6 relative; torch.compile
comparisons fail on them), and the slots cost (2 H^2 + 7 H) x programs elements, at most 4 programs per
SM (~70 MB at H = 128 on an H200 with 132 SMs, written and summed once per layer: ~1.3 GB of traffic for
the 9-layer transfer model, ~0.3 ms at 4.8 TB/s, under 1% of its backward even at the target rate of
tbg.nn.triton.plan.egnn_cost's docstring). Why splits: a molecule's receiver tiles can run in up to 8
programs (enough programs for small batches) while each sender-side row still has one writer.

Host synchronisation: none. The grids (molecules x splits) and all buffer sizes follow from shapes; loop
bounds come from mol_ptr on the device; mol_ptr is validated on the device (tbg.nn.triton.stack.
assert_mol_ptr: a device-side assertion on a GPU, like the .cu kernels' check). Values are not checked for
NaN (neither do the C++ and .cu kernels; the EGNN module checks its inputs).

FLOP and byte counts: tbg.nn.triton.plan.egnn_cost; bench/bench_egnn.py reports achieved rates with them.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from tbg.nn import spec
from tbg.nn.triton import stack
from tbg.nn.triton.edge import edge_coordinate, edge_geometry, edge_message, edge_mlp_backward


@triton.jit
def _edge_backward_kernel(x_ptr, x0_ptr, pq_ptr, mol_ptr,
                          wr_ptr, wa_ptr, w2t_ptr, b2_ptr, watt_ptr, batt_ptr, wc1t_ptr, bc1_ptr, wc2_ptr, range_ptr,
                          w2_ptr, wc1_ptr, gxo_ptr, gagg_ptr,
                          gp_ptr, gx_ptr, gx0_ptr, gq_part_ptr, gxs_part_ptr, slot_ptr,
                          M, H, n_items,
                          HAS_GAGG: tl.constexpr, SPLITS: tl.constexpr, EPS: tl.constexpr, BLOCK_I: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """Edge backward of one layer (work items as tbg.nn.triton.stack.edge_forward_kernel).

    Reads the layer's input coordinates x, pq = [P | Q], gxo = dL/d(layer output x) [M, 3] and, with
    HAS_GAGG, gagg = dL/dagg [M, H]. Writes, for its receivers, gp = dL/dP [M, H] and gx = gxo + the
    receiver side of dL/d(layer input x) [M, 3], and adds the receiver side of dL/dx0 (the fixed edge
    attribute) to gx0 [M, 3]; adds the sender side of dL/dQ to gq_part[split] [SPLITS, M, H] and of dL/dx,
    dL/dx0 to gxs_part[split] [SPLITS, M, 8] (columns 0-2 and 4-6); stores its weight gradients into
    slot_ptr[program] (W2, Wc1 as [H, H], then b2, bc1, wc2, watt, wr, wa and batt, H each).
    """
    pid = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    c = tl.arange(0, 4)
    c_ok = c < 3
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
    acc_w2 = tl.zeros((BLOCK_H, BLOCK_H), dtype)
    acc_wc1 = tl.zeros((BLOCK_H, BLOCK_H), dtype)
    acc_b2 = tl.zeros((BLOCK_H,), dtype)
    acc_bc1 = tl.zeros((BLOCK_H,), dtype)
    acc_wc2 = tl.zeros((BLOCK_H,), dtype)
    acc_watt = tl.zeros((BLOCK_H,), dtype)
    acc_wr = tl.zeros((BLOCK_H,), dtype)
    acc_wa = tl.zeros((BLOCK_H,), dtype)
    acc_batt = tl.zeros((BLOCK_I * BLOCK_J,), dtype)
    for item in range(pid, n_items, tl.num_programs(0)):
        mol = item // SPLITS
        split = item % SPLITS
        start = tl.load(mol_ptr + mol)
        end = tl.load(mol_ptr + mol + 1)
        for i0 in range(start + split * BLOCK_I, end, SPLITS * BLOCK_I):
            # The read-modify-writes of the sender sums below happen once per (receiver tile, sender tile):
            # the previous receiver tile's writes must be visible to every thread that reads them now.
            tl.debug_barrier()
            own = i0 + tl.arange(0, BLOCK_I)
            own_ok = own < end
            own_h = own[:, None] * H + offs_h[None, :]
            i = i0 + row_i
            i_ok = i < end
            p_i = tl.load(pq_ptr + own[:, None] * 2 * H + offs_h[None, :], mask=own_ok[:, None] & h_ok[None, :],
                          other=0.0)
            gxo_i = tl.load(gxo_ptr + i[:, None] * 3 + c[None, :], mask=i_ok[:, None] & c_ok[None, :], other=0.0)
            if HAS_GAGG:
                gagg_i = tl.load(gagg_ptr + own_h, mask=own_ok[:, None] & h_ok[None, :], other=0.0)
            # Receiver sums per tile: [BLOCK_I, .] accumulators keep few registers live.
            gp_acc = tl.zeros((BLOCK_I, BLOCK_H), dtype)
            gd_acc = tl.zeros((BLOCK_I, 4), dtype)
            gd0_acc = tl.zeros((BLOCK_I, 4), dtype)
            for j0 in range(start, end, BLOCK_J):
                senders = j0 + tl.arange(0, BLOCK_J)
                senders_ok = senders < end
                q_j = tl.load(pq_ptr + senders[:, None] * 2 * H + H + offs_h[None, :],
                              mask=senders_ok[:, None] & h_ok[None, :], other=0.0)
                j = j0 + row_j
                ok = i_ok & (j < end) & (j != i)
                d, r, sq, s, e = edge_geometry(x_ptr, x0_ptr, i, j, ok, EPS)
                a = tl.sum(e * e, axis=1)
                pre1 = (tl.reshape(p_i[:, None, :] + q_j[None, :, :], (BLOCK_I * BLOCK_J, BLOCK_H))
                        + r[:, None] * wr[None, :] + a[:, None] * wa[None, :])
                u, slope1, _, m0, slope2, g, m = edge_message(pre1, w2t_ptr, b2, watt, batt, offs_h, h_ok, H,
                                                              PRECISION)
                phi, _, sc, slopec = edge_coordinate(m, wc1t_ptr, bc1, wc2, offs_h, h_ok, H, PRECISION)
                # Coordinate head: x_i' = x_i + range sum_j phi_ij d_ij / s_ij. Masked rows get zero
                # gradients (gy, gm_in and gn are zero there, and everything below is linear in them).
                inv_s = 1 / s
                gxo_e = tl.where(ok[:, None], gxo_i, 0.0)
                gy = scale * tl.sum(gxo_e * d, axis=1) * inv_s * (1 - phi * phi)
                if HAS_GAGG:
                    gm_in = tl.where(ok[:, None], tl.reshape(tl.broadcast_to(gagg_i[:, None, :], (BLOCK_I, BLOCK_J, BLOCK_H)),
                                                             (BLOCK_I * BLOCK_J, BLOCK_H)), 0.0)
                else:
                    gm_in = tl.zeros((BLOCK_I * BLOCK_J, BLOCK_H), dtype)
                gpre, gzc, gz2, gsig = edge_mlp_backward(gy, gm_in, slope1, m0, slope2, g, slopec, w2_ptr, watt,
                                                         wc1_ptr, wc2, offs_h, h_ok, H, PRECISION)
                acc_wc1 += tl.dot(tl.trans(gzc), m, input_precision=PRECISION, out_dtype=dtype)
                acc_w2 += tl.dot(tl.trans(gz2), u, input_precision=PRECISION, out_dtype=dtype)
                acc_wc2 += tl.sum(gy[:, None] * sc, axis=0)
                acc_bc1 += tl.sum(gzc, axis=0)
                acc_watt += tl.sum(gsig[:, None] * m0, axis=0)
                acc_batt += gsig
                acc_b2 += tl.sum(gz2, axis=0)
                acc_wr += tl.sum(gpre * r[:, None], axis=0)
                acc_wa += tl.sum(gpre * a[:, None], axis=0)
                # Coordinates through r_ij and the direction d_ij / s_ij of this layer, and through the
                # fixed attribute a_ij to the input coordinates x0.
                gr = tl.sum(gpre * wr[None, :], axis=1)
                ga = tl.sum(gpre * wa[None, :], axis=1)
                gn = (scale * phi)[:, None] * gxo_e
                gnd = tl.sum(gn * d, axis=1)
                gd = tl.reshape(2 * gr[:, None] * d + gn * inv_s[:, None] - d * (gnd * inv_s * inv_s / sq)[:, None],
                                (BLOCK_I, BLOCK_J, 4))
                gd0 = tl.reshape(2 * ga[:, None] * e, (BLOCK_I, BLOCK_J, 4))
                gpre = tl.reshape(gpre, (BLOCK_I, BLOCK_J, BLOCK_H))
                gp_acc += tl.sum(gpre, axis=1)
                gd_acc += tl.sum(gd, axis=1)
                gd0_acc += tl.sum(gd0, axis=1)
                # Sender side: sums over this tile's receivers into the split's own rows.
                jh = (split * M + senders)[:, None] * H + offs_h[None, :]
                jh_ok = senders_ok[:, None] & h_ok[None, :]
                tl.store(gq_part_ptr + jh, tl.load(gq_part_ptr + jh, mask=jh_ok, other=0.0) + tl.sum(gpre, axis=0),
                         mask=jh_ok)
                jc = (split * M + senders)[:, None] * 8 + c[None, :]
                jc_ok = senders_ok[:, None] & c_ok[None, :]
                tl.store(gxs_part_ptr + jc, tl.load(gxs_part_ptr + jc, mask=jc_ok, other=0.0) - tl.sum(gd, axis=0),
                         mask=jc_ok)
                tl.store(gxs_part_ptr + jc + 4, tl.load(gxs_part_ptr + jc + 4, mask=jc_ok, other=0.0)
                         - tl.sum(gd0, axis=0), mask=jc_ok)
            tl.store(gp_ptr + own_h, gp_acc, mask=own_ok[:, None] & h_ok[None, :])
            ic = own[:, None] * 3 + c[None, :]
            ic_ok = own_ok[:, None] & c_ok[None, :]
            tl.store(gx_ptr + ic, tl.load(gxo_ptr + ic, mask=ic_ok, other=0.0) + gd_acc, mask=ic_ok)
            tl.store(gx0_ptr + ic, tl.load(gx0_ptr + ic, mask=ic_ok, other=0.0) + gd0_acc, mask=ic_ok)
    slot = slot_ptr + pid.to(tl.int64) * (2 * H * H + 7 * H)
    square = offs_h[:, None] * H + offs_h[None, :]
    w_ok = h_ok[:, None] & h_ok[None, :]
    tl.store(slot + square, acc_w2, mask=w_ok)
    tl.store(slot + H * H + square, acc_wc1, mask=w_ok)
    vectors = slot + 2 * H * H + offs_h
    tl.store(vectors, acc_b2, mask=h_ok)
    tl.store(vectors + H, acc_bc1, mask=h_ok)
    tl.store(vectors + 2 * H, acc_wc2, mask=h_ok)
    tl.store(vectors + 3 * H, acc_watt, mask=h_ok)
    tl.store(vectors + 4 * H, acc_wr, mask=h_ok)
    tl.store(vectors + 5 * H, acc_wa, mask=h_ok)
    tl.store(vectors + 6 * H, tl.where(offs_h == 0, tl.sum(acc_batt, axis=0), 0.0), mask=h_ok)


def _check_backward_inputs(grad_v: Tensor, x: Tensor, h_states: Tensor, x_states: Tensor, n_layers: int,
                           hidden: int) -> None:
    n_atoms = x.shape[0]
    for name, t, shape in (("grad_v", grad_v, (n_atoms, 3)), ("h_states", h_states, (n_layers, n_atoms, hidden)),
                           ("x_states", x_states, (n_layers, n_atoms, 3))):
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise RuntimeError(f"egnn_backward: {name} must have shape {list(shape)} and match x ({x.dtype} on "
                               f"{x.device}), got {list(t.shape)} {t.dtype} on {t.device}")


# ---- the op implementations ---------------------------------------------------------------------------
@torch.no_grad()
def egnn_forward(x: Tensor, h0: Tensor, mol_ptr: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """tbg::egnn_forward: (v [M, 3], h_states [L, M, H], x_states [L, M, 3]); after mol_ptr: the 13
    weights, coords_range."""
    weights, (coords_range,) = args[:spec.N_WEIGHTS], args[spec.N_WEIGHTS:]
    stack.check_inputs("egnn_forward", x, h0, mol_ptr, weights)
    stack.assert_mol_ptr("egnn_forward", mol_ptr, x.shape[0])
    n_layers, (n_atoms, hidden) = weights[0].shape[0], h0.shape
    b = stack.batch(x.contiguous(), h0.contiguous(), mol_ptr, weights, coords_range)
    h_states = stack.alloc(n_layers, n_atoms, hidden, like=x)
    xs = stack.alloc(n_layers + 1, n_atoms, 3, like=x)
    stack.primal(b, h0.contiguous(), xs, h_states=h_states)
    return stack.center(xs[n_layers], b.x0, mol_ptr), h_states, xs[:n_layers]


@torch.no_grad()
def egnn_backward(grad_v: Tensor, x: Tensor, h0: Tensor, mol_ptr: Tensor, *args: Any) -> tuple[Tensor, ...]:
    """tbg::egnn_backward: the gradients of <grad_v, v> for x, h0 and the 13 weights; after mol_ptr: the
    13 weights, h_states, x_states (egnn_forward's), coords_range."""
    weights, (h_states, x_states, coords_range) = args[:spec.N_WEIGHTS], args[spec.N_WEIGHTS:]
    stack.check_inputs("egnn_backward", x, h0, mol_ptr, weights)
    n_layers, (n_atoms, hidden) = weights[0].shape[0], h0.shape
    _check_backward_inputs(grad_v, x, h_states, x_states, n_layers, hidden)
    stack.assert_mol_ptr("egnn_backward", mol_ptr, n_atoms)
    b = stack.batch(x.contiguous(), h0.contiguous(), mol_ptr, weights, coords_range)
    w, raw = b.weights, dict(zip(spec.WEIGHT_NAMES, weights))
    h_states, x_states = h_states.contiguous(), x_states.contiguous()
    grads = {name: stack.alloc(*t.shape, like=x) for name, t in raw.items()}
    # v = x^L - x^0 minus each molecule's mean: the mean removal is a symmetric projection.
    gdisp = stack.center(grad_v.contiguous(), None, mol_ptr)
    gx, gx_next, gx0 = gdisp.clone(), stack.alloc(n_atoms, 3, like=x), -gdisp
    gh = torch.zeros_like(h0)
    pq, agg, gp = (stack.alloc(n_atoms, 2 * hidden, like=x), stack.alloc(n_atoms, hidden, like=x),
                   stack.alloc(n_atoms, hidden, like=x))
    gq_part = torch.zeros(b.splits, n_atoms, hidden, dtype=x.dtype, device=x.device)
    gxs_part = torch.zeros(b.splits, n_atoms, 8, dtype=x.dtype, device=x.device)
    slot_size = 2 * hidden * hidden + 7 * hidden
    slots = stack.alloc(b.programs, slot_size, like=x)
    n_items = (mol_ptr.numel() - 1) * b.splits
    for layer in reversed(range(n_layers)):
        h, x_in = h_states[layer], x_states[layer]
        torch.addmm(w.b1pq[layer], h, w.w1h_t[layer], out=pq)
        node = layer + 1 < n_layers  # the last layer's node update feeds nothing
        if node:
            stack.edge_pass(b, layer, x_in, pq, None, agg)
            z = torch.addmm(w.bn1[layer], h, w.wn1h_t[layer]).addmm_(agg, w.wn1a_t[layer])
            sig = torch.sigmoid(z)
            torch.mm(gh.t(), z * sig, out=grads["wn2"][layer])
            torch.sum(gh, 0, out=grads["bn2"][layer])
            gz = torch.mm(gh, raw["wn2"][layer]).mul_(sig * (1 + z * (1 - sig)))
            grads["wn1"][layer, :, :hidden] = gz.t() @ h
            grads["wn1"][layer, :, hidden:] = gz.t() @ agg
            torch.sum(gz, 0, out=grads["bn1"][layer])
            gagg = torch.mm(gz, raw["wn1"][layer, :, hidden:])
            gh = gh.addmm(gz, raw["wn1"][layer, :, :hidden])
        else:
            for name in ("wn1", "bn1", "wn2", "bn2"):
                grads[name][layer].zero_()
            gagg = None
        if n_items:
            gq_part.zero_()
            gxs_part.zero_()
            torch.library.wrap_triton(_edge_backward_kernel)[(b.programs,)](
                x_in, b.x0, pq, mol_ptr, *stack.layer_edge_weights(w, layer), b.range_, w.w2[layer], w.wc1[layer],
                gx, gagg if gagg is not None else gx, gp, gx_next, gx0, gq_part, gxs_part, slots,
                n_atoms, hidden, n_items,
                HAS_GAGG=gagg is not None, SPLITS=b.splits, EPS=spec.EDGE_EPS, BLOCK_I=b.tiles.receivers,
                BLOCK_J=b.tiles.senders, BLOCK_H=b.block_h, PRECISION=b.precision, num_warps=b.tiles.warps,
                num_stages=b.tiles.stages)
            gq = gq_part.sum(0)
            sender_x = gxs_part.sum(0)
            gx_next += sender_x[:, :3]
            gx0 += sender_x[:, 4:7]
            summed = slots.sum(0)
        else:  # no molecules: nothing moves
            gp.zero_()
            gq = torch.zeros_like(gp)
            gx_next.copy_(gx)
            summed = torch.zeros(slot_size, dtype=x.dtype, device=x.device)
        square = hidden * hidden
        grads["w2"][layer] = summed[:square].view(hidden, hidden)
        grads["wc1"][layer] = summed[square:2 * square].view(hidden, hidden)
        vectors = summed[2 * square:].view(7, hidden)
        for k, name in enumerate(("b2", "bc1", "wc2", "watt")):
            grads[name][layer] = vectors[k]
        grads["w1"][layer, :, 2 * hidden] = vectors[4]
        grads["w1"][layer, :, 2 * hidden + 1] = vectors[5]
        grads["batt"][layer] = vectors[6, 0]
        # The first edge linear: [P | Q] = h [W1i^T | W1j^T] + (b1, 0).
        grads["w1"][layer, :, :hidden] = gp.t() @ h
        grads["w1"][layer, :, hidden:2 * hidden] = gq.t() @ h
        torch.sum(gp, 0, out=grads["b1"][layer])
        gh = gh.addmm(gp, raw["w1"][layer, :, :hidden]).addmm_(gq, raw["w1"][layer, :, hidden:2 * hidden])
        gx, gx_next = gx_next, gx
    return (gx + gx0, gh, *(grads[name] for name in spec.WEIGHT_NAMES))
