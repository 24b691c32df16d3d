"""MD data on disk: the published file layout, and finding the data of one or more molecules.

The published layout keeps the frames of molecule ``name`` in one folder as
``{name}-traj-state0.pdb`` (topology and starting structure) and ``{name}-traj-arrays.npz``
(``positions`` [frames, atoms, 3] in nm, ``step`` [frames]); ``tbg.chem.md.simulate`` adds a checkpoint
and an info file under the same prefix. ``layout_files`` is the one place that spells these names.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mdtraj
import numpy as np
import openmm.app as app

from tbg.errors import InputError

__all__ = ["LAYOUT_SUFFIXES", "MDData", "find_md_data", "layout_files", "layout_names", "layout_source"]

LAYOUT_SUFFIXES: dict[str, str] = {
    "pdb": "-traj-state0.pdb",  # topology and starting structure
    "arrays": "-traj-arrays.npz",  # positions [frames, atoms, 3] in nm and step [frames]
    "checkpoint": "-traj-checkpoint.npz",  # tbg.chem.md: frames so far and the OpenMM state
    "info": "-traj-info.json",  # tbg.chem.md: settings and speed
}


def layout_files(directory: str | Path, name: str) -> dict[str, Path]:
    """The files of molecule ``name`` in ``directory`` in the published layout, by role (LAYOUT_SUFFIXES)."""
    directory = Path(directory)
    return {role: directory / f"{name}{suffix}" for role, suffix in LAYOUT_SUFFIXES.items()}


def _layout_name(path: Path) -> str | None:
    """``name`` of a ``{name}-traj-arrays.npz`` path, None for any other file name."""
    suffix = LAYOUT_SUFFIXES["arrays"]
    return path.name[: -len(suffix)] if path.name.endswith(suffix) else None


def layout_names(directory: str | Path) -> list[str]:
    """Names of every molecule in ``directory`` with both files of the published layout, sorted."""
    directory = Path(directory)
    names = (_layout_name(p) for p in directory.glob(f"*{LAYOUT_SUFFIXES['arrays']}"))
    return sorted(n for n in names if n and layout_files(directory, n)["pdb"].is_file())


@dataclass(frozen=True)
class MDData:
    """The MD frames of one molecule on disk: ``topology`` (a PDB) and ``trajectory`` (positions in nm)."""

    name: str
    topology: Path
    trajectory: Path

    def load_topology(self) -> mdtraj.Topology:
        return mdtraj.load_topology(str(self.topology))

    def load_positions(self, topology: mdtraj.Topology | None = None) -> np.ndarray:
        """All frames [frames, atoms, 3] in nm, checked against the topology's atom count."""
        n_atoms = (topology or self.load_topology()).n_atoms
        with np.load(self.trajectory, allow_pickle=False) as arrays:
            if "positions" not in arrays:
                raise KeyError(f"{self.trajectory} has no 'positions' array (keys: {list(arrays.keys())})")
            positions = arrays["positions"]
        if positions.ndim != 3 or positions.shape[1:] != (n_atoms, 3):
            raise ValueError(f"{self.trajectory}: positions {positions.shape} do not match the {n_atoms} atoms "
                             f"of {self.topology}")
        if not np.isfinite(positions).all():
            raise ValueError(f"{self.trajectory}: positions contain NaN/inf")
        return positions

    def load(self) -> tuple[mdtraj.Topology, np.ndarray]:
        """(topology, positions [frames, atoms, 3] in nm)."""
        topology = self.load_topology()
        return topology, self.load_positions(topology)

    def structure(self) -> tuple[app.Topology, np.ndarray]:
        """The OpenMM topology (for force fields) and the reference structure [atoms, 3] in nm: the
        topology file's positions (the minimised start of the published layout)."""
        pdb = app.PDBFile(str(self.topology))
        return pdb.topology, np.asarray(pdb.getPositions(asNumpy=True)._value)

    def write_topology_pdb(self, path: str | Path) -> Path:
        """The molecule's topology as a single-structure PDB at ``path`` (the atom order of the frames)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.topology.resolve() != path.resolve():
            shutil.copyfile(self.topology, path)
        return path


def layout_source(directory: str | Path, name: str | None = None) -> MDData:
    """The MDData of molecule ``name`` in ``directory``, or of a single ``{name}-traj-arrays.npz`` path."""
    path = Path(directory)
    if path.suffix == ".npz":
        layout_name = _layout_name(path)
        if layout_name is None:
            raise ValueError(f"{path}: expected a '{{name}}{LAYOUT_SUFFIXES['arrays']}' file")
        name = name or layout_name
        files = layout_files(path.parent, name)
        files["arrays"] = path
    else:
        if name is None:
            raise ValueError(f"give the peptide name to load from the directory {path}")
        files = layout_files(path, name)
    for f in (files["pdb"], files["arrays"]):
        if not f.is_file():
            raise FileNotFoundError(f"missing trajectory file {f}")
    return MDData(name, files["pdb"], files["arrays"])


def find_md_data(paths: Iterable[str | Path]) -> list[MDData]:
    """The MD data behind each path: a folder (every molecule in the published layout in it) or a
    ``{name}-traj-arrays.npz`` file (its ``{name}-traj-state0.pdb`` beside it). Raises InputError
    naming the path that holds no usable data."""
    found: list[MDData] = []
    arrays_glob = f"*{LAYOUT_SUFFIXES['arrays']}"
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            arrays = sorted(path.glob(arrays_glob))
            if not arrays:
                raise InputError(f"{path}: no {arrays_glob} files in this folder; simulate them first (`tbg "
                                 f"simulate --out {path}`) or point to the MD data folder")
        elif path.is_file() and _layout_name(path) is not None:
            arrays = [path]
        else:
            raise InputError(f"{path}: expected a folder with MD data or a file named NAME{LAYOUT_SUFFIXES['arrays']} "
                             f"(with NAME{LAYOUT_SUFFIXES['pdb']} beside it)")
        for a in arrays:
            name = _layout_name(a)
            pdb = layout_files(a.parent, name)["pdb"]
            if not pdb.is_file():
                raise InputError(f"{a} has no topology {pdb.name} beside it")
            found.append(MDData(name, pdb, a))
    return found
