"""Benchmark: what TF32 GEMMs in the GPU divergence path would do to the log-likelihood (issue 4).

On CUDA, tbg::egnn_divergence runs tbg.nn.divergence_torch, whose GEMMs are cuBLAS calls: with
``torch.backends.cuda.matmul.allow_tf32 = True`` (or ``torch.set_float32_matmul_precision("high")``)
they run on TF32 tensor cores, which read each fp32 operand with a 10-bit mantissa and accumulate in
fp32. This script measures the effect of that rounding without a GPU: it runs the same batched code on
the CPU with every ``F.linear`` operand rounded to TF32 (to nearest, and truncated, the two conversions
a GPU may apply) and compares the Gauss-Legendre log-likelihood dlogp = int div v dt of flow samples
with the plain fp32 and the fp64 ones, on one fixed solver path per sample (the EGNN field kernels do
not use tensor cores, so TF32 changes the divergence only).

    python bench/bench_tf32.py [--checkpoint RUN/model.pt] [--n 64] [--nodes 8]

RUN is a `tbg train` folder for alanine dipeptide. Without --checkpoint the script first trains one,
`tbg train --out bench_tf32_run --steps 400 --batch-size 128` (about 2.5 min on a 2-core CPU; a rerun
reuses the folder).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import openmm.app
import torch
import torch.nn.functional as fn
from common import machine
from torchdiffeq import odeint

import tbg
from tbg.chem import ALANINE_DIPEPTIDE_DIR
from tbg.chem.encoding import encode_atoms
from tbg.cli import main as tbg_main
from tbg.flow import MeanFreeGaussian, SolverConfig
from tbg.flow.ode import gauss_legendre
from tbg.nn import divergence_torch
from tbg.nn.checkpoint import load_egnn


def to_tf32(t: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 values with the mantissa cut to TF32's 10 bits (to nearest, ties away; or truncated)."""
    bits = t.contiguous().view(torch.int32)
    if mode == "nearest":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


class TF32Linear(torch.overrides.TorchFunctionMode):
    """Rounds both operands of every F.linear (the batched path's GEMMs) to TF32."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is fn.linear:
            x, w, *rest = args
            args = (to_tf32(x, self.mode), to_tf32(w, self.mode), *rest)
        return func(*args, **kwargs)


def divergence(egnn: tbg.EGNN, features: torch.Tensor, t: float, x: torch.Tensor) -> torch.Tensor:
    """div v [B] at x [B, 3N] by the batched implementation (fixed layout as a ragged batch)."""
    b, n = x.shape[0], features.shape[0]
    ptr = torch.arange(b + 1) * n
    t_atoms = torch.full((b * n, 1), t, dtype=x.dtype)
    h0 = egnn.embed(t_atoms, features.to(x.dtype).repeat(b, 1))
    chunk = divergence_torch.default_tangent_chunk(ptr, egnn.hidden)
    _, div = divergence_torch.egnn_divergence(x.reshape(-1, 3).contiguous(), h0, ptr, *egnn.stacked_weights(),
                                                egnn.layer_range, chunk)
    return div


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="alanine-dipeptide model.pt (ours or published; default: train one, see above)")
    ap.add_argument("--n", type=int, default=64, help="flow samples")
    ap.add_argument("--nodes", type=int, default=8, help="Gauss-Legendre nodes of the dlogp integral")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine("cpu"))
    if args.checkpoint is None:
        run = Path("bench_tf32_run")
        if tbg_main(["train", "--out", str(run), "--steps", "400", "--batch-size", "128", "--device", "cpu",
                     "--no-progress"]) != 0:
            raise SystemExit("training the model failed")
        args.checkpoint = run / "model.pt"
    egnn = load_egnn(args.checkpoint).float().eval()
    topology = openmm.app.PDBFile(str(next(ALANINE_DIPEPTIDE_DIR.glob("*-traj-state0.pdb")))).topology
    features = encode_atoms(topology, n_classes=egnn.n_features).float()
    dyn = tbg.BoundDynamics(egnn, features)
    z = MeanFreeGaussian(features.shape[0]).sample(args.n, generator=torch.Generator().manual_seed(0))
    nodes, weights = gauss_legendre(args.nodes, 0.0, 1.0)
    ts = torch.tensor(np.concatenate([[0.0], nodes]), dtype=torch.float32)
    with torch.no_grad():
        path = odeint(dyn, z, ts, **SolverConfig("dopri5", atol=1e-4, rtol=1e-4).odeint_kwargs(0.0, 1.0))[1:]
        egnn64 = load_egnn(args.checkpoint).double().eval()
        dlogp: dict[str, torch.Tensor] = {}
        for name, model, mode in [("fp64", egnn64, None), ("fp32", egnn, None), ("tf32 nearest", egnn, "nearest"),
                                  ("tf32 truncated", egnn, "truncate")]:
            total = torch.zeros(args.n, dtype=torch.float64)
            for k, t in enumerate(nodes):
                x = path[k].to(next(model.parameters()).dtype)
                if mode is None:
                    div = divergence(model, features, float(t), x)
                else:
                    with TF32Linear(mode):
                        div = divergence(model, features, float(t), x)
                total += float(weights[k]) * div.double()
            dlogp[name] = total
    ref = dlogp["fp64"]
    print(f"\nalanine dipeptide, {egnn.hidden=} {egnn.n_layers=}, {args.n} samples, {args.nodes} Gauss-Legendre nodes; "
          f"dlogp (fp64): mean {ref.mean():.2f}, std {ref.std():.2f} nats")
    # A shift common to all samples cancels in self-normalised weights; its spread does not.
    print(f"{'divergence GEMMs':<16}{'mean |d dlogp|':>16}{'max |d dlogp|':>15}{'std d dlogp':>13}"
          f"{'max / std(dlogp)':>18}")
    for name in ("fp32", "tf32 nearest", "tf32 truncated"):
        err = dlogp[name] - ref
        print(f"{name:<16}{err.abs().mean():>16.2e}{err.abs().max():>15.2e}{err.std():>13.2e}"
              f"{err.abs().max() / ref.std():>18.2e}")


if __name__ == "__main__":
    main()
