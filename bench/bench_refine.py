"""Refinement against plain importance sampling on a trained model at matched energy budgets.

From one checkpoint of a molecule with MD data (default: the shipped alanine-dipeptide data):

1. sample B = n (1 + moves) flow samples with exact likelihood (`tbg sample`'s job; resumed from --out);
2. refine the first n with SMC resample-move (n particles, `moves` MALA moves: n (1 + moves) energy and
   force evaluations) and independence MH (the same n proposals, --chains chains: n energies), and with
   annealed SMC when --adaptive is given (its own energy and likelihood counts);
3. evaluate every method against the MD frames (`tbg evaluate`: validity, energies, the field's metrics):
   IS on the first n samples (the refinements' proposals), IS on all B samples (SMC resample-move's energy
   budget spent on more flow samples instead), and each refinement.

The table gives per method the flow samples it needs (each one a likelihood integration), the energy and
flow-likelihood evaluations, the wall time (sampling time per sample x samples + refinement), the ESS
(Kish; SMC with its distinct ancestors; MCMC by autocorrelation), energy-W2 and dF - MD of each basin, and
the cost per effective sample (wall seconds / ESS, counting at most one per distinct flow sample behind the
SMC particles or visited by the chains). ESS numbers
are not comparable across kinds (Kish counts duplicated SMC particles); the distances to MD are. One run,
one seed: differences within the error bars mean nothing.

    python bench/bench_refine.py --checkpoint RUN [--n 500] [--moves 5] [--chains 10] [--adaptive]
        [--data DIR] [--out bench-refine] [--device cpu] [--md-frames 2000]
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from common import machine

from tbg.chem.data import ALANINE_DIPEPTIDE_DIR
from tbg.chem.forcefield import platform_for_device
from tbg.chem.trajectory import find_md_data
from tbg.evaluate import EvaluationOptions
from tbg.evaluate.runs import evaluate_samples_file
from tbg.flow import SampleConfig, SolverConfig
from tbg.flow.refine import MCMCConfig, SMCConfig
from tbg.flow.refine.runs import RefineOptions, refine_samples
from tbg.flow.runs import SamplingOptions, find_run_model, sample_checkpoint

NEEDS_ARGUMENTS = True  # it measures a checkpoint the caller names: `tbg bench` runs it by name only


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a `tbg train` folder or .pt file")
    p.add_argument("--data", default=str(ALANINE_DIPEPTIDE_DIR), help="MD data of the model's molecule")
    p.add_argument("--out", default="bench-refine", help="work folder (rerunning resumes every stage)")
    p.add_argument("--n", type=int, default=500, help="particles / proposals of the refinements")
    p.add_argument("--moves", type=int, default=5, help="MALA moves of SMC resample-move")
    p.add_argument("--chains", type=int, default=10, help="chains of independence MH")
    p.add_argument("--adaptive", action="store_true", help="also annealed SMC (one backward solve per move)")
    p.add_argument("--device", default="cpu", help="torch device of sampling and the flow's density")
    p.add_argument("--md-frames", type=int, default=2000)
    p.add_argument("--likelihood", default="decoupled", choices=["decoupled", "joint"])
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol of sampling")
    p.add_argument("--quadrature", type=int, default=8)
    p.add_argument("--batch", type=int, default=250, help="samples per sampling chunk")
    return p.parse_args()


def main() -> None:
    a = parse()
    out = Path(a.out)
    checkpoint, topology = find_run_model(Path(a.checkpoint))
    md = find_md_data([a.data])[0]
    budget = a.n * (1 + a.moves)
    sampling = SamplingOptions(SampleConfig(n_samples=budget, batch_size=a.batch, likelihood=a.likelihood,
                                            solver=SolverConfig(method="dopri5", atol=a.tol, rtol=a.tol),
                                            n_quadrature=a.quadrature, device=a.device, progress=False),
                               trajectory_formats=())
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    samples = sample_checkpoint(checkpoint, topology or md.write_topology_pdb(out / "md-topology.pdb"),
                                out / "sample", sampling)
    timing = out / "sampling_time.json"  # a rerun finds the samples on disk: keep the first run's time
    if not timing.is_file():
        timing.write_text(json.dumps({"seconds": time.perf_counter() - t, "samples": budget}))
    per_sample_s = json.loads(timing.read_text())["seconds"] / budget
    with np.load(samples) as f:
        arrays = {k: f[k] for k in ("samples", "prior_energy", "dlogp")}
        nfe = f["nfe_per_chunk"]
    first = out / "sample-first-n"
    first.mkdir(parents=True, exist_ok=True)
    np.savez(first / "samples.npz", **{k: v[: a.n] for k, v in arrays.items()})

    platform = platform_for_device(a.device, fallback=True)
    runs = {"resample-move": RefineOptions(SMCConfig(schedule="resample_move", n_moves=a.moves),
                                           MCMCConfig(n_chains=a.chains, burn_in=min(10, a.n // a.chains // 4)),
                                           particles=a.n, device=a.device, progress=False, trajectory_formats=())}
    if a.adaptive:
        runs["adaptive"] = RefineOptions(SMCConfig(schedule="adaptive", n_moves=a.moves), None, particles=a.n,
                                         device=a.device, progress=False, trajectory_formats=())
    options = EvaluationOptions(n_bootstrap=200, w2_points=1000)
    reports = {}
    for name, refine in runs.items():
        refine_samples(out / "sample", out / f"refine-{name}", refine, platform=platform)
        reports[name] = evaluate_samples_file(out / f"refine-{name}", md, out / f"eval-{name}", options,
                                              md_frames=a.md_frames, platform=platform)[0]
    reports["first n"] = evaluate_samples_file(first / "samples.npz", md, out / "eval-first-n", options,
                                               md_frames=a.md_frames, platform=platform)[0]

    big, small = reports["resample-move"], reports["first n"]
    basins = list(big["delta_f"])
    rows = [(f"IS ({a.n} flow samples)", small["methods"]["IS"], a.n, {"energy_evaluations": a.n}),
            (f"IS ({budget} flow samples)", big["methods"]["IS"], budget, {"energy_evaluations": budget})]
    for report in (reports[k] for k in runs):
        rows += [(name, m, a.n, m["costs"]) for name, m in report["methods"].items() if m["kind"] in ("SMC", "MCMC")]

    print(f"# {machine(a.device)}")
    print(f"# python bench/bench_refine.py {shlex.join(sys.argv[1:])}")
    print(f"# checkpoint {checkpoint}; {budget} flow samples ({a.likelihood}, dopri5 {a.tol:g}, mean NFE per chunk "
          f"{nfe[:, 0].mean():.0f}/{nfe[:, 1].mean():.0f}): {per_sample_s:.3g} s per sample; MD: "
          f"{big['md_n_frames']} frames, dF of MD: " + ", ".join(
              f"{k} {_pm(big['delta_f'][k]['MD'])}" for k in basins))
    print("| method | flow samples | energies | flow likelihoods | wall s | ESS | energy-W2 [kT] | "
          + " | ".join(f"dF {k} - MD [kT]" for k in basins) + " | s per effective sample |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(basins) + "---|")
    for name, m, flow, costs in rows:
        wall = flow * per_sample_s + costs.get("wall_time_s", 0.0)
        ess = m["ess"]
        n_eff = None if ess is None else ess["effective_samples"]
        distinct = m.get("unique_ancestors", m.get("n_unique"))  # SMC ancestors, MCMC proposals visited
        if n_eff is not None and distinct is not None:  # copies of one flow sample add nothing
            n_eff = min(n_eff, distinct)
        ess_text = "-" if ess is None else f"{ess['effective_samples']:.1f} ({ess['kind']}" + (
            f"; {distinct} distinct)" if distinct is not None else ")")
        dfs = [_pm((m["delta_f"].get(k) or {}).get("minus_md")) for k in basins]
        print(f"| {name} | {flow} | {costs.get('energy_evaluations', 0):.0f} | "
              f"{costs.get('likelihood_evaluations', 0):.0f} | {wall:.1f} | {ess_text} | {_num(m['energy']['w2'])} | "
              + " | ".join(dfs) + f" | {wall / n_eff if n_eff else math.nan:.3g} |")
    (out / "bench_refine.json").write_text(json.dumps({k: r["methods"] for k, r in reports.items()}, indent=1,
                                                      default=str))


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _pm(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "-"
    return f"{e['value']:+.2f} +- " + ("-" if e.get("stderr") is None else f"{e['stderr']:.2f}")


if __name__ == "__main__":
    main()
