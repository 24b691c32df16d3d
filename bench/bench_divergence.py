"""Benchmark: vector field + exact divergence per second, fused op vs the two reference estimators.

Side by side in one run, for alanine dipeptide (N = 22, H = 64, L = 5) and dipeptides (H = 128, L = 9,
sizes drawn from 20..51):
  fused      tbg::egnn_divergence (ragged; forward-mode tangents, chunked): on CPU the C++ kernel, on
             CUDA the batched torch-ops implementation (there "fused" and "batched" are one code)
  batched    tbg.nn.divergence_torch called directly (the same algorithm as one large op per step
             over the whole batch, GEMMs in BLAS / cuBLAS), with its own default chunk
  published  one autograd backward pass per coordinate on the reference; for dipeptides on the batch
             padded to 51 atoms with node/edge masks (3 * 51 = 153 passes), as the published code does
  vmap(jvp)  torch.vmap over torch.func.jvp with the 3 n_max unit tangents on the ragged reference
Reports samples/s (fused: median of --repeats after a warm-up; the two slow baselines: one call, each
a long loop of passes), ratios, peak memory per method (see common.measure), the fused op's FLOP count
and its achieved rate against a measured large-torch.mm peak.

Gradient case (--grad-batch, alanine dipeptide): div and its backward pass w.r.t. the parameters and x,
as training through the likelihood needs, by EGNN.divergence with grad on: backend="auto" (autograd
through the batched code) vs backend="reference" (autograd through vmap(jvp) over the reference), for
the exact trace and for Hutchinson with --probes probes.

    python bench/bench_divergence.py [--batch 64] [--dip-batch 8] [--grad-batch 16] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from common import machine, matmul_peak_gflops, measure

import tbg
from tbg.nn import divergence_torch, ops, reference
from tbg.nn.layout import mol_ptr_from_sizes, molecule_index, ragged_edges


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


def run_case(name: str, model: tbg.EGNN, sizes: list[int], n_pad: int | None, device: str, repeats: int,
             chunk: int | None) -> dict:
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
        res["batched"] = measure(
            lambda: divergence_torch.egnn_divergence(x, h0, ptr, *weights, model.layer_range, batched_chunk),
            device, repeats)
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

        res["published"] = measure(lambda: reference.divergence_bruteforce(padded_field, xp, flat_ptr), device, 1,
                                   warmup=0)
    div_f = res["fused"][2][1]
    for key in ("published", "vmap(jvp)", "batched"):
        div_r = res[key][2][1]
        err = ((div_f - div_r).abs().max() / div_r.abs().max().clamp(min=1)).item()
        res[key] = (*res[key][:2], err)
    res["flops"] = fused_flops(sizes, model.hidden, model.n_layers, chunk)
    res["chunk"] = chunk
    return res


def report(name: str, sizes: list[int], res: dict, peak: float | None) -> None:
    b = len(sizes)
    fused_s = res["fused"][0]
    print(f"\n{name}: batch {b}, atoms {min(sizes)}..{max(sizes)} (mean {sum(sizes) / b:.1f}), "
          f"tangent_chunk {res['chunk']}")
    print(f"{'method':<12}{'seconds':>10}{'samples/s':>12}{'fused speedup':>15}{'peak MiB':>10}{'rel err':>10}")
    for key in ("fused", "batched", "published", "vmap(jvp)"):
        s, mem = res[key][:2]
        err = "" if key == "fused" else f"{res[key][2]:.1e}"
        print(f"{key:<12}{s:>10.3f}{b / s:>12.2f}{s / fused_s:>15.1f}{mem:>10.1f}{err:>10}")
    gf = res["flops"] / fused_s / 1e9
    line = f"fused: {res['flops'] / 1e9:.1f} GFLOP (GEMM work), {gf:.1f} GFLOP/s"
    if peak:
        line += f" = {100 * gf / peak:.0f}% of the measured mm peak {peak:.0f} GFLOP/s"
    print(line)


def run_gradient_case(model: tbg.EGNN, batch: int, n_probes: int, device: str, repeats: int) -> None:
    n = 22
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, n, 3, generator=gen) * 3).to(device)
    f = torch.randn(n, model.n_features, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)
    print(f"\ngradient of div w.r.t. parameters and x, alanine dipeptide (H=64, L=5), batch {batch}")
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak_gflops(args.device)
    print(f"{machine(args.device)}; mm peak {peak:.0f} GFLOP/s fp32")
    if "ala2" not in args.skip:
        model = tbg.EGNN(22, 64, 5).to(args.device)
        sizes = [22] * args.batch
        report("alanine dipeptide (H=64, L=5)", sizes,
               run_case("ala2", model, sizes, None, args.device, args.repeats, args.chunk), peak)
    if "dipeptides" not in args.skip:
        model = tbg.EGNN(76, 128, 9).to(args.device)
        sizes = torch.randint(20, 52, (args.dip_batch,), generator=torch.Generator().manual_seed(1)).tolist()
        report("dipeptides (H=128, L=9; published padded to 51, fused ragged)", sizes,
               run_case("dip", model, sizes, 51, args.device, args.repeats, args.chunk), peak)
    if "gradient" not in args.skip:
        run_gradient_case(tbg.EGNN(22, 64, 5).to(args.device), args.grad_batch, args.probes, args.device, args.repeats)


if __name__ == "__main__":
    main()
