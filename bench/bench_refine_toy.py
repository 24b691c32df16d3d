"""Refinement schemes on a toy with a known answer: plain IS, resample-move SMC, annealed SMC, independence MH.

Target: the 2-D two-Gaussian mixture of tests/refine_toy.py (normalised, so log Z = 0; E[x1] = 0.8,
P(x1 > 0) = 0.7); proposal: the deliberately wrong Gaussian "flow" there (exact log q, free to sample).
Each scheme runs over several seeds; the table gives the evaluations per run (energies, with or without
forces, and flow likelihoods), the root-mean-square error of E[x1] and P(x1 > 0) over the seeds, and the
mean energy-W2 and point-set W2 (Euclidean, 2000-point subsamples) against exact samples of the target.
"Plain IS (same energies)" spends the largest scheme's energy budget on more proposals instead.

This is a sanity check of the machinery, not the measurement on a molecule: here proposals and log q
cost nothing, while for the flow each likelihood evaluation costs a backward solve.

    python bench/bench_refine_toy.py [--seeds 10] [--n 4000]
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from refine_toy import EXACT, MODE_P, MODE_STD, MODES, GaussianProposal, mixture_energy, observables  # noqa: E402

from tbg.evaluate.metrics import energy_w2, point_set_w2  # noqa: E402
from tbg.flow.refine import AutogradPotential, MCMCConfig, SMCConfig, independence_metropolis, smc  # noqa: E402


def exact_samples(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    mode = torch.multinomial(MODE_P, n, replacement=True, generator=g)
    return MODES[mode] + MODE_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--n", type=int, default=4000)
    a = p.parse_args()
    torch.set_num_threads(1)
    q, potential, n = GaussianProposal(), AutogradPotential(mixture_energy), a.n
    rows: dict[str, list[dict[str, float]]] = {}

    def record(name: str, x: torch.Tensor, log_w: torch.Tensor | None, costs: dict[str, float], ref: torch.Tensor,
               seconds: float) -> None:
        w = None if log_w is None else torch.softmax(log_w, 0)
        obs = observables(x)
        est = {k: float(v.mean() if w is None else (w * v).sum()) for k, v in obs.items()}
        lw = None if log_w is None else log_w.numpy()
        rows.setdefault(name, []).append({
            **{f"err {k}": est[k] - EXACT[k] for k in ("x1", "x1>0")},
            "energy_w2": energy_w2(mixture_energy(ref).numpy(), mixture_energy(x).numpy(), lw),
            "w2": point_set_w2(x.numpy(), ref.numpy(), lw, max_points=2000, seed=0),
            "energies": costs.get("energy_evaluations", 0), "likelihoods": costs.get("likelihood_evaluations", 0),
            "seconds": seconds})

    for seed in range(a.seeds):
        ref = exact_samples(n, seed)
        x = q.sample(n, seed)
        log_q = q.log_prob(x)
        u = mixture_energy(x)
        record("plain IS", x, -u - log_q, {"energy_evaluations": n}, ref, 0.0)
        budgets = []
        for name, schedule in (("SMC resample-move", "resample_move"), ("SMC annealed", "adaptive")):
            t = time.perf_counter()
            r = smc(potential, x, log_q=log_q, density=q,
                    config=SMCConfig(schedule=schedule, n_moves=5, step_size=0.1, seed=seed))
            record(name, r.x, r.log_w, r.costs.as_dict(), ref, time.perf_counter() - t)
            budgets.append(r.costs.energy_evaluations)
        t = time.perf_counter()
        m = independence_metropolis(log_q, u, samples=x, potential=potential, density=q,
                                    config=MCMCConfig(n_chains=40, burn_in=10, local_steps=2, step_size=0.1, seed=seed))
        costs = m.costs.as_dict()
        costs["energy_evaluations"] += n  # the proposals' energies, given to it
        record("IMH + 2 MALA", m.states.reshape(-1, 2), None, costs, ref, time.perf_counter() - t)
        big = max(budgets)
        xb = q.sample(big, 50_000 + seed)
        record("plain IS (same energies)", xb, -mixture_energy(xb) - q.log_prob(xb), {"energy_evaluations": big}, ref,
               0.0)

    print(f"# {platform.node()} | torch {torch.__version__} | 1 thread | {a.seeds} seeds, n = {n}")
    print("| scheme | energies | likelihoods | RMSE E[x1] | RMSE P(x1>0) | energy-W2 | W2 | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        col = {k: np.array([r[k] for r in rs]) for k in rs[0]}
        print(f"| {name} | {col['energies'].mean():.0f} | {col['likelihoods'].mean():.0f} | "
              f"{math.sqrt(np.mean(col['err x1'] ** 2)):.3f} | {math.sqrt(np.mean(col['err x1>0'] ** 2)):.4f} | "
              f"{col['energy_w2'].mean():.3f} | {col['w2'].mean():.3f} | {col['seconds'].mean():.2f} |")


if __name__ == "__main__":
    main()
