"""GPU check of the CUDA kernels of tbg::egnn_forward / tbg::egnn_backward against the reference.

Calls the ops directly (no Python autograd layer needed) on fresh random inputs and weights, with
the caching allocator poisoned with NaN before every call so unwritten outputs show, and compares
with tbg.nn.reference (egnn_displacement + remove_mean, gradients by torch.autograd) in float64:
  fp64 kernels: max relative error (norm-wise) <= 1e-10;  fp32 kernels: <= 1e-5 (1e-4 for L >= 5),
  or, where the random stack amplifies rounding beyond that, <= 3x the fp32 reference's own error.
Then times reference vs fused (vector field; forward + backward) at the published sizes with peak
memory. Usage: python bench/cuda_smoke.py [--check-only | --bench-only]
"""
from __future__ import annotations

import argparse
import time

import torch

import tbg
from tbg.nn import reference
from tbg.nn.layout import mol_ptr_from_sizes, ragged_edges

DEV = torch.device("cuda")
PROFILE = False  # --profile: per-kernel GPU times of one fused forward + backward


def random_egnn(hidden: int, n_layers: int, dtype: torch.dtype) -> tbg.EGNN:
    model = tbg.EGNN(4, hidden, n_layers).to(device=DEV, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    return model


def poison() -> None:
    """Fill the allocator's free blocks with NaN so outputs the kernels never write show up."""
    free = torch.cuda.mem_get_info()[0]
    n = min(free // 4, 256 << 20) // 4
    torch.empty(n, device=DEV).fill_(float("nan"))


def reference_vf(model: tbg.EGNN, x: torch.Tensor, h0: torch.Tensor, mol_ptr: torch.Tensor) -> torch.Tensor:
    row, col = ragged_edges(mol_ptr)
    return reference.remove_mean(reference.egnn_displacement(model, h0, x, row, col), mol_ptr)


def stacked_grads(model: tbg.EGNN, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The gradients of model's parameters, stacked like model.stacked_weights()."""
    g = random_egnn(model.hidden, model.n_layers, grads[0].dtype)
    with torch.no_grad():
        for p, gp in zip(g.parameters(), grads):
            p.copy_(gp)
    return g.stacked_weights()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)).item()


NAMES = ["x", "h0", "w1", "b1", "w2", "b2", "watt", "batt", "wc1", "bc1", "wc2", "wn1", "bn1", "wn2", "bn2"]


def check_case(sizes: list[int], hidden: int, n_layers: int, dtype: torch.dtype) -> float:
    model64 = random_egnn(hidden, n_layers, torch.float64)
    mol_ptr = mol_ptr_from_sizes(sizes, DEV)
    m = int(sum(sizes))
    x64 = torch.randn(m, 3, device=DEV, dtype=torch.float64) * 2
    h64 = torch.randn(m, hidden, device=DEV, dtype=torch.float64)
    gv64 = torch.randn(m, 3, device=DEV, dtype=torch.float64)
    params = list(model64.parameters())
    xr, hr = x64.clone().requires_grad_(), h64.clone().requires_grad_()
    v_ref = reference_vf(model64, xr, hr, mol_ptr)
    g_ref = torch.autograd.grad(v_ref, [xr, hr] + params, gv64, allow_unused=True)
    g_ref = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_ref, [xr, hr] + params)]
    ref_grads = (g_ref[0], g_ref[1]) + stacked_grads(model64, tuple(g_ref[2:]))

    w = tuple(t.to(dtype) for t in model64.stacked_weights())
    x, h0, gv = x64.to(dtype), h64.to(dtype), gv64.to(dtype)
    poison()
    v, hs, xs = torch.ops.tbg.egnn_forward(x, h0, mol_ptr, *w, model64.layer_range)
    poison()
    grads = torch.ops.tbg.egnn_backward(gv, x, h0, mol_ptr, *w, hs, xs, model64.layer_range)
    torch.cuda.synchronize()
    errs = {"v": rel(v, v_ref)} | {f"d{n}": rel(g, r) for n, g, r in zip(NAMES, grads, ref_grads)}
    worst = max(errs.values())
    tol = 1e-10 if dtype == torch.float64 else (1e-4 if n_layers >= 5 else 1e-5)
    # fp32: a badly conditioned random stack can amplify rounding beyond tol; then the kernels must
    # stay within 3x of the reference's own fp32 error (each quantity separately).
    limits = {k: tol for k in errs}
    if dtype == torch.float32 and worst > tol:
        model32 = random_egnn(hidden, n_layers, dtype)
        with torch.no_grad():
            for p32, p64 in zip(model32.parameters(), params):
                p32.copy_(p64)
        x32, h32 = x.clone().requires_grad_(), h0.clone().requires_grad_()
        v32 = reference_vf(model32, x32, h32, mol_ptr)
        g32 = torch.autograd.grad(v32, [x32, h32] + list(model32.parameters()), gv, allow_unused=True)
        g32 = [g if g is not None else torch.zeros_like(q) for g, q in zip(g32, [x32, h32] + list(model32.parameters()))]
        ref32 = (v32, g32[0], g32[1]) + stacked_grads(model32, tuple(g32[2:]))
        limits = {k: max(tol, 3 * rel(r32, r)) for k, r32, r in zip(errs, ref32, (v_ref,) + tuple(ref_grads))}
    bad = {k: f"{e:.1e}>{limits[k]:.1e}" for k, e in errs.items() if not e <= limits[k]}
    status = "FAIL" if bad else "ok"
    worst = worst if not bad else float("inf")
    print(f"{status:4s} {str(dtype)[6:]:8s} H={hidden:3d} L={n_layers} sizes={sizes if len(sizes) < 8 else str(sizes[:6]) + '...'}"
          f" worst={worst:.2e} {bad if bad else ''}", flush=True)
    return worst


