"""Benchmark: vector field + exact divergence per second, fused op vs the two reference estimators.

Side by side in one run, for alanine dipeptide (N = 22, H = 64, L = 5) and dipeptides (H = 128, L = 9,
sizes drawn from 20..51):
  fused      tbg::egnn_divergence through the dispatcher (ragged; forward-mode tangents, chunked): on CPU
             the C++ kernel, on CUDA what `tbg info` names (batched torch ops, or Triton with TBG_TRITON)
  batched    tbg.nn.divergence_torch called directly (the same algorithm as one large op per step
             over the whole batch, GEMMs in BLAS / cuBLAS), with its own default chunk
  triton     (--triton) the Triton kernels (tbg.nn.triton.divergence) called directly, float32 dots in
             IEEE precision; on CUDA also "triton tf32" (TF32 tensor cores, PyTorch's TF32 switch on)
  published  one autograd backward pass per coordinate on the reference; for dipeptides on the batch
             padded to 51 atoms with node/edge masks (3 * 51 = 153 passes), as the published code does
  vmap(jvp)  torch.vmap over torch.func.jvp with the 3 n_max unit tangents on the ragged reference
Reports samples/s (fast methods: median of --repeats after a warm-up; the two slow baselines: one call,
each a long loop of passes), speed-ups over the published estimator and the batched code, peak memory
per method (see common.measure), each method's error against the published estimate, the fused op's
FLOP rate against a measured large-torch.mm peak, and for Triton its useful TFLOP/s (tbg.nn.triton.plan)
against the float32 and TF32 torch.mm ceilings measured in the same run.

Gradient case (--grad-batch, alanine dipeptide): div and its backward pass w.r.t. the parameters and x,
as training through the likelihood needs, by EGNN.divergence with grad on: backend="auto" (autograd
through the batched code) vs backend="reference" (autograd through vmap(jvp) over the reference), for
the exact trace and for Hutchinson with --probes probes.

--dry-run: tiny models and batches, every code path once (on CPU the Triton kernels need
TRITON_INTERPRET=1 in the environment), to check the script before a GPU is spent on it.

    python bench/bench_divergence.py [--batch 64] [--dip-batch 8] [--grad-batch 16] [--threads 2] [--device cpu]
                                     [--triton] [--dry-run]
"""
from __future__ import annotations

import argparse

import torch
from common import machine, matmul_peak_gflops, measure

import tbg
from tbg.nn import dispatch, divergence_torch, ops, reference
from tbg.nn.layout import mol_ptr_from_sizes, molecule_index, ragged_edges
from tbg.nn.triton import plan


