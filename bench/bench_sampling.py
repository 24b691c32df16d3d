"""End-to-end alanine-dipeptide sampling with exact likelihood: published method vs ours.

(a) published: dopri5 on the augmented state (x, dlogp) with the reference field and the brute-force
    divergence (one backward pass per coordinate, 66 for 22 atoms), as in the published code;
(b) ours, joint: the same augmented ODE with ``EGNN.divergence`` (fused field + exact divergence);
(c) ours, decoupled: dopri5 on x alone, then Gauss-Legendre quadrature of div v at K nodes along the
    solver's dense output (K = 4, 8, 16; with --panels also split over panels, tbg.flow.ode.quadrature_rule).
All methods start from the same latents. Log-likelihood differences are reported against (a) and
against a tight joint solve (ours, atol = rtol = --truth-tol, 1e-6 by default) as the "truth".

The field is a TBG-sized EGNN (H = 64, L = 5, 22 atoms) trained briefly by flow matching on the shipped
alanine-dipeptide frames (a random-init field is nearly zero and makes every solver look cheap); the
model is cached in --model-dir and reused (training resumes if interrupted).

    python bench/bench_sampling.py [--n-samples 64] [--batch 64] [--train-steps 300] [--threads 2]
    python bench/bench_sampling.py --checkpoint tbg/data/models/alanine-dipeptide/model.pt --skip-published \
        --quadrature 6,8,12 --x-tols 1e-4,1e-5      # a trained model: which decoupled settings are accurate

--x-tols repeats (c) with other x-solve tolerances: the augmented solve of (b) controls the error of x and
dlogp together and so takes smaller steps than an x-only solve at the same tolerance.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import machine

import tbg
import tbg.flow
from tbg.flow import MeanFreeGaussian, SolverConfig, decoupled_likelihood, integrate
from tbg.nn.reference import divergence_bruteforce
from tbg.nn.layout import mol_ptr_from_sizes

DATA = Path(__file__).resolve().parents[1] / "tbg" / "data" / "alanine-dipeptide"


class PublishedDynamics:
    """The published likelihood path: reference field, brute-force divergence (x [B, 3N])."""

    def __init__(self, egnn: tbg.EGNN, features: torch.Tensor) -> None:
        self.egnn, self.features = egnn, features
        self.n = features.shape[0]

    def _ragged(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features.repeat(b, 1), mol_ptr_from_sizes([self.n] * b, device=self.features.device)

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.egnn(t, x.reshape(-1, self.n, 3), self.features, backend="reference").reshape(x.shape)

    def divergence(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, ptr = self._ragged(x.shape[0])
        field = lambda xr: self.egnn(t, xr, feats, mol_ptr=ptr, backend="reference")  # noqa: E731
        v, div = divergence_bruteforce(field, x.reshape(-1, 3), ptr)
        return v.reshape(x.shape), div


@dataclass
class Batch:
    x: torch.Tensor
    features: torch.Tensor
    mol_ptr: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.x.to(device), self.features.to(device), self.mol_ptr.to(device))


def load_frames(path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [T, n, 3] (model units, centred) and features [n, F]: from the shipped data through
    tbg.chem (needs mdtraj), or from a file written by --export-data (for machines without mdtraj)."""
    if path is not None:
        d = torch.load(path, weights_only=True)
        return d["positions"], d["features"]
    from tbg.chem.data import PeptideDataset  # noqa: PLC0415 - needs mdtraj

    ds = PeptideDataset(DATA, encoding="atoms")
    return ds.frames_of(ds.names[0]), ds.features[ds.names[0]]


