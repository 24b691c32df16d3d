"""MD data generation with OpenMM in the published layout, resumable.

Per peptide ``name`` in ``out_dir``:
- ``{name}-traj-state0.pdb``   topology and minimised starting positions (published layout)
- ``{name}-traj-arrays.npz``   ``positions`` [frames, atoms, 3] in nm and ``step`` [frames] (published layout)
- ``{name}-traj-checkpoint.npz`` frames so far + the serialised OpenMM State (positions, velocities, step)
  + the settings; the source of truth when a run resumes
- ``{name}-traj-info.json``    settings, frames, wall time and ns/day
Every file is written to a temporary name and moved into place with os.replace, the checkpoint before the
arrays, so an interrupted run never leaves a torn file and resumes exactly after its last saved frame.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import logging
import math
import multiprocessing as mp
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
from tqdm.auto import tqdm

from tbg.chem.forcefield import (ALANINE_DIPEPTIDE_TEMPERATURE, DEFAULT_FORCEFIELD_FILES, DIPEPTIDE_TEMPERATURE,
                                 create_system, platform as pick_platform, platform_properties)
from tbg.chem.peptides import Peptide, alanine_dipeptide, build_peptide
from tbg.chem.trajectory import layout_files
from tbg.errors import InputError
from tbg.runfolder import exclusive

logger = logging.getLogger("tbg")

# Settings that must agree between a checkpoint and the call that resumes it.
_RESUME_KEYS = ("frame_interval_steps", "timestep_fs", "friction_per_ps", "temperature", "seed", "constraints",
                "hydrogen_mass_amu", "forcefield_files", "n_atoms")


def resolve_peptide(peptide: Peptide | str) -> Peptide:
    """A Peptide from a Peptide, "ala2" (alanine dipeptide) or a sequence ("AY": zwitterionic)."""
    if isinstance(peptide, Peptide):
        return peptide
    if not isinstance(peptide, str):
        raise TypeError(f"expected a Peptide or a sequence string, got {type(peptide).__name__}")
    return alanine_dipeptide() if peptide == "ala2" else build_peptide(peptide)


def paths(out_dir: str | Path, name: str) -> dict[str, Path]:
    return layout_files(out_dir, name)


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(file object)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _seed(seed: int, *salt: int) -> int:
    """Positive 31-bit seed for OpenMM (0 would mean 'pick a random seed')."""
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0] % (2**31 - 2)) + 1


def simulate(peptide: Peptide | str, out_dir: str | Path, *, n_frames: int, frame_interval_steps: int = 10000,
             timestep_fs: float = 0.5, friction_per_ps: float = 0.3, temperature: float | None = None,
             seed: int = 0, equilibration_steps: int = 20000, platform: openmm.Platform | str | None = None,
             checkpoint_every_frames: int = 100, constraints: str | None = None,
             hydrogen_mass_amu: float | None = None, forcefield_files: Sequence[str] = DEFAULT_FORCEFIELD_FILES,
             threads: int | None = None, dtype: type = np.float32, progress: bool = True,
             record: Callable[[], None] | None = None) -> Path:
    """Langevin MD (LangevinMiddleIntegrator) of ``peptide``; returns the path of the arrays file.

    Defaults are the published settings: 0.5 fs, friction 0.3/ps, frames every 10000 steps (5 ps), no
    constraints, 310 K (300 K for capped peptides such as alanine dipeptide). The run minimises, draws
    velocities, equilibrates for ``equilibration_steps`` and then writes ``n_frames`` frames; calling again
    with the same settings resumes after the last checkpointed frame (or extends to a larger ``n_frames``);
    other settings, or fewer frames than on disk, are refused (InputError) before anything is written.
    ``hydrogen_mass_amu`` repartitions hydrogen masses (see ``tbg.chem.create_system``): the sampled
    configurational distribution is unchanged, and without constraints it allows 4x the published time
    step (measured for alanine dipeptide in the shipped data's README). While it runs, the molecule's files
    in ``out_dir`` are locked against other processes (``tbg.runfolder.exclusive``); ``record()``, if
    given, is called once the run is known to go ahead.
    """
    if n_frames < 1 or frame_interval_steps < 1 or checkpoint_every_frames < 1 or equilibration_steps < 0:
        raise InputError(f"n_frames ({n_frames}), frame_interval_steps ({frame_interval_steps}) and "
                         f"checkpoint_every_frames ({checkpoint_every_frames}) must be >= 1 and equilibration_steps "
                         f"({equilibration_steps}) >= 0")
    if not (math.isfinite(timestep_fs) and timestep_fs > 0):
        raise InputError(f"the time step must be a positive number of fs, got {timestep_fs}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"the temperature must be a positive number of K, got {temperature}")
    if not (math.isfinite(friction_per_ps) and friction_per_ps >= 0):
        raise InputError(f"the friction must be a number >= 0 per ps, got {friction_per_ps}")
    out = Path(out_dir)
    name = peptide if isinstance(peptide, str) else peptide.name
    files = paths(out, name)
    if files["checkpoint"].exists() and files["pdb"].exists():
        try:
            topology = app.PDBFile(str(files["pdb"])).topology
        except Exception as err:  # noqa: BLE001 - OpenMM's reader fails in many ways on a broken file
            raise InputError(f"{files['pdb']}: not a readable PDB file ({type(err).__name__}: {err}); restore "
                             f"it, or simulate into another folder") from err
        capped = any(r.name in ("ACE", "NME") for r in topology.residues())
    else:
        pep = resolve_peptide(peptide)
        topology, capped = pep.topology, pep.capped
    if temperature is None:
        temperature = ALANINE_DIPEPTIDE_TEMPERATURE if capped else DIPEPTIDE_TEMPERATURE
    settings = {"name": name, "frame_interval_steps": int(frame_interval_steps), "timestep_fs": float(timestep_fs),
                "friction_per_ps": float(friction_per_ps), "temperature": float(temperature), "seed": int(seed),
                "constraints": constraints, "hydrogen_mass_amu": hydrogen_mass_amu,
                "forcefield_files": list(forcefield_files),
                "n_atoms": topology.getNumAtoms(), "equilibration_steps": int(equilibration_steps),
                "integrator": "LangevinMiddleIntegrator", "nonbonded": "CutoffNonPeriodic 2.0 nm"}
    system = create_system(topology, forcefield_files=tuple(forcefield_files), constraints=constraints,
                           hydrogen_mass_amu=hydrogen_mass_amu)
    with exclusive(out, f".{name}-traj.lock"):
        resumed = _resume_state(files, settings, n_frames)
        if record is not None:
            record()
        plat = pick_platform(platform) if not isinstance(platform, openmm.Platform) else platform
        integrator = openmm.LangevinMiddleIntegrator(temperature * u.kelvin, friction_per_ps / u.picosecond,
                                                     timestep_fs * u.femtoseconds)
        frames: list[np.ndarray] = []
        steps: list[int] = []
        wall = 0.0
        if resumed is not None:
            frames, steps, state_xml, wall = resumed
            integrator.setRandomNumberSeed(_seed(seed, len(frames), 1))
            context = openmm.Context(system, integrator, plat, platform_properties(plat, threads))
            context.setState(openmm.XmlSerializer.deserialize(state_xml))
            logger.info("%s: resuming at frame %d (step %d)", name, len(frames), steps[-1] if steps else 0)
        else:
            integrator.setRandomNumberSeed(_seed(seed, 0, 1))
            context = openmm.Context(system, integrator, plat, platform_properties(plat, threads))
            context.setPositions(pep.positions * u.nanometer)
            openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
            state = context.getState(getPositions=True)
            _atomic_write(files["pdb"], lambda fh: fh.write(_pdb_text(topology, state.getPositions()).encode()))
            context.setVelocitiesToTemperature(temperature * u.kelvin, _seed(seed, 0, 2))
            t0 = time.perf_counter()
            for done in tqdm(range(0, equilibration_steps, frame_interval_steps), desc=f"{name} equilibration",
                             disable=not progress, leave=False):
                integrator.step(min(frame_interval_steps, equilibration_steps - done))
            # production steps count from 0 after equilibration
            context.setStepCount(0)
            context.setTime(0.0)
            logger.info("%s: equilibrated %d steps in %.1f s", name, equilibration_steps, time.perf_counter() - t0)
            _save_checkpoint(files, context, frames, steps, settings, wall, dtype)

        step0 = len(frames)
        t_start = time.perf_counter()
        try:
            for k in tqdm(range(len(frames), n_frames), desc=name, disable=not progress, initial=len(frames),
                          total=n_frames):
                integrator.step(frame_interval_steps)
                state = context.getState(getPositions=True)
                frames.append(state.getPositions(asNumpy=True).value_in_unit(u.nanometer).astype(dtype))
                steps.append(state.getStepCount())
                if (k + 1) % checkpoint_every_frames == 0:
                    _save_checkpoint(files, context, frames, steps, settings,
                                     wall + time.perf_counter() - t_start, dtype)
        finally:
            elapsed = time.perf_counter() - t_start
        wall += elapsed
        _save_checkpoint(files, context, frames, steps, settings, wall, dtype)
        done = len(frames) - step0
        ns_per_day = (done * frame_interval_steps * timestep_fs * 1e-6) / (elapsed / 86400.0) if done and elapsed \
            else None
        info = {**settings, "n_frames": len(frames), "platform": plat.getName(), "production_wall_s": wall,
                "ns_per_day_last_run": ns_per_day,
                "production_ns": len(frames) * frame_interval_steps * timestep_fs * 1e-6}
        _atomic_write(files["info"], lambda fh: fh.write(json.dumps(info, indent=1).encode()))
    if ns_per_day:
        logger.info("%s: %d frames, %.1f ns/day on %s", name, len(frames), ns_per_day, plat.getName())
    return files["arrays"]


def _resume_state(files: dict[str, Path], settings: dict, n_frames: int
                  ) -> tuple[list[np.ndarray], list[int], str, float] | None:
    """(frames, steps, OpenMM state XML, wall seconds) of the checkpoint on disk, None without one; InputError
    naming the file when it cannot be read, was written with other settings, or holds more than n_frames."""
    path = files["checkpoint"]
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as ck:
            saved = json.loads(str(ck["settings"]))
            frames, steps = list(ck["positions"]), [int(s) for s in ck["step"]]
            state_xml, wall = str(ck["state_xml"]), float(ck["wall_s"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable simulation checkpoint ({type(err).__name__}: {err}); delete the "
                         f"molecule's files there to start over, or simulate into another folder") from err
    diff = {k: (saved.get(k), settings[k]) for k in _RESUME_KEYS if saved.get(k) != settings[k]}
    if diff:
        key, (was, now) = next(iter(diff.items()))
        raise InputError(f"{path} was written with other settings: {key} is {was!r} there but {now!r} now"
                         f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; rerun with that run's "
                         f"settings to resume it, or simulate into another folder")
    if len(frames) > n_frames:
        raise InputError(f"{path} holds {len(frames)} frames, more than the {n_frames} asked for; ask for at least "
                         f"{len(frames)} to continue it, or simulate into another folder")
    return frames, steps, state_xml, wall


def _pdb_text(topology: app.Topology, positions) -> str:  # noqa: ANN001 - openmm Quantity
    buf = io.StringIO()
    app.PDBFile.writeFile(topology, positions, buf, keepIds=True)
    return buf.getvalue()


def _save_checkpoint(files: dict[str, Path], context: openmm.Context, frames: list[np.ndarray], steps: list[int],
                     settings: dict, wall: float, dtype: type) -> None:
    n_atoms = settings["n_atoms"]
    positions = np.asarray(frames, dtype=dtype).reshape(len(frames), n_atoms, 3)
    step = np.asarray(steps, dtype=np.int64)
    state = context.getState(getPositions=True, getVelocities=True)
    state_xml = openmm.XmlSerializer.serialize(state)
    _atomic_write(files["checkpoint"], lambda fh: np.savez(fh, positions=positions, step=step,
                                                           state_xml=np.array(state_xml),
                                                           settings=np.array(json.dumps(settings)),
                                                           wall_s=np.array(wall)))
    _atomic_write(files["arrays"], lambda fh: np.savez(fh, positions=positions, step=step))


def _simulate_job(args: tuple) -> tuple[str, str]:
    pep, pdb_text, out_dir, kwargs = args
    if pdb_text is not None:  # Peptide objects travel as PDB text (topologies hold element singletons)
        pdb = app.PDBFile(io.StringIO(pdb_text))
        pep = Peptide(name=pep[0], sequence=pep[1], topology=pdb.topology,
                      positions=np.array(pdb.positions.value_in_unit(u.nanometer)), capped=pep[2])
    return (pep if isinstance(pep, str) else pep.name), str(simulate(pep, out_dir, **kwargs))


def simulate_many(peptides: Sequence[Peptide | str], out_dir: str | Path, *, processes: int | None = None,
                  **kwargs) -> dict[str, Path]:
    """``simulate`` every peptide in its own process (``processes`` at a time, default: CPU count).

    Each CPU job runs single-threaded; keyword arguments go to ``simulate``. Returns name -> arrays path.
    A failing peptide does not stop the others; the errors are raised together at the end.
    """
    processes = processes or os.cpu_count() or 1
    kwargs = {"progress": False, **kwargs}
    kwargs.setdefault("threads", 1)
    jobs = []
    for pep in peptides:
        if isinstance(pep, Peptide):
            jobs.append(((pep.name, pep.sequence, pep.capped), _pdb_text(pep.topology, pep.positions * u.nanometer),
                         str(out_dir), kwargs))
        else:
            jobs.append((pep, None, str(out_dir), kwargs))
    results: dict[str, Path] = {}
    errors: dict[str, BaseException] = {}
    with cf.ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_simulate_job, job): job for job in jobs}
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="peptides"):
            job = futures[fut]
            label = job[0] if isinstance(job[0], str) else job[0][0]
            try:
                name, path = fut.result()
                results[name] = Path(path)
            except Exception as err:  # report all failures, keep the finished trajectories
                logger.error("simulation of %s failed: %s", label, err)
                errors[label] = err
    if errors:
        raise RuntimeError(f"{len(errors)} simulation(s) failed: {errors}")
    return results