def fused_flops(sizes: list[int], hidden: int, n_layers: int, chunk: int) -> float:
    """Multiply-add FLOPs of tbg::egnn_divergence (GEMM work; elementwise work not counted)."""
    h2, total = 2.0 * hidden * hidden, 0.0
    for n in sizes:
        if n < 2:
            continue
        e, tangents = n * (n - 1), 3 * n
        rows = 2 * (n - 1) + (n_layers - 2) * e + (n - 1) if n_layers > 1 else n - 1  # edge rows per tangent
        node = (n_layers - 1) * 5 * n  # node-side H x H products per tangent (Wn1 halves, Wn2, W1 halves)
        primal = n_layers * (2 * e + 7 * n)  # per work item (recomputed per tangent chunk)
        total += h2 * (tangents * (2 * rows + node) + -(-tangents // chunk) * primal)
    return total


def _triton_divergence(tf32: bool):
    """The Triton implementation called directly, with PyTorch's TF32 switch set for the call."""
    from tbg.nn.triton import divergence as TD  # noqa: PLC0415 - optional (Triton), imported when asked for

    def call(*args):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return TD.egnn_divergence(*args)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return call


def run_sweep(name: str, model: tbg.EGNN, sizes: list[int], device: str, repeats: int, chunk: int | None) -> None:
    """Time the Triton kernels with each tile variant of tbg.nn.triton.plan.SWEEP (float32, IEEE and, on a
    GPU, TF32)."""
    from tbg.nn.triton import divergence as TD  # noqa: PLC0415 - optional (Triton)

    gen = torch.Generator().manual_seed(0)
    ptr = mol_ptr_from_sizes(torch.tensor(sizes), device=device)
    x = (torch.randn(int(ptr[-1]), 3, generator=gen) * 3).to(device)
    f = torch.randn(x.shape[0], model.n_features, generator=gen).to(device)
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, generator=gen).to(device), f)
        weights = model.stacked_weights()
    chunk = chunk or ops.default_tangent_chunk(ptr, model.hidden)
    print(f"\n{name}: Triton tile variants (default {plan.default_blocks(model.hidden)})")
    print(f"{'tangents':>9}{'senders':>8}{'warps':>6}{'stages':>7}{'executed/useful':>16}{'ieee ms':>10}{'TFLOP/s':>9}"
          f"{'tf32 ms':>10}{'TFLOP/s':>9}")
    for blocks in plan.SWEEP:
        cost = plan.cost(sizes, model.hidden, model.n_layers, tangent_chunk=chunk, blocks=blocks)
        cells = []
        for tf32 in (False, True):
            if tf32 and torch.device(device).type != "cuda":
                cells.append(f"{'-':>10}{'-':>9}")
                continue
            call = _triton_divergence(tf32)
            try:
                with TD.use_blocks(blocks), torch.no_grad():
                    seconds = measure(lambda: call(x, h0, ptr, *weights, model.layer_range, chunk), device,
                                      repeats)[0]
                cells.append(f"{seconds * 1e3:>10.2f}{cost.useful_flops / seconds / 1e12:>9.2f}")
            except Exception as err:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                cells.append(f"{'failed: ' + type(err).__name__:>19}")
        print(f"{blocks.tangents:>9}{blocks.senders:>8}{blocks.warps:>6}{blocks.stages:>7}"
              f"{cost.executed_flops / cost.useful_flops:>16.2f}{''.join(cells)}", flush=True)


def run_case(name: str, model: tbg.EGNN, sizes: list[int], n_pad: int | None, device: str, repeats: int,
             chunk: int | None, triton: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    ptr = mol_ptr_from_sizes(torch.tensor(sizes), device=device)
    m = int(ptr[-1])
    x = (torch.randn(m, 3, generator=gen) * 3).to(device)
    f = torch.randn(m, model.n_features, generator=gen).to(device)
    t = torch.rand(len(sizes), generator=gen).to(device)
    with torch.no_grad():
        h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f)
        weights = model.stacked_weights()
    chunk = chunk or ops.default_tangent_chunk(ptr, model.hidden)
    res: dict = {}
    with torch.no_grad():
        res["fused"] = measure(lambda: ops.egnn_divergence(x, h0, ptr, weights, model.layer_range, chunk), device,
                               repeats)
        batched_chunk = divergence_torch.default_tangent_chunk(ptr, model.hidden)
        res["batched"] = measure(lambda: divergence_torch.egnn_divergence(x, h0, ptr, *weights, model.layer_range, batched_chunk),
                                 device, repeats)
        if triton:
            for key, tf32 in (("triton", False), ("triton tf32", True)):
                if tf32 and torch.device(device).type != "cuda":
                    continue  # TF32 is a GPU mode
                call = _triton_divergence(tf32)
                res[key] = measure(lambda: call(x, h0, ptr, *weights, model.layer_range, chunk), device, repeats)
    field = reference.egnn_field(model, h0, ptr)
    with torch.no_grad():
        res["vmap(jvp)"] = measure(lambda: reference.divergence_vmap_jvp(field, x, ptr, chunk_size=32), device, 1,
                                   warmup=0)
    if n_pad is None:
        res["published"] = measure(lambda: reference.divergence_bruteforce(field, x, ptr), device, 1, warmup=0)
    else:  # the published padded batch: every molecule padded to n_pad atoms, masks on nodes and edges
        b = len(sizes)
        mask = (torch.arange(n_pad, device=device) < torch.tensor(sizes, device=device).unsqueeze(1))
        flat_mask = mask.reshape(-1, 1).to(x.dtype)
        flat_ptr = torch.arange(b + 1, device=device) * n_pad
        xp = torch.zeros(b * n_pad, 3, dtype=x.dtype, device=device)
        xp[mask.reshape(-1)] = x
        h0p = torch.zeros(b * n_pad, h0.shape[1], dtype=x.dtype, device=device)
        h0p[mask.reshape(-1)] = h0
        row, col = ragged_edges(flat_ptr)
        edge_mask = flat_mask[row] * flat_mask[col]

        def padded_field(y: torch.Tensor) -> torch.Tensor:
            dx = reference.egnn_displacement(model, h0p, y, row, col, edge_mask, flat_mask)
            return reference.remove_mean(dx, flat_ptr, flat_mask)

        res["published"] = measure(lambda: reference.divergence_bruteforce(padded_field, xp, flat_ptr), device, 1, warmup=0)
    div_pub = res["published"][2][1]
    for key in [k for k in res if k != "published"]:
        div_r = res[key][2][1]
        err = ((div_r - div_pub).abs().max() / div_pub.abs().max().clamp(min=1)).item()
        res[key] = (*res[key][:2], err)
    res["published"] = (*res["published"][:2], 0.0)
    res["flops"] = fused_flops(sizes, model.hidden, model.n_layers, chunk)
    if triton:
        res["triton cost"] = plan.cost(sizes, model.hidden, model.n_layers, tangent_chunk=chunk)
    res["chunk"] = chunk
    return res


