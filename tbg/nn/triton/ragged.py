"""Per-molecule reductions over the ragged layout in Triton: one program per molecule (and column),
walking its atom range from mol_ptr, so results are deterministic (no atomics) and need no host-side
sizes. Used for the mean removal of v / JVPs and the per-molecule trace sums."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def center_kernel(a_ptr, b_ptr, out_ptr, mol_ptr, M, SUBTRACT_B: tl.constexpr, BLOCK: tl.constexpr):
    """out[k, i] = c[k, i] - mean over i's molecule of c[k, :], c = a - b (or a): [K, M, 3] rows.

    Grid (molecules, K)."""
    b = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    start = tl.load(mol_ptr + b)
    end = tl.load(mol_ptr + b + 1)
    col = tl.arange(0, 4)
    base = k * M * 3
    total = tl.full((BLOCK, 4), 0, out_ptr.dtype.element_ty)
    for a0 in range(start, end, BLOCK):
        atom = a0 + tl.arange(0, BLOCK)
        ok = (atom < end)[:, None] & (col < 3)[None, :]
        offs = base + atom[:, None] * 3 + col[None, :]
        c = tl.load(a_ptr + offs, mask=ok, other=0.0)
        if SUBTRACT_B:
            c -= tl.load(b_ptr + offs, mask=ok, other=0.0)
        total += c
    mean = tl.sum(total, axis=0) / tl.maximum(end - start, 1).to(total.dtype)
    for a0 in range(start, end, BLOCK):
        atom = a0 + tl.arange(0, BLOCK)
        ok = (atom < end)[:, None] & (col < 3)[None, :]
        offs = base + atom[:, None] * 3 + col[None, :]
        c = tl.load(a_ptr + offs, mask=ok, other=0.0)
        if SUBTRACT_B:
            c -= tl.load(b_ptr + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, c - mean[None, :], mask=ok)


@triton.jit
def molecule_sum_kernel(values_ptr, out_ptr, mol_ptr, BLOCK: tl.constexpr):
    """out[b] = sum of values[i] over molecule b's atoms. Grid (molecules,)."""
    b = tl.program_id(0)
    start = tl.load(mol_ptr + b)
    end = tl.load(mol_ptr + b + 1)
    total = tl.full((BLOCK,), 0, out_ptr.dtype.element_ty)
    for a0 in range(start, end, BLOCK):
        atom = a0 + tl.arange(0, BLOCK)
        total += tl.load(values_ptr + atom, mask=atom < end, other=0.0)
    tl.store(out_ptr + b, tl.sum(total, axis=0))
