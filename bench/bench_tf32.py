"""Benchmark: what TF32 GEMMs in the GPU divergence path do to the log-likelihood (issue 4, issue 13).

TF32 tensor cores read each fp32 operand with a 10-bit mantissa and accumulate in fp32. On CUDA the
divergence's GEMMs take them when PyTorch's switch is on (``torch.backends.cuda.matmul.allow_tf32 =
True``, or ``torch.set_float32_matmul_precision("high")``): cuBLAS in the batched torch-ops path
(tbg.nn.divergence_torch), tl.dot with input_precision "tf32" in the Triton kernels
(tbg.nn.triton.divergence). This script compares the Gauss-Legendre log-likelihood dlogp = int div v dt
of flow samples, on one fixed solver path per sample, computed in fp64, fp32 and with TF32:

- ``--device cpu``: TF32 emulated on the batched code (every ``F.linear`` operand rounded to TF32, to
  nearest or truncated: the two conversions a GPU may apply), as no CPU has TF32;
- ``--device cuda``: real TF32 on the GPU, for the batched path (cuBLAS) and the Triton kernels (against
  the fp64 batched path; the EGNN field kernels use no tensor cores, so TF32 changes the divergence only).

    python bench/bench_tf32.py [--checkpoint RUN/model.pt] [--n 64] [--nodes 8] [--device cpu]
    python bench/bench_tf32.py --checkpoint RUN/model.pt --save-features RUN/features.pt  # for a GPU box

RUN is a `tbg train` folder for alanine dipeptide. Without --checkpoint the script first trains one,
`tbg train --out bench_tf32_run --steps 400 --batch-size 128` (about 2.5 min on a 2-core CPU; a rerun
reuses the folder). The atom features come from the shipped PDB (OpenMM), or from --features where
OpenMM is missing (the GPU image): write them with --save-features and carry RUN along.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as fn
from common import machine
from torchdiffeq import odeint

import tbg
from tbg.flow import MeanFreeGaussian, SolverConfig
from tbg.flow.ode import gauss_legendre
from tbg.nn import divergence_torch
from tbg.nn.checkpoint import load_egnn, save_published


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


def divergence(egnn: tbg.EGNN, features: torch.Tensor, t: float, x: torch.Tensor, impl: str = "batched"
               ) -> torch.Tensor:
    """div v [B] at x [B, 3N] by the batched implementation or the Triton kernels (fixed layout as a
    ragged batch)."""
    b, n = x.shape[0], features.shape[0]
    ptr = torch.arange(b + 1, device=x.device) * n
    t_atoms = torch.full((b * n, 1), t, dtype=x.dtype, device=x.device)
    h0 = egnn.embed(t_atoms, features.to(x).repeat(b, 1))
    chunk = divergence_torch.default_tangent_chunk(ptr, egnn.hidden)
    args = (x.reshape(-1, 3).contiguous(), h0, ptr, *egnn.stacked_weights(), egnn.layer_range, chunk)
    if impl == "triton":
        from tbg.nn.triton import divergence as TD  # noqa: PLC0415 - optional (Triton)
        return TD.egnn_divergence(*args)[1]
    return divergence_torch.egnn_divergence(*args)[1]


def atom_features(n_classes: int) -> torch.Tensor:
    """The alanine-dipeptide encoding from the shipped PDB (needs OpenMM)."""
    import openmm.app  # noqa: PLC0415 - not on every machine (--features instead)

    from tbg.chem import ALANINE_DIPEPTIDE_DIR  # noqa: PLC0415
    from tbg.chem.encoding import encode_atoms  # noqa: PLC0415

    topology = openmm.app.PDBFile(str(next(ALANINE_DIPEPTIDE_DIR.glob("*-traj-state0.pdb")))).topology
    return encode_atoms(topology, n_classes=n_classes).float()


def trained_checkpoint() -> Path:
    from tbg.cli import main as tbg_main  # noqa: PLC0415 - training needs the chemistry stack

    run = Path("bench_tf32_run")
    if tbg_main(["train", "--out", str(run), "--steps", "400", "--batch-size", "128", "--device", "cpu",
                 "--no-progress"]) != 0:
        raise SystemExit("training the model failed")
    return run / "model.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="alanine-dipeptide model.pt (ours or published; default: train one, see above)")
    ap.add_argument("--features", type=Path, default=None, help="atom features saved by --save-features")
    ap.add_argument("--save-features", type=Path, default=None, help="write the atom features here and exit")
    ap.add_argument("--n", type=int, default=64, help="flow samples")
    ap.add_argument("--nodes", type=int, default=8, help="Gauss-Legendre nodes of the dlogp integral")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dry-run", action="store_true",
                    help="an untrained small model, 2 samples, 2 nodes, with the Triton row on CPU too (needs "
                         "TRITON_INTERPRET=1): checks the script, measures nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(machine(dev))
    if args.dry_run:
        args.n, args.nodes = 2, 2
        args.checkpoint = Path(tempfile.mkdtemp()) / "model.pt"
        save_published(args.checkpoint, tbg.EGNN(4, 16, 2))
        features = torch.randn(6, 4)
    elif args.checkpoint is None:
        args.checkpoint = trained_checkpoint()
    egnn = load_egnn(args.checkpoint).float().eval().to(dev)
    if not args.dry_run:
        features = torch.load(args.features) if args.features else atom_features(egnn.n_features)
    if args.save_features:
        torch.save(features, args.save_features)
        print(f"wrote {args.save_features}")
        return
    features = features.to(dev)
    dyn = tbg.BoundDynamics(egnn, features)
    z = MeanFreeGaussian(features.shape[0]).sample(args.n, generator=torch.Generator().manual_seed(0)).to(dev)
    nodes, weights = gauss_legendre(args.nodes, 0.0, 1.0)
    ts = torch.tensor(np.concatenate([[0.0], nodes]), dtype=torch.float32, device=dev)
    # (name, implementation, TF32 switch, CPU emulation mode), each against fp64 batched
    if dev.type == "cpu":
        rows = [("fp32", "batched", False, None), ("tf32 nearest", "batched", False, "nearest"),
                ("tf32 truncated", "batched", False, "truncate")] + (
                    [("fp32 triton", "triton", False, None)] if args.dry_run else [])
    else:
        rows = [("fp32 batched", "batched", False, None), ("tf32 batched", "batched", True, None),
                ("fp32 triton", "triton", False, None), ("tf32 triton", "triton", True, None)]
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        path = odeint(dyn, z, ts, **SolverConfig("dopri5", atol=1e-4, rtol=1e-4).odeint_kwargs(0.0, 1.0))[1:]
        egnn64 = load_egnn(args.checkpoint).double().eval().to(dev)
        dlogp: dict[str, torch.Tensor] = {}
        for name, model, impl, tf32, mode in [("fp64", egnn64, "batched", False, None)] + [
                (name, egnn, impl, tf32, mode) for name, impl, tf32, mode in rows]:
            total = torch.zeros(args.n, dtype=torch.float64, device=dev)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for k, t in enumerate(nodes):
                x = path[k].to(next(model.parameters()).dtype)
                if mode is None:
                    div = divergence(model, features, float(t), x, impl)
                else:
                    with TF32Linear(mode):
                        div = divergence(model, features, float(t), x, impl)
                total += float(weights[k]) * div.double()
            dlogp[name] = total.cpu()
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    ref = dlogp["fp64"]
    print(f"\nalanine dipeptide, {egnn.hidden=} {egnn.n_layers=}, {args.n} samples, {args.nodes} Gauss-Legendre nodes, "
          f"{dev.type}; dlogp (fp64): mean {ref.mean():.2f}, std {ref.std():.2f} nats")
    # A shift common to all samples cancels in self-normalised weights; its spread does not.
    print(f"{'divergence GEMMs':<16}{'mean |d dlogp|':>16}{'max |d dlogp|':>15}{'std d dlogp':>13}"
          f"{'max / std(dlogp)':>18}")
    for name, *_ in rows:
        err = dlogp[name] - ref
        print(f"{name:<16}{err.abs().mean():>16.2e}{err.abs().max():>15.2e}{err.std():>13.2e}"
              f"{err.abs().max() / ref.std():>18.2e}")


if __name__ == "__main__":
    main()
