"""Tiles, chunks and costs of the Triton kernels: the divergence / JVP (tbg.nn.triton.divergence) and the
EGNN forward / backward (tbg.nn.triton.egnn, with the edge pass every op shares, tbg.nn.triton.stack);
imports no Triton, so benchmarks and `tbg info` can use it anywhere. The divergence's counts come first,
the EGNN's (``EdgeTiles``, ``egnn_cost``) after them.

Cost model, per call. Molecule b has n atoms and E = n (n - 1) edges; H hidden, L layers. Tangents:
the exact divergence carries the 3 n_max unit tangents of the batch, of which a molecule has its own
T_b = 3 n; a JVP carries K probes (T_b = K). FLOPs count a multiply-add as 2 and only the products with
H x H weights (the O(H^2) work per row); element-wise work (SiLU slopes, gate, geometry: O(H) per row)
is not counted.

Useful FLOPs - what the algorithm needs, summed over molecules:
    primal     4 L (E + n) H^2 + 6 (L - 1) n H^2     edge MLP (W2, Wc1) per edge; [P | Q], node MLP
    layer 1    4 E H^2 + 2 T_b E H                   per-edge unit responses (W2, Wc1), one dot over tangents
    middle     4 (L - 2) T_b E H^2                   W2 and Wc1 on every (tangent, edge) row
    last       4 (n - 1) T_b H^2 (unit: an atom's own tangents on its n - 1 received edges), 4 T_b E H^2 (JVP)
    node       T_b n H^2 (8 (L - 1) + 2 (L - 2))      dagg Wn1a, dH Wn1h (not at layer 1), Wn2, [W1i | W1j]
For alanine dipeptide (n = 22, H = 64, L = 5) the middle layers are 91% of it; the first edge linear
is node-level (P, Q), which is why each row costs two H x H products, not three.

Executed FLOPs - what the kernels run: senders rounded up to BLOCK_J per receiver, tangent rows to
BLOCK_T (4 for the last layer's own tangents), H to a power of two >= 16; every program recomputes its
receiver's primal edge MLP (4 BLOCK_J H^2 per sender tile) and, at layer 1, the unit responses; the
node products run on all T_c rows of a chunk for every atom (shared tangents: a molecule smaller than
the largest carries zero rows). Achieved rates are quoted on useful FLOPs; executed / useful is the
overhead of the tiling.

Bytes. Compulsory: every input read once, every output written once (x, h0, weights, tangents, v, div
or jvp). State: this design keeps the tangent state in global memory between layers: per chunk and
layer but the last, ~16 H elements per (tangent, atom) (the kernel reads dP | dQ and writes dagg; the
torch GEMMs read and write dz, dH and dP | dQ), plus the primal pass (~(3 H + 3) M per layer).
Re-reads of dQ_j by the other receivers of a molecule come from the L2 cache and are not counted.
Intensity: useful FLOPs per state byte ~ (L - 2) 4 E H^2 / (64 (L - 1) n H) ~ H (n - 1) / 21 per
float32 byte: ~64 for alanine dipeptide at H = 64, ~200 for 35-atom dipeptides at H = 128, against an
H200 balance of ~14 (float32 FMA, 67 TFLOP/s over 4.8 TB/s) or ~100 (TF32 tensor cores, ~495 TFLOP/s
dense): compute-bound in float32, near the balance at H = 64 with TF32. The target (issue 13): >= 40%
of the measured float32 torch.mm ceiling (ieee), or of the TF32 one when TF32 is on, in useful FLOPs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

# Bound on the elements of the [T, M, H]-shaped tangent state of one JVP chunk (about 6 such tensors).
STATE_BUDGET = 1 << 27


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of the layer kernels.

    tangents: tangent rows per program in the dense layers (BLOCK_T); first_tangents: the same at
    layer 1, where the rows meet in one [BLOCK_T, BLOCK_J] x [BLOCK_J, H] dot (an element-wise sum
    below 16 senders); senders: sender atoms per tile (BLOCK_J); warps, stages: Triton's num_warps /
    num_stages. On a GPU the tangent dots need tangents * senders >= 16 rows and the primal ones
    senders rows, which Triton 3.8 accepts from 1 (older releases from 16: 8 senders is a GPU
    experiment, see SWEEP); the interpreter takes any power of two, which the tests use to exercise
    the loops on small molecules.
    """

    tangents: int = 4
    first_tangents: int = 16
    senders: int = 16
    warps: int = 4
    stages: int = 1  # no software pipelining: the two H x H weights are re-read from L2 per tile

    def check(self, native: bool) -> None:
        for name in ("tangents", "first_tangents", "senders"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Blocks.{name} must be a power of two, got {value}")
        if native and (self.senders < 8 or self.tangents * self.senders < 16):
            raise ValueError(f"{self}: on a GPU tl.dot needs senders >= 8 and tangents * senders >= 16")


# Variants timed by `bench/bench_divergence.py --sweep` on a GPU (all valid there).
SWEEP = (Blocks(tangents=4, warps=4), Blocks(tangents=8, warps=8), Blocks(tangents=8, warps=8, stages=2),
         Blocks(tangents=16, warps=8), Blocks(tangents=4, senders=32, warps=8),
         Blocks(tangents=8, senders=8, warps=4))


def default_blocks(hidden: int) -> Blocks:
    """A starting point by hidden size, not tuned on hardware: tiles of 64-128 rows x H."""
    if hidden <= 64:
        return Blocks(tangents=8, senders=16, warps=4 if hidden <= 32 else 8)
    return Blocks(tangents=4, senders=16, warps=8)


def padded_hidden(hidden: int) -> int:
    """H as the kernels tile it: a power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << max(0, hidden - 1).bit_length())


def jvp_chunk(n_atoms: int, hidden: int, n_tangents: int) -> int:
    """Tangents per JVP chunk: all of them while the [T, M, H] state fits STATE_BUDGET elements."""
    return max(1, min(n_tangents, STATE_BUDGET // max(1, 6 * n_atoms * hidden)))


class Cost(NamedTuple):
    useful_flops: float
    executed_flops: float
    compulsory_bytes: float
    state_bytes: float


def cost(sizes: list[int], hidden: int, n_layers: int, *, n_probes: int | None = None,
         tangent_chunk: int | None = None, blocks: Blocks | None = None, itemsize: int = 4) -> Cost:
    """The counts of the module docstring for one call on molecules of the given sizes: the exact
    divergence (n_probes None; tangent_chunk tangents per chunk, default all) or JVPs with n_probes."""
    h, hp, L = hidden, padded_hidden(hidden), n_layers
    blocks = blocks or default_blocks(hidden)
    n_atoms, n_max = sum(sizes), max(sizes, default=0)
    unit = n_probes is None
    n_tan = 3 * n_max if unit else n_probes
    chunk = (tangent_chunk or max(n_tan, 1)) if unit else jvp_chunk(n_atoms, hidden, max(n_probes, 1))
    useful = executed = 0.0
    for n in sizes:
        e = n * (n - 1)
        t_b = 3 * n if unit else n_probes
        primal = 4 * L * (e + n) * h * h + 6 * (L - 1) * n * h * h
        last = 4 * (n - 1) * t_b * h * h if unit else 4 * t_b * e * h * h
        if L == 1:  # layer 1 is the last: the unit responses alone
            tangent_rows = 4 * e * h * h
        else:
            tangent_rows = 4 * e * h * h + 2 * t_b * e * h + 4 * (L - 2) * t_b * e * h * h + last
        useful += primal + tangent_rows + t_b * n * h * h * (8 * (L - 1) + 2 * max(L - 2, 0))
        # Executed: the primal kernels per receiver and sender tile, then every chunk's programs.
        tiles = math.ceil(n / blocks.senders) * blocks.senders  # padded senders per receiver
        executed += 4 * L * n * tiles * hp * hp + (4 * L * n + 6 * (L - 1) * n) * h * h
        for t0 in range(0, max(n_tan, 1), chunk):
            rows = min(chunk, n_tan - t0)
            mine = max(0, min(rows, 3 * n - t0)) if unit else rows  # this molecule's tangents in the chunk
            if not mine:
                continue
            for layer in range(L):
                first, final = layer == 0, layer == L - 1
                if unit and final:
                    own = sum(1 for a in range(n) if any(t0 <= 3 * a + k < t0 + rows for k in range(3)))
                    per = 4 * tiles * hp * hp * (1 + (1 if first else 4))
                    executed += own * per
                    continue
                bt = blocks.first_tangents if first else blocks.tangents
                programs = n * math.ceil(mine / bt)
                per = 4 * tiles * hp * hp  # primal recompute
                if first:  # unit responses, then one [BT, J] x [J, H] dot unless the layer is the last
                    per += 4 * tiles * hp * hp + (0 if final else 2 * bt * tiles * hp)
                else:
                    per += 4 * bt * tiles * hp * hp
                executed += programs * per
    # Node products run on every row of a chunk for every atom (zeros where a molecule has no tangent).
    node_per_row = h * h * (8 * (L - 1) + 2 * max(L - 2, 0))
    executed += n_tan * n_atoms * node_per_row
    n_mol = len(sizes)
    weights = L * (h * (2 * h + 2) + 2 * h * h + h * 2 * h + h * h + 9 * h + 1)
    io = n_atoms * (3 + h) + weights + n_atoms * 3 + (n_mol if unit else 2 * n_tan * n_atoms * 3)
    state = n_tan * n_atoms * 16 * h * max(L - 1, 0) + L * n_atoms * (3 * h + 3)
    return Cost(useful, executed, io * itemsize, state * itemsize)


# ---- the EGNN forward / backward (tbg.nn.triton.egnn) and the shared edge pass ---------------------------
@dataclasses.dataclass(frozen=True)
class EdgeTiles:
    """Tiles and programs of the edge kernels of tbg.nn.triton.stack (the primal edge pass of every op)
    and tbg.nn.triton.egnn (the backward).

    A tile is `receivers` x `senders` atoms of one molecule: receivers * senders edge rows through the
    H x H products as one [rows, H] x [H, H] tl.dot (so rows >= 16 on a GPU; the weight-gradient dots of
    the backward contract over the rows). Work items are (molecule, split): split s of a molecule takes its
    receiver tiles s, s + splits, ...; splits None chooses by batch size (``work_split``). The forward runs
    one program per work item; the backward at most `programs` programs (None: by device), each walking
    the items pid, pid + programs, ... and keeping its own partial weight gradients (one slot of
    2 H^2 + 7 H elements per program, summed in program order at the end: deterministic, no atomics).
    warps, stages: Triton's num_warps / num_stages.
    """

    receivers: int = 8
    senders: int = 8
    warps: int = 4
    stages: int = 1
    splits: int | None = None
    programs: int | None = None

    def check(self, native: bool) -> None:
        for name in ("receivers", "senders"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"EdgeTiles.{name} must be a power of two, got {value}")
        for name in ("splits", "programs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EdgeTiles.{name} must be >= 1, got {value}")
        if native and self.receivers * self.senders < 16:
            raise ValueError(f"{self}: on a GPU tl.dot needs receivers * senders >= 16 edge rows")


def default_edge_tiles(hidden: int) -> EdgeTiles:
    """A starting point by hidden size, not tuned on hardware. Up to H = 64: 8 x 8 = 64-edge tiles (pads a
    22-atom molecule to 24 x 24 rows, 1.25x its edges), 4 warps. Beyond: 4 x 8 = 32-edge tiles and 8
    warps, because the backward keeps two [H, H] weight-gradient accumulators in registers besides the
    [rows, H] tiles (at H = 128 the accumulators alone take 128 registers per thread with 8 warps)."""
    if hidden <= 64:
        return EdgeTiles(receivers=8, senders=8, warps=4)
    return EdgeTiles(receivers=4, senders=8, warps=8)


# Variants timed by `bench/bench_egnn.py --sweep` on a GPU (all valid there).
EDGE_SWEEP = (EdgeTiles(), EdgeTiles(warps=8), EdgeTiles(receivers=4, senders=8, warps=8),
              EdgeTiles(receivers=8, senders=16, warps=8), EdgeTiles(stages=2), EdgeTiles(receivers=4, senders=4))

MAX_SPLITS = 8


def work_split(n_molecules: int, tiles: EdgeTiles, sm_count: int | None) -> tuple[int, int]:
    """(splits per molecule, programs of the backward) for a batch of n_molecules.

    On a GPU (sm_count given): splits so that the forward has about two programs per SM (a power of two,
    at most MAX_SPLITS; a molecule has ceil(n / receivers) receiver tiles, so more than that idles), and
    at most 4 programs per SM in the backward. On the CPU (the interpreter runs programs one after
    another): 1 split and 2 programs, so that the reduction over programs runs in every CPU test. Tiles
    given explicitly win. Depends on shapes only: no device value is read.
    """
    if sm_count is None:
        splits, programs = 1, 2
    else:
        want = -(-2 * sm_count // max(n_molecules, 1))
        splits = min(MAX_SPLITS, 1 << max(0, want - 1).bit_length())
        programs = 4 * sm_count
    splits = tiles.splits or splits
    return splits, min(n_molecules * splits, tiles.programs or programs)


def edge_rows(n: int, tiles: EdgeTiles) -> int:
    """Edge rows the tiles of one n-atom molecule run (receivers and senders rounded up to the tiles)."""
    return -(-n // tiles.receivers) * tiles.receivers * -(-n // tiles.senders) * tiles.senders


def egnn_cost(sizes: list[int], hidden: int, n_layers: int, *, backward: bool = True,
              tiles: EdgeTiles | None = None, sm_count: int | None = None, itemsize: int = 4) -> Cost:
    """Work of one tbg::egnn_forward call, plus one tbg::egnn_backward call when backward (a training
    step's op pair), on molecules of the given sizes.

    FLOPs count a multiply-add as 2 and only the products with H x H weights (element-wise work, O(H) per
    edge, is not counted). Per molecule of n atoms and E = n (n - 1) edges:

    useful (what the algorithm needs; what autograd over stored activations would run):
        forward   L (4 E H^2 + 4 n H^2) + 6 (L - 1) n H^2     W2, Wc1 per edge; [P | Q]; node MLP
        backward  L (8 E H^2 + 8 n H^2) + 12 (L - 1) n H^2    per edge the input gradients through Wc1 and
                  W2 and their weight gradients; [P | Q]'s weight and input gradients; the node MLP's
    executed: edges rounded up to the tiles (``edge_rows``), H to a power of two >= 16, and what the
    backward recomputes instead of storing (memory O(M H), as the .cu kernels): [P | Q] (4 n H^2), the
    message sums agg of every layer but the last (2 rows H^2: W2 only), the edge MLP (4 rows H^2) and
    the node MLP's first linear (4 n H^2).

    Bytes. Compulsory: inputs read once, outputs written once (x, h0, weights, v, h_states, x_states;
    backward: grad_v, the states, the 15 gradients). State: the node-level tensors between kernels and
    torch GEMMs, ~12 H elements per atom and layer forward, ~(32 + 2 splits) H backward (pq, agg, the node
    MLP's tensors, gagg, gP, the splits' partial gQ, gh), plus the backward programs' weight-gradient slots
    (2 H^2 + 7 H each, written and read once per layer; splits and programs as ``work_split`` chooses them
    for sm_count, None: the CPU's). Re-reads of P_i / Q_j by the other tiles of a
    molecule come from the L2 cache and are not counted. Intensity (useful FLOPs per byte, float32, a
    training step's op pair): ~60 for alanine dipeptide at batch 256 (H = 64; a third of the bytes are the
    weight-gradient slots of 512 programs), ~230 for 400 dipeptides at H = 128: compute-bound on an H200 in
    float32 (balance ~14: 67 TFLOP/s over 4.8 TB/s), near or above TF32's balance (~100, ~495 TFLOP/s).

    Ceiling aimed for (issue 13: a training step >= 3x the reference with >= 3x less memory). The .cu
    kernels' op pair (bench/RESULTS.md, H100) achieves 4.4 useful TFLOP/s for alanine dipeptide and 7.2
    for the transfer batch, 9% and 14% of the 51.6 TFLOP/s fp32 torch.mm ceiling; 3x the reference needs
    ~7.5 and ~11 (15% and 22%). The aim: >= 40% of the fp32 mm ceiling measured in the same run with IEEE
    dots, >= 25% of the TF32 one with TF32 on - there the element-wise epilogues (~40 H operations and 3 H
    exponentials per edge in the backward, on CUDA cores and the SFU) take about as long as the tensor-core
    products, so half the TF32 rate is the practical bound. Alanine dipeptide at batch 256 does ~32 GFLOP
    per step: at these rates ~1.5 ms (fp32) or ~0.3 ms (TF32) of kernel work against ~250 kernel launches
    of a few microseconds (the node-level torch GEMMs), so there the launches bound the step.
    """
    h, hp, L = hidden, padded_hidden(hidden), n_layers
    tiles = tiles or default_edge_tiles(hidden)
    useful = executed = 0.0
    for n in sizes:
        e, rows = n * (n - 1), edge_rows(n, tiles)
        fwd = L * (4 * e + 4 * n) * h * h + 6 * (L - 1) * n * h * h
        useful += fwd
        executed += L * (4 * rows * hp * hp + 4 * n * h * h) + 6 * (L - 1) * n * h * h
        if backward:
            useful += L * (8 * e + 8 * n) * h * h + 12 * (L - 1) * n * h * h
            executed += (L * (12 * rows * hp * hp + 12 * n * h * h) + (L - 1) * (2 * rows * hp * hp + 16 * n * h * h))
    n_atoms = sum(sizes)
    splits, programs = work_split(len(sizes), tiles, sm_count)
    weights = L * (h * (2 * h + 2) + 2 * h * h + h * 2 * h + h * h + 9 * h + 1)
    io = n_atoms * (3 + h) + weights + n_atoms * 3 + L * n_atoms * (h + 3)
    state = L * n_atoms * 12 * h
    if backward:
        io += n_atoms * 3 + L * n_atoms * (h + 3) + n_atoms * (3 + h) + weights
        state += L * (n_atoms * (32 + 2 * splits) * h + 2 * programs * (2 * h * h + 7 * h))
    return Cost(useful, executed, io * itemsize, state * itemsize)