def trained_model(model_dir: Path, steps: int, positions: torch.Tensor, features: torch.Tensor,
                  device: torch.device) -> tbg.EGNN:
    torch.manual_seed(0)
    egnn = tbg.EGNN(features.shape[1], hidden=64, n_layers=5).to(device)
    n = features.shape[0]

    def collate(frames: list[torch.Tensor]) -> Batch:
        return Batch(torch.cat(frames), features.repeat(len(frames), 1), mol_ptr_from_sizes([n] * len(frames)))

    loader = tbg.flow.RaggedLoader(list(positions), 64, collate=collate, drop_last=True)
    cfg = tbg.flow.TrainConfig(n_steps=steps, lr=5e-4, checkpoint_every=50, log_every=50, progress=False)
    res = tbg.flow.train(egnn, loader, model_dir, cfg)
    return tbg.nn.load_egnn(res.model_path).to(device)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="frames/features file from --export-data instead of the shipped data")
    p.add_argument("--export-data", help="write the shipped frames and features to this file and exit")
    p.add_argument("--model-dir", default="/tmp/tbg-bench-sampling-model")
    p.add_argument("--truth-tol", type=float, default=1e-6, help="tolerance of the reference joint solve")
    p.add_argument("--skip-published", action="store_true", help="skip (a), the slowest")
    p.add_argument("--checkpoint", help="sample this trained model (published layout) instead of training one")
    p.add_argument("--quadrature", default="4,8,16", help="Gauss-Legendre node counts of (c), comma-separated")
    p.add_argument("--panels", default="", help="panel boundaries in (0, 1), comma-separated (e.g. 0.1,0.3): (c) "
                   "also runs with the nodes split over these panels")
    p.add_argument("--x-tols", default="1e-4", help="x-solve tolerances of (c), comma-separated")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    positions, features = load_frames(a.data)
    if a.export_data:
        torch.save({"positions": positions, "features": features}, a.export_data)
        return
    n_atoms = features.shape[0]
    device = torch.device(a.device)
    if a.checkpoint:
        egnn, t_train = tbg.nn.load_egnn(a.checkpoint).to(device), 0.0
        origin = a.checkpoint
    else:
        egnn, t_train = timed(lambda: trained_model(Path(a.model_dir), a.train_steps, positions, features, device))
        origin = f"{a.train_steps} flow-matching steps (model ready in {t_train:.1f} s)"
    egnn.eval()
    features = features.to(device)
    print(f"# alanine dipeptide: {n_atoms} atoms, EGNN H={egnn.hidden} L={egnn.n_layers}, {origin}")
    print(f"# machine: {machine(device)}; fused ops on {device.type}: {egnn.fused_available(device)}")
    print(f"# {a.n_samples} samples in batches of {a.batch}, float32, dopri5 atol = rtol = 1e-4 unless stated")

    z = MeanFreeGaussian(n_atoms).sample(a.n_samples, generator=torch.Generator().manual_seed(0)).to(device)
    ours = tbg.nn.BoundDynamics(egnn, features)
    published = PublishedDynamics(egnn, features)
    default = SolverConfig()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(fn) -> tuple[dict, float]:
        xs, ls, nv, nd = [], [], 0, 0
        sync()
        t0 = time.perf_counter()
        for chunk in z.split(a.batch):
            r = fn(chunk)
            xs.append(r.x)
            ls.append(r.dlogp)
            nv, nd = nv + r.nfe_velocity, nd + r.nfe_divergence
        sync()
        secs = time.perf_counter() - t0
        n_chunks = len(xs)
        return {"x": torch.cat(xs), "dlogp": torch.cat(ls), "nfe_v": nv / n_chunks, "nfe_div": nd / n_chunks}, secs

    methods = {}
    if not a.skip_published:
        methods["(a) published: dopri5 + brute-force div, reference"] = lambda c: integrate(published, c, solver=default)
    methods["(b) ours joint: dopri5 + EGNN.divergence"] = lambda c: integrate(ours, c, solver=default)
    panel_sets = [()] + ([tuple(float(v) for v in a.panels.split(","))] if a.panels else [])
    for tol in (float(v) for v in a.x_tols.split(",")):
        for panels in panel_sets:
            for k in (int(v) for v in a.quadrature.split(",")):
                on = f", panels at {','.join(f'{b:g}' for b in panels)}" if panels else ""
                methods[f"(c) ours decoupled: dopri5 x at {tol:g} + GL K={k}{on}"] = (
                    lambda c, k=k, tol=tol, panels=panels: decoupled_likelihood(
                        ours, c, n_nodes=k, solver=SolverConfig(atol=tol, rtol=tol), panels=panels))
    tight = SolverConfig(atol=a.truth_tol, rtol=a.truth_tol)
    truth, t_truth = run(lambda c: integrate(ours, c, solver=tight))
    print(f"# reference 'truth': ours joint, atol = rtol = {a.truth_tol:g}: NFE {truth['nfe_div']:.0f}, "
          f"{t_truth:.1f} s")

    results = {}
    for name, fn in methods.items():
        results[name] = run(fn)
    base = results.get(next(iter(methods)))[0]
    print()
    print("| method | samples/s | speed-up vs first | mean NFE (v / v+div) | |dlogp - truth| mean / max | "
          "|dlogp - first| max | |x - truth| max |")
    print("|---|---|---|---|---|---|---|")
    first_rate = None
    for name, (r, secs) in results.items():
        rate = a.n_samples / secs
        first_rate = first_rate or rate
        err = (r["dlogp"].double() - truth["dlogp"]).abs()
        d_first = (r["dlogp"] - base["dlogp"]).abs().max()
        dx = (r["x"].double() - truth["x"]).abs().max()
        print(f"| {name} | {rate:.3g} | {rate / first_rate:.2f}x | {r['nfe_v']:.0f} / {r['nfe_div']:.0f} | "
              f"{err.mean():.2e} / {err.max():.2e} | {d_first:.2e} | {dx:.2e} |")
    print(f"\n# |dlogp| scale: mean {truth['dlogp'].abs().mean():.1f}")


if __name__ == "__main__":
    main()
