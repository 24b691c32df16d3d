"""All 400 zwitterionic dipeptides (and alanine dipeptide) build, minimise, get a force field and encode."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import openmm
import pytest
import openmm.unit as u
import torch

import tbg.chem as chem
from tbg.chem.encoding import AMINO_ACID_ORDER
from tbg.chem.peptides import ONE_TO_THREE, minimize_positions


def _energy(ctx: openmm.Context, positions: np.ndarray) -> float:
    ctx.setPositions(positions * u.nanometer)
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)


def _check(sequence: str) -> tuple[str, int, str]:
    """Build, minimise and encode one peptide; returns (name, n_atoms, problem or '')."""
    try:
        raw = chem.alanine_dipeptide(minimize=False) if sequence == "ala2" else chem.build_peptide(
            sequence, minimize=False)
        minimised = minimize_positions(raw.topology, raw.positions)  # what build_peptide(minimize=True) runs
        pep = chem.Peptide(raw.name, raw.sequence, raw.topology, minimised, raw.capped)
        system = chem.create_system(pep.topology)  # every residue matched an amber14 template
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
        e0, e1 = (_energy(ctx, x) for x in (raw.positions, pep.positions))
        if not (np.isfinite(e1) and e1 < e0):
            return pep.name, pep.n_atoms, f"minimisation did not lower the energy: {e0} -> {e1}"
        top = pep.mdtraj_topology
        bonds = np.array([[a.index, b.index] for a, b in top.bonds])
        lengths = np.linalg.norm(pep.positions[bonds[:, 0]] - pep.positions[bonds[:, 1]], axis=1)
        if not ((lengths > 0.09) & (lengths < 0.2)).all():
            return pep.name, pep.n_atoms, f"bond lengths out of range: {lengths.min()}..{lengths.max()}"
        feats = chem.encode_transfer(pep.topology)
        if feats.shape != (pep.n_atoms, 76) or not torch.equal(feats.sum(1), torch.full((pep.n_atoms,), 3.0)):
            return pep.name, pep.n_atoms, f"bad transfer encoding {tuple(feats.shape)}"
        letters = "A" if sequence == "ala2" else sequence
        want_aa = [AMINO_ACID_ORDER.index(ONE_TO_THREE[c]) for c in letters]
        got_aa = sorted(set(feats[:, 2:22].argmax(1).tolist()))
        if got_aa != sorted(set(want_aa)):
            return pep.name, pep.n_atoms, f"amino acids {got_aa} != {want_aa}"
        if sequence != "ala2":
            pos = feats[:, :2].argmax(1)
            res = np.array([a.residue.index for a in top.atoms])
            if not np.array_equal(pos.numpy(), res):
                return pep.name, pep.n_atoms, "residue positions do not follow the residues"
        atoms = chem.encode_atoms(pep.topology)
        if atoms.shape != (pep.n_atoms, pep.n_atoms):
            return pep.name, pep.n_atoms, f"bad atom encoding {tuple(atoms.shape)}"
        return pep.name, pep.n_atoms, ""
    except Exception as err:  # report every failing peptide, not just the first
        return sequence, 0, f"{type(err).__name__}: {err}"


@pytest.mark.slow  # ~40 s on 2 idle cores; part of the default suite (CI runs it)
def test_all_400_dipeptides_and_alanine_dipeptide() -> None:
    sequences = chem.all_dipeptides() + ["ala2"]
    with mp.get_context("fork").Pool(2) as pool:  # the builder is pure CPU work: one process per core
        results = pool.map(_check, sequences, chunksize=8)
    problems = {name: msg for name, _, msg in results if msg}
    assert not problems, problems
    sizes = {name: n for name, n, _ in results}
    assert len(sizes) == 401 and sizes["ala2"] == 22
    # zwitterionic dipeptide sizes: GG is the smallest (17 atoms), WW the largest (51, the published padding)
    assert min(sizes.values()) == sizes["GG"] == 17 and max(sizes.values()) == sizes["WW"] == 51
