"""Fused EGNN ops vs the plain-PyTorch reference: vector field and training step, side by side.

    python bench/bench_egnn.py [--device cpu|cuda] [--repeats 3]

Cases (issue 3):
  (a) alanine dipeptide, N = 22, H = 64, L = 5, batch 256: vector field, and one training step
      (flow-matching loss, backward, Adam step);
  (b) transfer model, H = 128, L = 9, 400 dipeptides of 20..51 atoms: the reference padded to 51
      atoms with masks (as published) vs the fused ops on the ragged batch (no padding work);
  (c) batch 1 (sampling or likelihood of one molecule): alanine dipeptide (N = 22, H = 64, L = 5)
      and one 51-atom molecule of the transfer model (H = 128, L = 9), vector field and
      forward + backward, with 1 thread and with all threads (torch.set_num_threads): the fused
      kernel must use every thread on a single molecule;
  (d) transfer model training step (forward + backward + Adam) at --train-batch dipeptides (default
      32: the padded reference's activations for the published batch 400 do not fit in memory).
Times are the median of --repeats runs after one warm-up (case (c): as many runs as fit in about
half a second, at least --repeats). Peak memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the peak resident set size (VmHWM, reset through
/proc/self/clear_refs before each measurement) minus the resident size just before it.
FLOPs are those of the fused algorithm (counted below), so GFLOP/s of the reference row is the
useful work it achieves, not what it executes.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

import tbg
from common import machine, matmul_peak_gflops, measure
from tbg.nn.layout import mol_ptr_from_sizes


def fused_flops(sizes: list[int], hidden: int, n_layers: int, backward: bool) -> float:
    """Multiply-adds x 2 (plus the linear elementwise work) of the fused algorithm.

    Per layer and edge: z1 = P_i + Q_j + w_r r + w_a a (5H), the W2 and Wc1 products (2 x 2H^2),
    attention and coordinate dots (4H), gating and the message sum (2H). Per atom: P and Q
    (2 x 2H^2) and, except in the last layer, the node MLP (3 x 2H^2). Backward recomputes the
    forward of every layer and adds, per edge, 4 products (input and weight gradients of W2 and
    Wc1, 4 x 2H^2) and ~16H elementwise, per atom 9 more H x H products (node MLP gradients,
    W1a/W1b gradients and their input gradients). SiLU/exp are not counted.
    """
    h2 = hidden * hidden
    edges = sum(n * (n - 1) for n in sizes)
    atoms = sum(sizes)
    fwd = n_layers * (edges * (4 * h2 + 11 * hidden) + atoms * 4 * h2) + (n_layers - 1) * atoms * 6 * h2
    if not backward:
        return float(fwd)
    bwd = fwd + n_layers * (edges * (8 * h2 + 16 * hidden) + atoms * 4 * h2) + (n_layers - 1) * atoms * 14 * h2
    return float(fwd + bwd)


def report(title: str, rows: dict[str, tuple[float, float]], flops: float, peak: float) -> list[str]:
    ref_t, ref_m = rows["reference"]
    lines = [f"{title}", f"  {'backend':<10} {'time [ms]':>10} {'speed-up':>9} {'peak mem [MiB]':>15} "
             f"{'mem ratio':>9} {'GFLOP/s':>8} {'% peak':>7}"]
    for name, (t, m) in rows.items():
        gflops = flops / t / 1e9
        lines.append(f"  {name:<10} {t * 1e3:>10.1f} {ref_t / t:>8.2f}x {m:>15.1f} "
                     f"{(ref_m / m if m > 0 else float('nan')):>8.2f}x {gflops:>8.1f} {100 * gflops / peak:>6.1f}%")
    print("\n".join(lines), flush=True)
    return lines


def alanine(device: str, repeats: int, peak: float) -> list[str]:
    n_atoms, hidden, n_layers, batch = 22, 64, 5, 256
    torch.manual_seed(0)
    features = torch.eye(22, device=device)
    model = tbg.EGNN(22, hidden, n_layers).to(device)
    x = torch.randn(batch, n_atoms, 3, device=device) * 3
    t = torch.rand(batch, device=device)
    print(f"(a) alanine dipeptide: N = {n_atoms}, H = {hidden}, L = {n_layers}, batch {batch}, float32")
    lines = [f"(a) alanine dipeptide: N = {n_atoms}, H = {hidden}, L = {n_layers}, batch {batch}, float32"]
    rows = {}
    for backend in ("reference", "fused"):
        with torch.no_grad():
            rows[backend] = measure(lambda: model(t, x, features, backend=backend), device, repeats)[:2]
    lines += report("  vector field", rows, fused_flops([n_atoms] * batch, hidden, n_layers, False), peak)

    target = torch.randn_like(x)
    weight = torch.full((batch, n_atoms), 1 / (3 * n_atoms * batch), device=device)
    rows = {backend: training_step(model, backend, device, repeats, t, x, features, target, weight)
            for backend in ("reference", "fused")}
    lines += report("  training step (forward + backward + Adam)", rows,
                    fused_flops([n_atoms] * batch, hidden, n_layers, True), peak)
    return lines


def training_step(model: tbg.EGNN, backend: str, device: str, repeats: int, t: torch.Tensor, x: torch.Tensor,
                  features: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, **layout: torch.Tensor
                  ) -> tuple[float, float]:
    """(seconds, peak MiB) of one flow-matching step on a copy of model: loss = sum over atoms of
    weight * |v - target|^2 (weight = 1 / (3 N_real B) on real atoms: the published per-sample
    normalisation), backward, Adam."""
    net = copy.deepcopy(model)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        v = net(t, x, features, backend=backend, **layout)
        (weight[..., None] * (v - target).square()).sum().backward()
        opt.step()

    return measure(step, device, repeats)[:2]


def transfer(device: str, repeats: int, peak: float) -> list[str]:
    hidden, n_layers, batch, n_pad, n_features = 128, 9, 400, 51, 76
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, n_pad + 1, (batch,), generator=gen).tolist()
    model = tbg.EGNN(n_features, hidden, n_layers).to(device)
    t = torch.rand(batch, device=device)
    mask = (torch.arange(n_pad)[None] < torch.tensor(sizes)[:, None]).to(device)
    x_pad = torch.randn(batch, n_pad, 3, device=device) * 3 * mask[..., None]
    f_pad = torch.randn(batch, n_pad, n_features, device=device) * mask[..., None]
    ptr = mol_ptr_from_sizes(sizes, device=device)
    x_rag, f_rag = x_pad[mask], f_pad[mask]
    lines = [f"(b) transfer model: H = {hidden}, L = {n_layers}, {batch} dipeptides of 20..51 atoms "
             f"(mean {sum(sizes) / batch:.1f}), float32; reference padded to {n_pad} (published layout), "
             f"fused ragged"]
    print(lines[0], flush=True)
    rows = {}
    with torch.no_grad():
        rows["reference"] = measure(lambda: model(t, x_pad, f_pad, node_mask=mask, backend="reference"), device,
                                    max(1, repeats // 2))[:2]
        rows["fused"] = measure(lambda: model(t, x_rag, f_rag, mol_ptr=ptr, backend="fused"), device, repeats)[:2]
        v_ref = model(t, x_pad, f_pad, node_mask=mask, backend="reference")[mask]
        v_fused = model(t, x_rag, f_rag, mol_ptr=ptr, backend="fused")
    err = ((v_fused - v_ref).abs().max() / v_ref.abs().max()).item()
    lines += report("  vector field", rows, fused_flops(sizes, hidden, n_layers, False), peak)
    lines.append(f"  max |v_fused - v_reference| / max |v_reference| = {err:.1e}")
    print(lines[-1])
    return lines


def transfer_training(device: str, repeats: int, peak: float, batch: int) -> list[str]:
    """Case (d): the transfer model's training step at a batch the padded reference fits in memory."""
    hidden, n_layers, n_pad, n_features = 128, 9, 51, 76
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, n_pad + 1, (batch,), generator=gen).tolist()
    model = tbg.EGNN(n_features, hidden, n_layers).to(device)
    t = torch.rand(batch, device=device)
    n_real = torch.tensor(sizes, device=device)
    mask = torch.arange(n_pad, device=device)[None] < n_real[:, None]
    x_pad = torch.randn(batch, n_pad, 3, device=device) * 3 * mask[..., None]
    f_pad = torch.randn(batch, n_pad, n_features, device=device) * mask[..., None]
    u_pad = torch.randn(batch, n_pad, 3, device=device) * mask[..., None]
    w_pad = mask / (3 * n_real[:, None] * batch)
    ptr = mol_ptr_from_sizes(sizes, device=device)
    lines = [f"(d) transfer model training step (forward + backward + Adam): H = {hidden}, L = {n_layers}, "
             f"batch {batch} dipeptides of 20..51 atoms (mean {sum(sizes) / batch:.1f}; published batch 400, "
             f"which the padded reference cannot hold in memory here), float32; reference padded to {n_pad}, "
             f"fused ragged"]
    print(lines[0], flush=True)
    rows = {"reference": training_step(model, "reference", device, max(1, repeats // 2), t, x_pad, f_pad, u_pad,
                                       w_pad, node_mask=mask),
            "fused": training_step(model, "fused", device, repeats, t, x_pad[mask], f_pad[mask], u_pad[mask],
                                   w_pad[mask], mol_ptr=ptr)}
    lines += report("  training step", rows, fused_flops(sizes, hidden, n_layers, True), peak)
    return lines


def timed(fn: Callable[[], object], device: str, repeats: int, budget_s: float = 0.5) -> float:
    """Median seconds of fn() over max(repeats, as many calls as fit in budget_s) (millisecond calls)."""
    probe, _, _ = measure(fn, device, 1)
    return measure(fn, device, max(repeats, min(200, int(budget_s / max(probe, 1e-6)))), warmup=0)[0]


def batch_one(device: str, repeats: int) -> list[str]:
    """Case (c): one molecule at a time, with 1 thread and with all threads; % peak is against the
    torch.mm ceiling measured at the same thread count."""
    threads_all = torch.get_num_threads()
    counts = sorted({1, threads_all})
    peaks = {}
    for k in counts:
        torch.set_num_threads(k)
        peaks[k] = matmul_peak_gflops(device)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    emit(f"(c) batch 1, float32, torch threads {counts}; practical fp32 peak (torch.mm 2048^3): "
         + ", ".join(f"{peaks[k]:.1f} GFLOP/s with {k}" for k in counts))
    problems = [("alanine dipeptide", 22, 64, 5, 22), ("one 51-atom dipeptide (transfer model)", 51, 128, 9, 76)]
    try:
        for name, n_atoms, hidden, n_layers, n_features in problems:
            torch.manual_seed(0)
            model = tbg.EGNN(n_features, hidden, n_layers).to(device)
            x = torch.randn(1, n_atoms, 3, device=device) * 3
            f = torch.randn(1, n_atoms, n_features, device=device)
            t = torch.rand(1, device=device)
            target = torch.randn_like(x)

            def field(backend: str) -> None:
                with torch.no_grad():
                    model(t, x, f, backend=backend)

            def forward_backward(backend: str) -> None:
                model.zero_grad(set_to_none=True)
                (model(t, x, f, backend=backend) * target).sum().backward()

            emit(f"  {name}: N = {n_atoms}, H = {hidden}, L = {n_layers}")
            for mode, fn, backward in (("vector field", field, False),
                                       ("forward + backward (parameter gradients)", forward_backward, True)):
                flops = fused_flops([n_atoms], hidden, n_layers, backward)
                emit(f"    {mode}")
                emit(f"      {'threads':>7} {'reference [ms]':>15} {'fused [ms]':>11} {'speed-up':>9} "
                     f"{'fused GFLOP/s':>14} {'% peak':>7}")
                times = {}
                for k in counts:
                    torch.set_num_threads(k)
                    times[k] = {b: timed(lambda: fn(b), device, repeats) for b in ("reference", "fused")}
                    ref, fused = times[k]["reference"], times[k]["fused"]
                    gflops = flops / fused / 1e9
                    emit(f"      {k:>7} {ref * 1e3:>15.2f} {fused * 1e3:>11.2f} {ref / fused:>8.2f}x "
                         f"{gflops:>14.1f} {100 * gflops / peaks[k]:>6.1f}%")
                if len(counts) > 1:
                    one, most = counts[0], counts[-1]
                    emit(f"      {most} vs 1 thread: reference "
                         f"{times[one]['reference'] / times[most]['reference']:.2f}x, fused "
                         f"{times[one]['fused'] / times[most]['fused']:.2f}x")
    finally:
        torch.set_num_threads(threads_all)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=["a", "b", "c", "d", "all"], default="all",
                        help="(a) alanine dipeptide, (b) transfer model, (c) batch 1, (d) transfer training step")
    parser.add_argument("--train-batch", type=int, default=32, help="batch of case (d)")
    args = parser.parse_args()
    device = args.device
    peak = matmul_peak_gflops(device)
    header = [f"device: {machine(device)}; tbg build {tbg.build_info()['build_type']}",
              f"practical fp32 peak (torch.mm 2048^3, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s"]
    print("\n".join(header), flush=True)
    if args.case in ("a", "all"):
        alanine(device, args.repeats, peak)
    if args.case in ("b", "all"):
        transfer(device, args.repeats, peak)
    if args.case in ("c", "all"):
        batch_one(device, args.repeats)
    if args.case in ("d", "all"):
        transfer_training(device, args.repeats, peak, args.train_batch)


if __name__ == "__main__":
    main()
