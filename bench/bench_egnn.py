"""Fused EGNN ops vs the plain-PyTorch reference: vector field and training step, side by side.

    python bench/bench_egnn.py [--device cpu|cuda] [--repeats 3] [--triton] [--dry-run]
    python bench/bench_egnn.py --device cuda --sweep       # Triton tile variants (tbg.nn.triton.plan.EDGE_SWEEP)

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
Rows: "reference" (plain PyTorch, autograd), "fused" (the compiled ops: the C++ CPU kernel or, on CUDA,
what `tbg info` names - the .cu kernels unless TBG_TRITON=egnn) and, with --triton, "triton" (the Triton
kernels of tbg.nn.triton.egnn registered for the call, float32 dots in IEEE precision) and on CUDA
"triton tf32" (PyTorch's TF32 switch on: TF32 tensor cores in the edge dots and in cuBLAS). Cases (a),
(b) and (d) get the Triton rows; (c) compares threads of the CPU kernel.

Times are the median of --repeats runs after one warm-up (case (c): as many runs as fit in about
half a second, at least --repeats). Peak memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the peak resident set size (VmHWM, reset through
/proc/self/clear_refs before each measurement) minus the resident size just before it.
FLOPs are the useful ones of tbg.nn.triton.plan.egnn_cost (the H x H products the algorithm needs, a
multiply-add counted as 2; what the backward recomputes is not counted, nor element-wise work), the same
count for every row, so GFLOP/s of a row is the useful work it achieves. Rates are given against the
float32 torch.mm ceiling measured in the same run (TF32 off) and, for "triton tf32", the TF32 one.
(Sections of bench/RESULTS.md before 2026-12 counted the fused algorithm's executed work instead,
recomputation included: ~1.5x these numbers for a training step.)

--dry-run: tiny models and batches, every code path once (on CPU the Triton rows need
TRITON_INTERPRET=1 in the environment), to check the script before a GPU is spent on it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

import tbg
from common import machine, matmul_peak_gflops, measure
from tbg.nn import triton as tbg_triton
from tbg.nn.layout import mol_ptr_from_sizes
from tbg.nn.triton import plan


class Problem(NamedTuple):
    n_features: int
    hidden: int
    n_layers: int
    atoms: tuple[int, int]  # smallest and largest molecule (alanine dipeptide: both 22)
    batch: int


# Published sizes and (--dry-run) small ones that keep every code path.
PROBLEMS = {"ala2": Problem(22, 64, 5, (22, 22), 256), "transfer": Problem(76, 128, 9, (20, 51), 400)}
DRY_PROBLEMS = {"ala2": Problem(6, 16, 2, (6, 6), 2), "transfer": Problem(5, 16, 2, (3, 7), 3)}


def useful_flops(sizes: list[int], hidden: int, n_layers: int, backward: bool) -> float:
    """Useful FLOPs of one field evaluation (or forward + backward) by tbg.nn.triton.plan.egnn_cost."""
    return plan.egnn_cost(sizes, hidden, n_layers, backward=backward).useful_flops


@contextlib.contextmanager
def backend_of(row: str, device: str) -> Iterator[str]:
    """The EGNN backend a row runs, with the Triton ops registered (and TF32 switched on) for "triton" rows."""
    if not row.startswith("triton"):
        yield row
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = row == "triton tf32"
    try:
        with tbg_triton.serving("egnn", device):
            yield "fused"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def rows_for(device: str, triton: bool) -> tuple[str, ...]:
    extra = ("triton", "triton tf32") if torch.device(device).type == "cuda" else ("triton",)
    return ("reference", "fused", *(extra if triton else ()))


def report(title: str, short: str, rows: dict[str, tuple[float, float]], flops: float, peaks: dict[str, float]
           ) -> list[str]:
    """The case's table: time, speed-up over the reference and over the fused (compiled) ops, peak memory
    and its ratio to the reference's, useful GFLOP/s and its share of the fp32 (tf32 rows: TF32) ceiling;
    then one line per Triton row starting with `short` (bench/gpu_check.sh collects these)."""
    ref_t, ref_m = rows["reference"]
    fused_t = rows["fused"][0]
    lines = [f"{title}", f"  {'backend':<12} {'time [ms]':>10} {'vs ref':>8} {'vs fused':>9} {'peak mem [MiB]':>15} "
             f"{'mem ratio':>9} {'GFLOP/s':>9} {'% ceiling':>10}"]
    for name, (t, m) in rows.items():
        gflops = flops / t / 1e9
        ceiling = "tf32" if name.endswith("tf32") else "fp32"
        lines.append(f"  {name:<12} {t * 1e3:>10.2f} {ref_t / t:>7.2f}x {fused_t / t:>8.2f}x {m:>15.1f} "
                     f"{(ref_m / m if m > 0 else float('nan')):>8.2f}x {gflops:>9.1f} "
                     f"{100 * gflops / peaks[ceiling]:>6.1f}% {ceiling}")
    for name, (t, m) in rows.items():
        if name.startswith("triton"):
            ceiling = "tf32" if name.endswith("tf32") else "fp32"
            lines.append(f"{short} {name}: {t * 1e3:.2f} ms, {ref_t / t:.2f}x ref, {fused_t / t:.2f}x fused, memory "
                         f"1/{ref_m / m if m > 0 else float('nan'):.1f} of ref, {flops / t / 1e12:.2f} TFLOP/s = "
                         f"{100e-9 * flops / t / peaks[ceiling]:.0f}% {ceiling} mm")
    print("\n".join(lines), flush=True)
    return lines


def alanine(device: str, repeats: int, peaks: dict[str, float], problem: Problem, triton: bool) -> list[str]:
    n_atoms, hidden, n_layers, batch = problem.atoms[0], problem.hidden, problem.n_layers, problem.batch
    torch.manual_seed(0)
    features = torch.eye(problem.n_features, device=device)[:n_atoms]
    model = tbg.EGNN(problem.n_features, hidden, n_layers).to(device)
    x = torch.randn(batch, n_atoms, 3, device=device) * 3
    t = torch.rand(batch, device=device)
    lines = [f"(a) alanine dipeptide: N = {n_atoms}, H = {hidden}, L = {n_layers}, batch {batch}, float32"]
    print(lines[0], flush=True)
    rows = {}
    for row in rows_for(device, triton):
        with torch.no_grad(), backend_of(row, device) as backend:
            rows[row] = measure(lambda: model(t, x, features, backend=backend), device, repeats)[:2]
    lines += report("  vector field", "ala2 field", rows, useful_flops([n_atoms] * batch, hidden, n_layers, False),
                    peaks)

    target = torch.randn_like(x)
    weight = torch.full((batch, n_atoms), 1 / (3 * n_atoms * batch), device=device)
    rows = {}
    for row in rows_for(device, triton):
        with backend_of(row, device) as backend:
            rows[row] = training_step(model, backend, device, repeats, t, x, features, target, weight)
    lines += report("  training step (forward + backward + Adam)", "ala2 training", rows,
                    useful_flops([n_atoms] * batch, hidden, n_layers, True), peaks)
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


def dipeptide_batch(problem: Problem, batch: int, device: str):
    """Sizes drawn from problem.atoms, a model, and the batch padded to the largest size (the published
    layout) with its node mask, plus the ragged mol_ptr."""
    gen = torch.Generator().manual_seed(0)
    low, n_pad = problem.atoms
    sizes = torch.randint(low, n_pad + 1, (batch,), generator=gen).tolist()
    model = tbg.EGNN(problem.n_features, problem.hidden, problem.n_layers).to(device)
    mask = (torch.arange(n_pad)[None] < torch.tensor(sizes)[:, None]).to(device)
    return sizes, n_pad, model, mask, mol_ptr_from_sizes(sizes, device=device)


def transfer(device: str, repeats: int, peaks: dict[str, float], problem: Problem, triton: bool) -> list[str]:
    hidden, n_layers, batch, n_features = problem.hidden, problem.n_layers, problem.batch, problem.n_features
    sizes, n_pad, model, mask, ptr = dipeptide_batch(problem, batch, device)
    t = torch.rand(batch, device=device)
    x_pad = torch.randn(batch, n_pad, 3, device=device) * 3 * mask[..., None]
    f_pad = torch.randn(batch, n_pad, n_features, device=device) * mask[..., None]
    x_rag, f_rag = x_pad[mask], f_pad[mask]
    lines = [f"(b) transfer model: H = {hidden}, L = {n_layers}, {batch} dipeptides of {problem.atoms[0]}..{n_pad} "
             f"atoms (mean {sum(sizes) / batch:.1f}), float32; reference padded to {n_pad} (published layout), "
             f"fused ragged"]
    print(lines[0], flush=True)
    rows, fields = {}, {}
    with torch.no_grad():
        rows["reference"] = measure(lambda: model(t, x_pad, f_pad, node_mask=mask, backend="reference"), device,
                                    max(1, repeats // 2))[:2]
        v_ref = model(t, x_pad, f_pad, node_mask=mask, backend="reference")[mask]
        for row in rows_for(device, triton)[1:]:
            with backend_of(row, device) as backend:
                rows[row] = measure(lambda: model(t, x_rag, f_rag, mol_ptr=ptr, backend=backend), device, repeats)[:2]
                fields[row] = model(t, x_rag, f_rag, mol_ptr=ptr, backend=backend)
    lines += report("  vector field", "transfer field", rows, useful_flops(sizes, hidden, n_layers, False), peaks)
    for row, v in fields.items():
        lines.append(f"  max |v_{row} - v_reference| / max |v_reference| = "
                     f"{((v - v_ref).abs().max() / v_ref.abs().max()).item():.1e}")
        print(lines[-1])
    return lines


def transfer_training(device: str, repeats: int, peaks: dict[str, float], problem: Problem, batch: int,
                      triton: bool) -> list[str]:
    """Case (d): the transfer model's training step at a batch the padded reference fits in memory."""
    hidden, n_layers, n_features = problem.hidden, problem.n_layers, problem.n_features
    sizes, n_pad, model, mask, ptr = dipeptide_batch(problem, batch, device)
    t = torch.rand(batch, device=device)
    n_real = torch.tensor(sizes, device=device)
    x_pad = torch.randn(batch, n_pad, 3, device=device) * 3 * mask[..., None]
    f_pad = torch.randn(batch, n_pad, n_features, device=device) * mask[..., None]
    u_pad = torch.randn(batch, n_pad, 3, device=device) * mask[..., None]
    w_pad = mask / (3 * n_real[:, None] * batch)
    lines = [f"(d) transfer model training step (forward + backward + Adam): H = {hidden}, L = {n_layers}, "
             f"batch {batch} dipeptides of {problem.atoms[0]}..{n_pad} atoms (mean {sum(sizes) / batch:.1f}; "
             f"published batch 400, which the padded reference cannot hold in memory here), float32; reference "
             f"padded to {n_pad}, fused ragged"]
    print(lines[0], flush=True)
    rows = {"reference": training_step(model, "reference", device, max(1, repeats // 2), t, x_pad, f_pad, u_pad,
                                       w_pad, node_mask=mask)}
    for row in rows_for(device, triton)[1:]:
        with backend_of(row, device) as backend:
            rows[row] = training_step(model, backend, device, repeats, t, x_pad[mask], f_pad[mask], u_pad[mask],
                                      w_pad[mask], mol_ptr=ptr)
    lines += report("  training step", "transfer training", rows, useful_flops(sizes, hidden, n_layers, True), peaks)
    return lines


def sweep(device: str, repeats: int, peaks: dict[str, float], problems: dict[str, Problem], batch: int) -> None:
    """Training steps of (a) and (d) with the Triton ops for every tile variant of plan.EDGE_SWEEP, IEEE and
    (CUDA) TF32."""
    from tbg.nn.triton import stack  # noqa: PLC0415 - optional (Triton), imported when asked for

    cases = []
    ala2 = problems["ala2"]
    n = ala2.atoms[0]
    model = tbg.EGNN(ala2.n_features, ala2.hidden, ala2.n_layers).to(device)
    x = torch.randn(ala2.batch, n, 3, device=device) * 3
    cases.append(("ala2", model, [n] * ala2.batch, (torch.rand(ala2.batch, device=device), x,
                                                     torch.eye(ala2.n_features, device=device)[:n],
                                                     torch.randn_like(x), torch.full((ala2.batch, n), 1e-3, device=device)),
                  {}))
    sizes, _, model, mask, ptr = dipeptide_batch(problems["transfer"], batch, device)
    m = int(sum(sizes))
    cases.append(("transfer", model, sizes, (torch.rand(batch, device=device), torch.randn(m, 3, device=device) * 3,
                                             torch.randn(m, problems["transfer"].n_features, device=device),
                                             torch.randn(m, 3, device=device), torch.full((m,), 1e-4, device=device)),
                  {"mol_ptr": ptr}))
    kinds = ("triton", "triton tf32") if torch.device(device).type == "cuda" else ("triton",)
    for name, model, sizes, inputs, layout in cases:
        flops = useful_flops(sizes, model.hidden, model.n_layers, True)
        print(f"\n{name} training step: Triton tile variants (default {plan.default_edge_tiles(model.hidden)})")
        print(f"{'receivers':>10}{'senders':>8}{'warps':>6}{'stages':>7}" + "".join(f"{k + ' ms':>17}{'TFLOP/s':>9}"
                                                                                   for k in kinds))
        for tiles in plan.EDGE_SWEEP:
            cells = []
            for kind in kinds:
                try:
                    with stack.use_tiles(tiles), backend_of(kind, device) as backend:
                        seconds = training_step(model, backend, device, repeats, *inputs, **layout)[0]
                    cells.append(f"{seconds * 1e3:>17.2f}{flops / seconds / 1e12:>9.2f}")
                except Exception as err:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                    cells.append(f"{'failed: ' + type(err).__name__:>26}")
            print(f"{tiles.receivers:>10}{tiles.senders:>8}{tiles.warps:>6}{tiles.stages:>7}{''.join(cells)}",
                  flush=True)


def timed(fn: Callable[[], object], device: str, repeats: int, budget_s: float = 0.5) -> float:
    """Median seconds of fn() over max(repeats, as many calls as fit in budget_s) (millisecond calls)."""
    probe, _, _ = measure(fn, device, 1)
    return measure(fn, device, max(repeats, min(200, int(budget_s / max(probe, 1e-6)))), warmup=0)[0]


def batch_one(device: str, repeats: int, problems: dict[str, Problem]) -> list[str]:
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
    cases = [("alanine dipeptide", problems["ala2"]),
             (f"one {problems['transfer'].atoms[1]}-atom dipeptide (transfer model)", problems["transfer"])]
    try:
        for name, problem in cases:
            n_atoms, hidden, n_layers, n_features = (problem.atoms[1], problem.hidden, problem.n_layers,
                                                     problem.n_features)
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
                flops = useful_flops([n_atoms], hidden, n_layers, backward)
                emit(f"    {mode}")
                emit(f"      {'threads':>7} {'reference [ms]':>15} {'fused [ms]':>11} {'speed-up':>9} "
                     f"{'useful GFLOP/s':>15} {'% peak':>7}")
                times = {}
                for k in counts:
                    torch.set_num_threads(k)
                    times[k] = {b: timed(lambda: fn(b), device, repeats) for b in ("reference", "fused")}
                    ref, fused = times[k]["reference"], times[k]["fused"]
                    gflops = flops / fused / 1e9
                    emit(f"      {k:>7} {ref * 1e3:>15.2f} {fused * 1e3:>11.2f} {ref / fused:>8.2f}x "
                         f"{gflops:>15.1f} {100 * gflops / peaks[k]:>6.1f}%")
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
    parser.add_argument("--case", choices=["a", "b", "c", "d", "all"], nargs="+", default=["all"],
                        help="(a) alanine dipeptide, (b) transfer model, (c) batch 1, (d) transfer training step")
    parser.add_argument("--train-batch", type=int, default=32, help="batch of case (d)")
    parser.add_argument("--triton", action="store_true", help="add the Triton rows (tbg.nn.triton.egnn) to (a), (b), (d)")
    parser.add_argument("--sweep", action="store_true",
                        help="time the Triton tile variants (plan.EDGE_SWEEP) on the training steps of (a) and (d)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and batches: check every code path")
    args = parser.parse_args()
    device = args.device
    cuda = torch.device(device).type == "cuda"
    problems = DRY_PROBLEMS if args.dry_run else PROBLEMS
    train_batch = 2 if args.dry_run else args.train_batch
    mm = 512 if args.dry_run else 8192 if cuda else 2048
    peaks = {"fp32": matmul_peak_gflops(device, mm)}
    peaks["tf32"] = matmul_peak_gflops(device, mm, tf32=True) if cuda else peaks["fp32"]
    header = [f"device: {machine(device)}; tbg build {tbg.build_info()['build_type']}",
              f"ceilings (torch.mm {mm}^3, {torch.get_num_threads()} threads): fp32 {peaks['fp32']:.1f} GFLOP/s"
              + (f", TF32 {peaks['tf32']:.1f} GFLOP/s" if cuda else "")]
    print("\n".join(header), flush=True)
    if args.sweep:
        sweep(device, args.repeats, peaks, problems, train_batch)
        return
    cases = {"a", "b", "c", "d"} if "all" in args.case else set(args.case)
    if "a" in cases:
        alanine(device, args.repeats, peaks, problems["ala2"], args.triton)
    if "b" in cases:
        transfer(device, args.repeats, peaks, problems["transfer"], args.triton)
    if "c" in cases:
        batch_one(device, args.repeats, problems)
    if "d" in cases:
        transfer_training(device, args.repeats, peaks, problems["transfer"], train_batch, args.triton)


if __name__ == "__main__":
    main()
