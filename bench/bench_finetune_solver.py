"""How faithful is the solve that energy fine-tuning differentiates through?

`tbg finetune` backpropagates through a fixed-step solve (rk4, --ode-steps, optionally --ode-panels), but
the model is then sampled with an accurate adaptive solve. Whatever the fixed-step solve gets wrong is
part of the objective it minimises: a fine-tuned field can fit the error of its own discretisation
instead of the flow. This script draws latents, solves each one with every requested fixed-step grid and
with dopri5 at a tight tolerance (both with the exact divergence, float64), and reports per grid the
error of the log importance weight log w = -u(x) + prior_energy(z) + dlogp (the fine-tuning's per-sample
loss, up to sign and a constant), split into its likelihood and energy parts, and the correlation of the
two log-weights over the latents.

    python bench/bench_finetune_solver.py --checkpoint tbg/data/models/alanine-dipeptide \
        [--n 24] [--seed 5] [--grids 8 8@0.1,0.3 12@0.1,0.3 16 16@0.1,0.3] [--threads 2]

A grid is STEPS (equal steps over [0, 1]) or STEPS@T1,T2,... (the steps shared evenly over the panels cut
at those times, `tbg.flow.ode.step_grid`).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from tbg.chem.energy import EnergyModel
from tbg.flow import SolverConfig
from tbg.flow.ode import integrate
from tbg.flow.prior import MeanFreeGaussian
from tbg.flow.runs import checkpoint_dynamics, find_run_model, molecule_topology

NEEDS_ARGUMENTS = True  # it measures a checkpoint the caller names: `tbg bench` runs it by name only


def parse_grid(spec: str) -> SolverConfig:
    steps, _, panels = spec.partition("@")
    return SolverConfig(method="rk4", n_steps=int(steps),
                        panels=tuple(float(b) for b in panels.split(",")) if panels else ())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a `tbg train` / `tbg finetune` folder or .pt file")
    p.add_argument("--n", type=int, default=24, help="latents")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--grids", nargs="+", default=["8", "8@0.1,0.3", "12@0.1,0.3", "16", "16@0.1,0.3"])
    p.add_argument("--tol", type=float, default=1e-7, help="dopri5 atol = rtol of the reference solve")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    grids = {spec: parse_grid(spec) for spec in a.grids}
    model, topology = find_run_model(Path(a.checkpoint))
    if topology is None:
        sys.exit(f"{a.checkpoint}: no topology.pdb beside the model")
    dyn = checkpoint_dynamics(model, topology, dtype=torch.float64)
    n_atoms = dyn.features.shape[0]
    energy = EnergyModel(molecule_topology(topology))
    prior = MeanFreeGaussian(n_atoms)
    z = prior.sample(a.n, generator=torch.Generator().manual_seed(a.seed), dtype=torch.float64)

    def log_weights(solver: SolverConfig) -> tuple[np.ndarray, np.ndarray, float]:
        start = time.perf_counter()
        res = integrate(dyn, z, solver=solver)
        u = energy.torch_reduced_energy(res.x).double()
        return (u.numpy(), res.dlogp.numpy(), time.perf_counter() - start)

    u_ref, l_ref, t_ref = log_weights(SolverConfig(atol=a.tol, rtol=a.tol))
    lw_ref = -u_ref + prior.energy(z).numpy() + l_ref
    print(f"# {machine()}")
    print(f"# python {' '.join(shlex.quote(x) for x in sys.argv)}")
    print(f"# {model}: {a.n} latents (seed {a.seed}); reference dopri5 {a.tol:g} ({t_ref:.0f} s): mean u - dlogp "
          f"{np.mean(u_ref - l_ref):.2f} nats, log-w std {lw_ref.std(ddof=1):.2f}")
    print("| rk4 grid | evaluations | log-w error mean | log-w error std | dlogp error mean | energy error mean | "
          "corr(log w, reference) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, solver in grids.items():
        u, lgp, secs = log_weights(solver)
        err = (-u + lgp) - (-u_ref + l_ref)
        corr = np.corrcoef(-u + prior.energy(z).numpy() + lgp, lw_ref)[0, 1]
        print(f"| {spec} | {4 * solver.n_steps} | {err.mean():+.2f} | {err.std(ddof=1):.2f} | "
              f"{np.mean(lgp - l_ref):+.2f} | {np.mean(u - u_ref):+.2f} | {corr:.3f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