def run_checks() -> bool:
    torch.manual_seed(0)
    ok = True
    cases = [
        ([22], 64, 2), ([1], 32, 2), ([2], 32, 2), ([3], 48, 2), ([21, 22, 33], 48, 3), ([51], 100, 2),
        ([64], 128, 2), ([128], 64, 1), ([5, 1, 17, 0, 40], 100, 2), ([], 32, 2), ([0, 0], 32, 1),
        ([22] * 4, 256, 1), ([20, 35, 51, 27], 128, 2), ([22] * 3, 64, 5),
    ]
    for dtype in (torch.float64, torch.float32):
        for sizes, hidden, n_layers in cases:
            if sizes and all(s == 0 for s in sizes):
                continue
            if not sizes:  # batch 0: only the shapes can be checked
                model = random_egnn(hidden, n_layers, dtype)
                x = torch.empty(0, 3, device=DEV, dtype=dtype)
                v, hs, xs = torch.ops.tbg.egnn_forward(x, torch.empty(0, hidden, device=DEV, dtype=dtype),
                                                       mol_ptr_from_sizes([], DEV), *model.stacked_weights(),
                                                       model.layer_range)
                good = v.shape == (0, 3) and hs.shape == (n_layers, 0, hidden)
                print(f"{'ok' if good else 'FAIL':4s} {str(dtype)[6:]:8s} batch 0", flush=True)
                ok &= good
                continue
            ok &= check_case(sizes, hidden, n_layers, dtype) != float("inf")
    return ok