def report(name: str, short: str, sizes: list[int], res: dict, peaks: dict[str, float], device: str) -> None:
    """Print the case's table, then one line per Triton column starting with `short` (useful FLOPs of
    tbg.nn.triton.plan; gpu_check.sh collects these lines)."""
    b = len(sizes)
    fused_name = next(i.name for i in dispatch.implementations() if i.op == "egnn_divergence"
                      and i.device == torch.device(device).type)
    print(f"\n{name}: batch {b}, atoms {min(sizes)}..{max(sizes)} (mean {sum(sizes) / b:.1f}), "
          f"tangent_chunk {res['chunk']}; fused = {fused_name}")
    pub_s, bat_s = res["published"][0], res["batched"][0]
    print(f"{'method':<12}{'seconds':>10}{'samples/s':>12}{'vs published':>14}{'vs batched':>12}{'peak MiB':>10}"
          f"{'rel err':>10}")
    methods = [k for k in ("fused", "batched", "triton", "triton tf32", "published", "vmap(jvp)") if k in res]
    for key in methods:
        s, mem, err = res[key]
        print(f"{key:<12}{s:>10.4f}{b / s:>12.2f}{pub_s / s:>13.1f}x{bat_s / s:>11.2f}x{mem:>10.1f}{err:>10.1e}")
    gf = res["flops"] / res["fused"][0] / 1e9
    print(f"fused: {res['flops'] / 1e9:.1f} GFLOP (the C++ kernel's GEMM count), {gf:.1f} GFLOP/s = "
          f"{100 * gf / peaks['fp32']:.0f}% of the measured fp32 mm peak {peaks['fp32']:.0f} GFLOP/s")
    cost = res.get("triton cost")
    for key, ceiling in (("triton", "fp32"), ("triton tf32", "tf32")):
        if key not in res:
            continue
        rate = cost.useful_flops / res[key][0] / 1e12
        print(f"{short} {key}: {res[key][0] * 1e3:.2f} ms, {pub_s / res[key][0]:.1f}x published, "
              f"{bat_s / res[key][0]:.2f}x batched, {rate:.2f} TFLOP/s = {100e3 * rate / peaks[ceiling]:.0f}% "
              f"{ceiling} mm, err {res[key][2]:.0e}")
    if cost is not None:
        print(f"triton cost: {cost.useful_flops / 1e9:.1f} GFLOP useful, executed / useful "
              f"{cost.executed_flops / cost.useful_flops:.2f}, tangent state traffic {cost.state_bytes / 2**20:.0f} "
              f"MiB, {cost.useful_flops / cost.state_bytes:.0f} useful FLOP per state byte")


