"""Evaluation of a samples file against MD data on disk (what `tbg evaluate` runs).

The samples are a ``samples.npz`` of ``tbg.flow.sample`` (``samples`` [n, 3N] in model units = nm x SCALE,
with ``prior_energy`` and ``dlogp`` when sampled with likelihood), its folder, or a refinement folder of
``tbg.flow.refine.runs`` (the samples it refined are evaluated, with its refined sets beside IS); the MD data is a ``tbg.chem.trajectory.
MDData`` (positions in nm), whose topology file also gives the reference structure and the force field's
molecule. Energies are reduced by kT at the molecule's default temperature unless one is given.
"""
from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np
import openmm

from tbg.chem.energy import EnergyModel
from tbg.chem.forcefield import default_temperature
from tbg.chem.trajectory import MDData
from tbg.chem.units import SCALE
from tbg.errors import InputError
from tbg.evaluate.report import EvaluationOptions, MDFrames, MethodSamples, ModelSamples, Molecule, evaluate
from tbg.flow.refine.runs import is_refinement, read_refinement
from tbg.runfolder import exclusive

log = logging.getLogger("tbg")

__all__ = ["evaluate_samples_file", "load_samples", "thin_evenly"]


def load_samples(samples_npz: Path) -> dict[str, np.ndarray]:
    """``samples`` and, where present, ``prior_energy`` and ``dlogp`` of a samples.npz, checked: a float
    array [n, 3N] and, per sample, one value of each (non-finite values are allowed: such samples count as
    invalid in the evaluation)."""
    if not samples_npz.is_file():
        raise InputError(f"samples file not found: {samples_npz}; run `tbg sample` first")
    try:
        with np.load(samples_npz, allow_pickle=False) as f:
            if "samples" not in f:
                raise InputError(f"{samples_npz} has no 'samples' array (it has: {', '.join(f.files) or 'none'})")
            arrays = {k: f[k] for k in ("samples", "prior_energy", "dlogp") if k in f}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{samples_npz}: not a readable .npz file ({type(err).__name__}: {err})") from err
    n = len(arrays["samples"])
    for key, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating) or (a.ndim != 2 if key == "samples" else a.shape != (n,)):
            raise InputError(f"{samples_npz}: '{key}' is {a.dtype} {list(a.shape)}, expected floats "
                             f"{'[n, 3N]' if key == 'samples' else f'[{n}]'}")
    if ("dlogp" in arrays) != ("prior_energy" in arrays):
        raise InputError(f"{samples_npz}: 'dlogp' and 'prior_energy' come together (the log weights need both)")
    return arrays


def thin_evenly(frames: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` frames spread evenly over the whole trajectory, first and last included."""
    return frames[np.unique(np.linspace(0, len(frames) - 1, min(n, len(frames))).astype(int))]


def evaluate_samples_file(samples: Path, md: MDData, out: Path, options: EvaluationOptions, *,
                          md_frames: int = 5000, temperature: float | None = None,
                          platform: openmm.Platform | str | None = None,
                          record: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], str]:
    """Validity, energies, reweighting and free energies of the samples in ``samples`` (a samples.npz, its
    folder, or a refinement folder: its source samples, with the refined sets beside them) against
    ``md_frames`` evenly thinned frames of ``md``; writes report.json and plots to ``out``
    (``tbg.evaluate.evaluate``), holding the folder against other processes. Energies run on the OpenMM
    ``platform`` (default: the fastest). ``record(out)``, if given, is called once the inputs are read and
    checked (the CLI writes its resolved options there). Returns (report, summary table)."""
    if md_frames < 1:
        raise InputError(f"md_frames must be >= 1, got {md_frames}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"the temperature must be a positive number of K, got {temperature}")
    refined = []
    samples_npz = samples / "samples.npz" if samples.is_dir() else samples
    if samples.is_dir() and is_refinement(samples):
        samples_npz, refined = read_refinement(samples)
    arrays = load_samples(samples_npz)
    topology_omm, reference_nm = md.structure()
    topology = mdtraj.Topology.from_openmm(topology_omm)
    n_atoms = topology.n_atoms
    x = arrays["samples"]
    if x.ndim != 2 or x.shape[1] != 3 * n_atoms:
        raise InputError(f"{samples_npz}: samples have shape {list(x.shape)}, but {md.topology.name} has "
                         f"{n_atoms} atoms ([n, {3 * n_atoms}] expected); evaluate against the molecule that "
                         f"was sampled")
    md_x = thin_evenly(md.load_positions(topology), md_frames)
    weights = {"prior_energy": arrays["prior_energy"], "dlogp": arrays["dlogp"]} if "dlogp" in arrays else {}
    if not weights:
        log.warning("%s has no dlogp (sampled without likelihood): no reweighting", samples_npz)
    temperature = temperature or default_temperature(topology_omm)
    with exclusive(out), EnergyModel(topology_omm, temperature=temperature, platform=platform) as energy:
        if record is not None:
            record(out)
        molecule = Molecule(topology, reference_nm, lambda pos: energy.reduced_energy(pos, unit="nm"))
        methods = [MethodSamples(r.name, r.kind, r.positions_nm(n_atoms), log_w=r.log_weights, ess=r.ess,
                                 bootstrap_block=r.bootstrap_block, info=r.info) for r in refined]
        return evaluate(ModelSamples(x.reshape(len(x), n_atoms, 3) / SCALE, **weights), molecule, MDFrames(md_x),
                        out, options, refined=methods)
