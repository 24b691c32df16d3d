"""Benchmark: MD throughput (ns/day) and energy-evaluation throughput (configurations/s).

These bound how fast data generation and reweighting (u(x) of every flow sample) can go. MD: OpenMM
LangevinMiddleIntegrator, amber14 + OBC1, CutoffNonPeriodic 2 nm, at the published settings (0.5 fs, no
constraints) and at 2 fs with HBonds (used for the shipped demo set), CPU platform with 1 and 2 threads,
for alanine dipeptide (22 atoms) and the 51-atom dipeptide WW. Energies: ``EnergyModel`` (one context
reused, optional spawned worker pool) against a naive loop that creates a fresh OpenMM context per
configuration, side by side as a ratio.

    python bench/bench_chem.py [--md-steps 2000] [--n-configs 400] [--workers 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import openmm
import openmm.unit as u
from common import machine, matmul_peak_gflops

import tbg.chem as chem


def md_ns_per_day(pep: chem.Peptide, *, timestep_fs: float, constraints: str | None, threads: int,
                  steps: int) -> float:
    system = chem.create_system(pep.topology, constraints=constraints)
    integ = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 0.3 / u.picosecond, timestep_fs * u.femtoseconds)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": str(threads)})
    ctx.setPositions(pep.positions * u.nanometer)
    ctx.setVelocitiesToTemperature(300 * u.kelvin, 1)
    integ.step(200)  # warm-up
    t0 = time.perf_counter()
    integ.step(steps)
    dt = time.perf_counter() - t0
    return steps * timestep_fs * 1e-6 / (dt / 86400.0)


def naive_energies(pep: chem.Peptide, x: np.ndarray, kt: float) -> np.ndarray:
    """What a straightforward loop does: build a context for every configuration."""
    system = chem.create_system(pep.topology)
    out = []
    for xi in x:
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
        ctx.setPositions(xi * u.nanometer)
        out.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) / kt)
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md-steps", type=int, default=2000)
    ap.add_argument("--n-configs", type=int, default=400)
    ap.add_argument("--n-naive", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {machine()}; OpenMM {openmm.__version__}; "
          f"torch.mm fp32 peak here now: {matmul_peak_gflops():.1f} GFLOP/s")
    peptides = [chem.alanine_dipeptide(), chem.build_peptide("WW")]

    print("\nMD throughput (CPU platform), ns/day")
    print(f"{'peptide':8} {'atoms':>5} {'0.5 fs, 1 thr':>14} {'0.5 fs, 2 thr':>14} {'2 fs HBonds, 1 thr':>19}")
    for pep in peptides:
        r = [md_ns_per_day(pep, timestep_fs=0.5, constraints=None, threads=t, steps=args.md_steps) for t in (1, 2)]
        r.append(md_ns_per_day(pep, timestep_fs=2.0, constraints="hbonds", threads=1, steps=args.md_steps // 2))
        print(f"{pep.name:8} {pep.n_atoms:5d} {r[0]:14.1f} {r[1]:14.1f} {r[2]:19.1f}")

    print("\nEnergy evaluation u(x), configurations/s (CPU platform)")
    print(f"{'peptide':8} {'atoms':>5} {'naive (context per x)':>22} {'EnergyModel 1':>14} "
          f"{f'EnergyModel {args.workers} workers':>22} {'ratio 1/naive':>14} {'ratio n/1':>10} {'pairs/s':>10}")
    rng = np.random.default_rng(0)
    for pep in peptides:
        x = pep.positions[None] + rng.normal(0, 0.005, (args.n_configs, pep.n_atoms, 3))
        with chem.EnergyModel(pep, platform="CPU") as one:
            one.reduced_energy(x[:10], unit="nm")
            t0 = time.perf_counter()
            u1 = one.reduced_energy(x, unit="nm")
            r1 = len(x) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            un = naive_energies(pep, x[: args.n_naive], one.kT)
            rn = args.n_naive / (time.perf_counter() - t0)
            np.testing.assert_allclose(un, u1[: args.n_naive], rtol=1e-5)
        with chem.EnergyModel(pep, platform="CPU", n_workers=args.workers) as pool:
            pool.reduced_energy(x[:10], unit="nm")  # spawn + context creation outside the timing
            t0 = time.perf_counter()
            up = pool.reduced_energy(x, unit="nm")
            rp = len(x) / (time.perf_counter() - t0)
            np.testing.assert_allclose(up, u1, rtol=1e-5)
        pairs = pep.n_atoms * (pep.n_atoms - 1) / 2
        print(f"{pep.name:8} {pep.n_atoms:5d} {rn:22.0f} {r1:14.0f} {rp:22.0f} {r1 / rn:14.1f} {rp / r1:10.2f} "
              f"{r1 * pairs:10.2e}")


if __name__ == "__main__":
    main()
