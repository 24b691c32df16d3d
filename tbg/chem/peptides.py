"""Peptides from sequences: zwitterionic (uncapped) or Ace/Nme-capped, 1-8 standard residues.

Geometry comes from PeptideBuilder (Biopython; ideal bond lengths/angles, L-amino acids, extended
backbone), hydrogens from OpenMM's Modeller.addHydrogens with the amber14 templates at pH 7 (so the
termini are NH3+/COO-, side chains take their standard protonation and OpenMM picks HID or HIE for
histidine from the hydrogen-bond geometry, deterministically), followed by a
short energy minimisation with the force field of tbg.chem.forcefield. Caps are built as glycines whose
surplus atoms are removed (ACE = Gly's CA/C/O renamed CH3/C/O; NME = Gly's N/CA renamed N/CH3), which
keeps PeptideBuilder's geometry for the peptide bonds to the caps.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u

from tbg.chem.forcefield import DEFAULT_FORCEFIELD_FILES, create_system, forcefield
from tbg.errors import InputError

logger = logging.getLogger("tbg")

ONE_TO_THREE: dict[str, str] = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
    "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
    "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
THREE_TO_ONE: dict[str, str] = {v: k for k, v in ONE_TO_THREE.items()}
AMINO_ACIDS: str = "".join(sorted(ONE_TO_THREE))
MAX_RESIDUES = 8


@dataclass
class Peptide:
    """A peptide: OpenMM topology and positions [N, 3] in nm."""

    name: str
    sequence: str
    topology: app.Topology = field(repr=False)
    positions: np.ndarray = field(repr=False)
    capped: bool = False

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.float64)
        n = self.topology.getNumAtoms()
        if self.positions.shape != (n, 3):
            raise ValueError(f"positions must be [{n}, 3] for {self.name}, got {self.positions.shape}")

    @property
    def n_atoms(self) -> int:
        return self.topology.getNumAtoms()

    @property
    def mdtraj_topology(self) -> mdtraj.Topology:
        return mdtraj.Topology.from_openmm(self.topology)

    def to_pdb(self, path: str | Path) -> Path:
        """Write topology and positions as PDB (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            app.PDBFile.writeFile(self.topology, self.positions * u.nanometer, fh, keepIds=True)
        tmp.replace(path)
        return path


def validate_sequence(sequence: str, *, capped: bool) -> str:
    """Upper-cased sequence; InputError (a ValueError) naming unknown letters or a bad length."""
    if not isinstance(sequence, str) or not sequence:
        raise InputError(f"sequence must be a non-empty string of one-letter codes, got {sequence!r}")
    seq = sequence.strip().upper()
    unknown = sorted({c for c in seq if c not in ONE_TO_THREE})
    if unknown:
        raise InputError(f"unknown residue letter(s) {', '.join(map(repr, unknown))} in {sequence!r}; "
                         f"allowed: {AMINO_ACIDS}")
    lo = 1 if capped else 2
    if not lo <= len(seq) <= MAX_RESIDUES:
        raise InputError(f"{'capped' if capped else 'zwitterionic'} peptides need {lo}-{MAX_RESIDUES} "
                         f"residues, got {len(seq)} ({seq!r})")
    return seq


def _heavy_atom_pdb(seq: str, capped: bool) -> str:
    """PDB text of the heavy atoms from PeptideBuilder (with caps made from terminal glycines)."""
    import PeptideBuilder  # noqa: PLC0415 - heavy import, only needed when building
    from Bio.PDB import PDBIO  # noqa: PLC0415

    structure = PeptideBuilder.make_extended_structure(("G" + seq + "G") if capped else seq)
    residues = list(structure.get_residues())
    if capped:
        ace, nme = residues[0], residues[-1]
        ace.detach_child("N")
        nme.detach_child("C")
        nme.detach_child("O")
        for res, new in ((ace, "ACE"), (nme, "NME")):
            ca = res["CA"]
            res.detach_child("CA")
            ca.id, ca.name, ca.fullname = "CH3", "CH3", " CH3"
            res.add(ca)
            res.resname = new
    else:
        PeptideBuilder.add_terminal_OXT(structure)
    buf = io.StringIO()
    writer = PDBIO()
    writer.set_structure(structure)
    writer.save(buf)
    return buf.getvalue()


def build_peptide(sequence: str, *, capped: bool = False, name: str | None = None, minimize: bool = True,
                  forcefield_files: tuple[str, ...] = DEFAULT_FORCEFIELD_FILES,
                  minimize_tolerance: float = 10.0, max_iterations: int = 1000) -> Peptide:
    """Build a peptide from one-letter codes.

    Two letters without caps give the zwitterionic dipeptide named by its sequence ("AY"), 3-8 letters
    longer zwitterionic peptides, ``capped=True`` Ace-X...-Nme (1-8 residues, named "Ace-X...-Nme").
    Minimisation (default) uses the implicit-solvent force field on the CPU platform, single thread.
    """
    seq = validate_sequence(sequence, capped=capped)
    pdb = app.PDBFile(io.StringIO(_heavy_atom_pdb(seq, capped)))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(forcefield(tuple(forcefield_files)), pH=7.0)
    topology = modeller.topology
    positions = np.array(modeller.positions.value_in_unit(u.nanometer))
    if minimize:
        positions = minimize_positions(topology, positions, forcefield_files=forcefield_files,
                                       tolerance=minimize_tolerance, max_iterations=max_iterations)
    return Peptide(name=name or (f"Ace-{seq}-Nme" if capped else seq), sequence=seq, topology=topology,
                   positions=positions, capped=capped)


def minimize_positions(topology: app.Topology, positions: np.ndarray, *,
                       forcefield_files: tuple[str, ...] = DEFAULT_FORCEFIELD_FILES, tolerance: float = 10.0,
                       max_iterations: int = 1000) -> np.ndarray:
    """Local energy minimisation (L-BFGS, tolerance in kJ/mol/nm) on the single-threaded CPU platform."""
    system = create_system(topology, forcefield_files=forcefield_files)
    plat = openmm.Platform.getPlatformByName("CPU")
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), plat, {"Threads": "1"})
    context.setPositions(positions * u.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations)
    state = context.getState(getPositions=True, getEnergy=True)
    energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    if not np.isfinite(energy):
        raise RuntimeError(f"minimisation diverged (energy {energy})")
    return np.array(state.getPositions(asNumpy=True).value_in_unit(u.nanometer))


def alanine_dipeptide(*, minimize: bool = True) -> Peptide:
    """Ace-Ala-Nme (22 atoms), named "ala2"."""
    return build_peptide("A", capped=True, name="ala2", minimize=minimize)


def all_dipeptides() -> list[str]:
    """The 400 two-letter sequences of the 20 standard amino acids, in alphabetical order."""
    return [a + b for a in AMINO_ACIDS for b in AMINO_ACIDS]