def timed(fn, reps: int = 20) -> tuple[float, float]:
    """Median milliseconds and peak memory (MiB above the baseline) of fn()."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[len(times) // 2], peak


def edge_flops(sizes: list[int], hidden: int, n_layers: int) -> tuple[float, float]:
    """FLOPs of the per-edge H x H products: forward (2 GEMMs), forward + backward (2 + 7)."""
    edges = sum(n * (n - 1) for n in sizes)
    per = 2.0 * hidden * hidden * edges * n_layers
    return 2 * per, 9 * per


def bench_case(name: str, sizes: list[int], pad_to: int | None, hidden: int, n_layers: int) -> None:
    dtype = torch.float32
    model = random_egnn(hidden, n_layers, dtype)
    mol_ptr = mol_ptr_from_sizes(sizes, DEV)
    m = sum(sizes)
    x = torch.randn(m, 3, device=DEV, dtype=dtype) * 2
    h0 = torch.randn(m, hidden, device=DEV, dtype=dtype)
    gv = torch.randn(m, 3, device=DEV, dtype=dtype)
    w = model.stacked_weights()
    # Reference as published: padded to pad_to atoms with masks (or fixed size).
    n_pad = pad_to or sizes[0]
    b = len(sizes)
    xp = torch.zeros(b, n_pad, 3, device=DEV, dtype=dtype)
    hp = torch.zeros(b, n_pad, hidden, device=DEV, dtype=dtype)
    mask = torch.zeros(b, n_pad, device=DEV, dtype=dtype)
    for i, (s, e) in enumerate(zip(mol_ptr[:-1].tolist(), mol_ptr[1:].tolist())):
        xp[i, : e - s], hp[i, : e - s], mask[i, : e - s] = x[s:e], h0[s:e], 1
    pptr = torch.arange(b + 1, device=DEV) * n_pad
    row, col = ragged_edges(pptr)
    nm = mask.reshape(-1, 1)
    em = nm[row] * nm[col] if pad_to else None
    nm = nm if pad_to else None
    xf, hf = xp.reshape(-1, 3), hp.reshape(-1, hidden)

    def ref_vf():
        with torch.no_grad():
            return reference.remove_mean(reference.egnn_displacement(model, hf, xf, row, col, em, nm), pptr, nm)

    def ref_train():
        xx = xf.clone().requires_grad_()
        hh = hf.clone().requires_grad_()
        v = reference.remove_mean(reference.egnn_displacement(model, hh, xx, row, col, em, nm), pptr, nm)
        torch.autograd.grad(v, [xx, hh] + list(model.parameters()), torch.randn_like(v), allow_unused=True)

    def fused_vf():
        return torch.ops.tbg.egnn_forward(x, h0, mol_ptr, *w, model.layer_range)[0]

    def fused_train():
        v, hs, xs = torch.ops.tbg.egnn_forward(x, h0, mol_ptr, *w, model.layer_range)
        torch.ops.tbg.egnn_backward(gv, x, h0, mol_ptr, *w, hs, xs, model.layer_range)

    if PROFILE:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
        fused_train()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fused_train()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    f_fwd, f_train = edge_flops(sizes, hidden, n_layers)
    print(f"\n{name}: B={b} atoms={m} (reference padded to {n_pad}), H={hidden}, L={n_layers}, fp32, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'':24s}{'ref ms':>9s}{'fused ms':>10s}{'speedup':>9s}{'ref MiB':>9s}{'fused MiB':>10s}{'mem x':>7s}"
          f"{'fused edge TFLOP/s':>20s}")
    for label, rf, ff, flops in (("vector field", ref_vf, fused_vf, f_fwd),
                                 ("forward+backward", ref_train, fused_train, f_train)):
        rt, rm = timed(rf)
        ft, fm = timed(ff)
        print(f"{label:24s}{rt:9.3f}{ft:10.3f}{rt / ft:8.2f}x{rm:9.1f}{fm:10.1f}{rm / max(fm, 1e-9):6.1f}x"
              f"{flops / ft / 1e9:20.2f}", flush=True)


def fp32_peak() -> float:
    a = torch.randn(8192, 8192, device=DEV)
    torch.backends.cuda.matmul.allow_tf32 = False
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def run_bench() -> None:
    print(f"\ntorch.mm fp32 (no TF32) 8192^3: {fp32_peak():.1f} TFLOP/s (practical FMA ceiling)")
    bench_case("alanine dipeptide", [22] * 256, None, 64, 5)
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(20, 52, (400,), generator=g).tolist()
    bench_case("transfer (400 dipeptides, 20-51 atoms)", sizes, 51, 128, 9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    print(tbg.build_info())
    ok = True
    if not args.bench_only:
        ok = run_checks()
        print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED", flush=True)
    if not args.check_only:
        run_bench()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