def run_gradient_case(model: tbg.EGNN, n: int, batch: int, n_probes: int, device: str, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, n, 3, generator=gen) * 3).to(device)
    f = torch.randn(n, model.n_features, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)
    print(f"\ngradient of div w.r.t. parameters and x, {n} atoms (H={model.hidden}, L={model.n_layers}), batch {batch}")
    print(f"{'estimator':<16}{'reference s':>12}{'batched s':>11}{'speed-up':>10}{'ref MiB':>9}{'batched MiB':>13}"
          f"{'max grad diff':>15}")
    for method, kw in (("exact", {}), (f"hutchinson K={n_probes}", {"method": "hutchinson", "n_probes": n_probes})):
        res = {}
        for backend in ("reference", "auto"):
            def step() -> torch.Tensor:
                model.zero_grad(set_to_none=True)
                xg = x.clone().requires_grad_(True)
                _, div = model.divergence(t, xg, f, backend=backend, generator=torch.Generator(device).manual_seed(1),
                                          **kw)
                div.sum().backward()
                return torch.cat([xg.grad.reshape(-1)] + [p.grad.reshape(-1) for p in model.parameters()
                                                          if p.grad is not None and p.grad.abs().max() > 0])
            res[backend] = measure(step, device, repeats)
        (s_ref, m_ref, g_ref), (s_b, m_b, g_b) = res["reference"], res["auto"]
        diff = ((g_b - g_ref).abs().max() / g_ref.abs().max()).item() if g_b.shape == g_ref.shape else float("nan")
        print(f"{method:<16}{s_ref:>12.3f}{s_b:>11.3f}{s_ref / s_b:>10.2f}{m_ref:>9.0f}{m_b:>13.0f}{diff:>15.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="alanine dipeptide batch")
    ap.add_argument("--dip-batch", type=int, default=8, help="dipeptide batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="tangent_chunk (default: by memory)")
    ap.add_argument("--grad-batch", type=int, default=16, help="alanine dipeptide batch of the gradient case")
    ap.add_argument("--probes", type=int, default=4, help="Hutchinson probes of the gradient case")
    ap.add_argument("--skip", choices=["ala2", "dipeptides", "gradient"], nargs="*", default=[])
    ap.add_argument("--triton", action="store_true", help="add the Triton kernels (tbg.nn.triton.divergence)")
    ap.add_argument("--sweep", action="store_true",
                    help="time the Triton tile variants (tbg.nn.triton.plan.SWEEP) instead of comparing methods")
    ap.add_argument("--dry-run", action="store_true", help="tiny models and batches: check every code path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = torch.device(args.device).type == "cuda"
    mm = 8192 if cuda and not args.dry_run else 512 if args.dry_run else 2048
    peaks = {"fp32": matmul_peak_gflops(args.device, mm)}
    peaks["tf32"] = matmul_peak_gflops(args.device, mm, tf32=True) if cuda else peaks["fp32"]
    print(f"{machine(args.device)}; mm peak {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['tf32']:.0f} GFLOP/s with TF32 "
          f"(torch.mm {mm}^3)")
    # Published sizes, or (dry run) small ones that keep every code path.
    ala2 = (22, 64, 5, 22) if not args.dry_run else (6, 16, 3, 5)       # features, H, L, atoms
    dip = (76, 128, 9, (20, 52)) if not args.dry_run else (8, 16, 3, (3, 7))
    if "ala2" not in args.skip:
        model = tbg.EGNN(ala2[0], ala2[1], ala2[2]).to(args.device)
        sizes = [ala2[3]] * args.batch
        if args.sweep:
            run_sweep("alanine dipeptide", model, sizes, args.device, args.repeats, args.chunk)
        else:
            res = run_case("ala2", model, sizes, None, args.device, args.repeats, args.chunk, args.triton)
            report(f"alanine dipeptide (H={ala2[1]}, L={ala2[2]})", "ala2", sizes, res, peaks, args.device)
    if "dipeptides" not in args.skip:
        model = tbg.EGNN(dip[0], dip[1], dip[2]).to(args.device)
        sizes = torch.randint(*dip[3], (args.dip_batch,), generator=torch.Generator().manual_seed(1)).tolist()
        n_pad = max(sizes) if args.dry_run else 51
        if args.sweep:
            run_sweep("dipeptides", model, sizes, args.device, args.repeats, args.chunk)
        else:
            res = run_case("dip", model, sizes, n_pad, args.device, args.repeats, args.chunk, args.triton)
            report(f"dipeptides (H={dip[1]}, L={dip[2]}; published padded to {n_pad})", "dipeptides", sizes, res,
                   peaks, args.device)
    if "gradient" not in args.skip and not args.sweep:
        run_gradient_case(tbg.EGNN(ala2[0], ala2[1], ala2[2]).to(args.device), ala2[3], args.grad_batch, args.probes,
                          args.device, args.repeats)


if __name__ == "__main__":
    main()
