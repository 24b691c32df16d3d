"""Evaluation of a samples file against MD data on disk (what `tbg evaluate` runs).

The samples are a ``samples.npz`` of ``tbg.flow.sample`` (``samples`` [n, 3N] in model units = nm x SCALE,
with ``prior_energy`` and ``dlogp`` when sampled with likelihood); the MD data is a ``tbg.chem.trajectory.
MDData`` (positions in nm), whose topology file also gives the reference structure and the force field's
molecule. Energies are reduced by kT at the molecule's default temperature unless one is given.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mdtraj
import numpy as np

from tbg.chem.energy import EnergyModel
from tbg.chem.forcefield import default_temperature
from tbg.chem.trajectory import MDData
from tbg.chem.units import SCALE
from tbg.errors import InputError
from tbg.evaluate.report import EvaluationOptions, MDFrames, ModelSamples, Molecule, evaluate

log = logging.getLogger("tbg")

__all__ = ["evaluate_samples_file", "load_samples", "thin_evenly"]


def load_samples(samples_npz: Path) -> dict[str, np.ndarray]:
    """``samples`` and, where present, ``prior_energy`` and ``dlogp`` of a samples.npz."""
    if not samples_npz.is_file():
        raise InputError(f"samples file not found: {samples_npz}; run `tbg sample` first")
    with np.load(samples_npz) as f:
        if "samples" not in f:
            raise InputError(f"{samples_npz} has no 'samples' array (keys: {', '.join(f.files)})")
        return {k: f[k] for k in ("samples", "prior_energy", "dlogp") if k in f}


def thin_evenly(frames: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` frames spread evenly over the whole trajectory, first and last included."""
    return frames[np.unique(np.linspace(0, len(frames) - 1, min(n, len(frames))).astype(int))]


def evaluate_samples_file(samples_npz: Path, md: MDData, out: Path, options: EvaluationOptions, *,
                          md_frames: int = 5000, temperature: float | None = None) -> tuple[dict[str, Any], str]:
    """Validity, energies, reweighting and free energies of the samples in ``samples_npz`` against
    ``md_frames`` evenly thinned frames of ``md``; writes report.json and plots to ``out``
    (``tbg.evaluate.evaluate``). Returns (report, summary table)."""
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
    with EnergyModel(topology_omm, temperature=temperature) as energy:
        molecule = Molecule(topology, reference_nm, lambda pos: energy.reduced_energy(pos, unit="nm"))
        return evaluate(ModelSamples(x.reshape(len(x), n_atoms, 3) / SCALE, **weights), molecule, MDFrames(md_x),
                        out, options)
