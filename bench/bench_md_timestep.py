"""Does a longer MD time step with hydrogen mass repartitioning (HMR) sample the same ensemble?

Runs alanine dipeptide (amber14 + OBC1, no constraints, Langevin) at the published 0.5 fs and at
longer steps with HMR, and compares what the configurational distribution fixes: the mean and spread
of the potential energy and of the X-H bond lengths (the stiffest coordinates, the first to go wrong
when a step is too long). Errors are block averages (20 blocks). Run: python bench/bench_md_timestep.py
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import openmm
import openmm.unit as u

from tbg.chem import alanine_dipeptide, create_system, kT
from tbg.chem.forcefield import ALANINE_DIPEPTIDE_TEMPERATURE


def _block_error(values: np.ndarray, n_blocks: int = 20) -> float:
    blocks = np.array_split(values, n_blocks)
    means = np.array([b.mean() for b in blocks])
    return float(means.std(ddof=1) / np.sqrt(n_blocks))


def _block_spread_error(lengths: np.ndarray, n_blocks: int = 20) -> float:
    """Block error of the bond-averaged standard deviation of the bond lengths [n, bonds]."""
    per_block = np.array([b.std(0).mean() for b in np.array_split(lengths, n_blocks)])
    return float(per_block.std(ddof=1) / np.sqrt(n_blocks))


def run(timestep_fs: float, hydrogen_mass: float | None, production_ps: float, sample_every_fs: float,
        seed: int) -> dict:
    pep = alanine_dipeptide()
    system = create_system(pep.topology, hydrogen_mass_amu=hydrogen_mass)
    temperature = ALANINE_DIPEPTIDE_TEMPERATURE
    integrator = openmm.LangevinMiddleIntegrator(temperature * u.kelvin, 0.3 / u.picosecond, timestep_fs * u.femtosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    context.setPositions(pep.positions * u.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
    context.setVelocitiesToTemperature(temperature * u.kelvin, seed)
    integrator.step(int(round(20_000 / timestep_fs)))  # 20 ps equilibration
    hydrogens = [(b.atom1.index, b.atom2.index) for b in pep.topology.bonds()
                 if (b.atom1.element.symbol == "H") != (b.atom2.element.symbol == "H")]
    stride = max(1, int(round(sample_every_fs / timestep_fs)))
    n_samples = int(round(production_ps * 1000 / (stride * timestep_fs)))
    energy, lengths = np.empty(n_samples), np.empty((n_samples, len(hydrogens)))
    pairs = np.array(hydrogens)
    t0 = time.perf_counter()
    for k in range(n_samples):
        integrator.step(stride)
        state = context.getState(getEnergy=True, getPositions=True)
        energy[k] = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        x = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
        lengths[k] = np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1)
    wall = time.perf_counter() - t0
    e_kt = energy / kT(temperature)
    return {"timestep_fs": timestep_fs, "hydrogen_mass": hydrogen_mass, "ns_per_day": production_ps * 1e-3 / (wall / 86400),
            "u_mean": e_kt.mean(), "u_err": _block_error(e_kt), "u_std": e_kt.std(),
            "xh_mean_pm": 1e3 * lengths.mean(), "xh_std_pm": 1e3 * lengths.std(0).mean(),
            "xh_std_err_pm": 1e3 * _block_spread_error(lengths)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--production-ps", type=float, default=100.0)
    p.add_argument("--sample-every-fs", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--settings", default="0.5:none,1:3,2:3,2:4,2.5:4",
                   help="comma list of timestep_fs:hydrogen_mass_amu ('none' = no HMR)")
    args = p.parse_args()
    print(f"alanine dipeptide, amber14 + OBC1, no constraints, {ALANINE_DIPEPTIDE_TEMPERATURE} K, "
          f"{args.production_ps} ps per setting after 20 ps equilibration, sampled every {args.sample_every_fs} fs")
    print("| step (fs) | H mass (amu) | ns/day (1 thread) | <U>/kT | std U/kT | X-H mean (pm) | X-H std (pm) |")
    print("|---|---|---|---|---|---|---|")
    for item in args.settings.split(","):
        dt, mass = item.split(":")
        r = run(float(dt), None if mass == "none" else float(mass), args.production_ps, args.sample_every_fs, args.seed)
        print(f"| {r['timestep_fs']} | {r['hydrogen_mass'] or '1.008 (none)'} | {r['ns_per_day']:.0f} | "
              f"{r['u_mean']:.2f} +- {r['u_err']:.2f} | {r['u_std']:.2f} | {r['xh_mean_pm']:.2f} | "
              f"{r['xh_std_pm']:.3f} +- {r['xh_std_err_pm']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
