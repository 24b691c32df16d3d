"""Trajectories on disk: the published MD layout, any trajectory mdtraj reads, and samples written out.

The published layout keeps the frames of molecule ``name`` in one folder as
``{name}-traj-state0.pdb`` (topology and starting structure) and ``{name}-traj-arrays.npz``
(``positions`` [frames, atoms, 3] in nm, ``step`` [frames]); ``tbg.chem.md.simulate`` adds a checkpoint
and an info file under the same prefix. ``layout_files`` is the one place that spells these names.

Any other trajectory mdtraj reads (DCD, XTC, TRR, HDF5, NetCDF, multi-model PDB ...) is MD data too, with a
topology file for the formats that carry none (DCD, XTC, TRR ...): mdtraj returns positions in nm whatever
the file stores (DCD keeps Angstrom). ``write_trajectory`` goes the other way, for samples that VMD,
PyMOL or MDAnalysis should open. Positions here are always nm; the network's model units are
nm x ``tbg.chem.units.SCALE``.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mdtraj
import numpy as np
import openmm.app as app
import openmm.unit as unit
from mdtraj.formats.registry import FormatRegistry

from tbg.errors import InputError

__all__ = ["LAYOUT_SUFFIXES", "WRITE_FORMATS", "MDData", "find_md_data", "layout_files", "layout_names",
           "layout_source", "trajectory_format", "write_trajectory"]

LAYOUT_SUFFIXES: dict[str, str] = {
    "pdb": "-traj-state0.pdb",  # topology and starting structure
    "arrays": "-traj-arrays.npz",  # positions [frames, atoms, 3] in nm and step [frames]
    "checkpoint": "-traj-checkpoint.npz",  # tbg.chem.md: frames so far and the OpenMM state
    "info": "-traj-info.json",  # tbg.chem.md: settings and speed
}


# Trajectory formats that hold their own topology (no topology file needed to read them).
_WITH_TOPOLOGY = (".pdb", ".pdb.gz", ".h5", ".hdf5", ".lh5", ".gro", ".cif", ".cif.gz", ".mmcif", ".mmcif.gz",
                  ".pdbx", ".pdbx.gz")
# Formats samples are written in: those VMD, PyMOL and MDAnalysis open (h5: mdtraj's own, with topology).
WRITE_FORMATS = ("pdb", "dcd", "xtc", "trr", "h5")


def trajectory_format(path: str | Path) -> str | None:
    """The extension by which mdtraj reads ``path`` (".dcd", ".pdb.gz" ...), None if it reads no such file."""
    name = Path(path).name.lower()
    matches = [ext for ext in FormatRegistry.loaders if name.endswith(ext)]
    return max(matches, key=len) if matches else None


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
    """The MD frames of one molecule on disk: ``trajectory`` (the published layout's arrays .npz or any
    trajectory mdtraj reads; positions in nm) and ``topology`` (the file naming the atoms, in the
    trajectory's order: a PDB, or any topology mdtraj reads; the trajectory itself for multi-model PDB
    and HDF5)."""

    name: str
    topology: Path
    trajectory: Path

    @property
    def published_layout(self) -> bool:
        return self.trajectory.suffix == ".npz"

    def load_topology(self) -> mdtraj.Topology:
        try:
            topology = mdtraj.load_topology(str(self.topology))
        except Exception as err:  # noqa: BLE001 - mdtraj's readers fail in many ways on a broken file
            raise InputError(f"{self.topology}: not a readable topology ({type(err).__name__}: {err})") from err
        if topology.n_atoms == 0:
            raise InputError(f"{self.topology}: the topology holds no atoms")
        return topology

    def load_positions(self, topology: mdtraj.Topology | None = None) -> np.ndarray:
        """All frames [frames, atoms, 3] in nm, checked against the topology's atom count."""
        topology = topology or self.load_topology()
        if self.published_layout:
            try:
                with np.load(self.trajectory, allow_pickle=False) as arrays:
                    if "positions" not in arrays:
                        raise InputError(f"{self.trajectory} has no 'positions' array (it has: "
                                         f"{', '.join(arrays.keys()) or 'none'})")
                    positions = arrays["positions"]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                if isinstance(err, InputError):
                    raise
                raise InputError(f"{self.trajectory}: not a readable .npz file ({type(err).__name__}: {err})") from err
        else:
            try:
                positions = mdtraj.load(str(self.trajectory), **self._top(topology)).xyz
            except (ValueError, OSError) as err:  # mdtraj names atom-count mismatches and broken files
                raise InputError(f"{self.trajectory}: cannot read it with the topology {self.topology}: {err}") \
                    from err
        if positions.ndim != 3 or positions.shape[1:] != (topology.n_atoms, 3):
            raise InputError(f"{self.trajectory}: positions {positions.shape} do not match the {topology.n_atoms} "
                             f"atoms of {self.topology}")
        if len(positions) == 0:
            raise InputError(f"{self.trajectory}: no frames")
        if not np.isfinite(positions).all():
            raise InputError(f"{self.trajectory}: positions contain NaN/inf")
        return positions

    def _top(self, topology: mdtraj.Topology) -> dict[str, mdtraj.Topology]:
        """mdtraj's top= argument: none for a trajectory that holds its own topology (mdtraj warns)."""
        return {} if self.topology == self.trajectory else {"top": topology}

    def load(self) -> tuple[mdtraj.Topology, np.ndarray]:
        """(topology, positions [frames, atoms, 3] in nm)."""
        topology = self.load_topology()
        return topology, self.load_positions(topology)

    def structure(self) -> tuple[app.Topology, np.ndarray]:
        """The OpenMM topology (for force fields) and a reference structure [atoms, 3] in nm: the positions
        of a PDB topology file (its first model: in the published layout the minimised start), else the
        first frame of the trajectory."""
        if self.topology.suffix.lower() == ".pdb":
            try:
                pdb = app.PDBFile(str(self.topology))
            except Exception as err:  # noqa: BLE001 - OpenMM's reader fails in many ways on a broken file
                raise InputError(f"{self.topology}: not a readable PDB file ({type(err).__name__}: {err})") from err
            return pdb.topology, np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        frame = mdtraj.load_frame(str(self.trajectory), 0, **self._top(self.load_topology()))
        return frame.topology.to_openmm(), frame.xyz[0].astype(np.float64)

    def write_topology_pdb(self, path: str | Path) -> Path:
        """The molecule as a single-structure PDB at ``path`` (atoms in the order of the frames): a copy of a
        PDB topology file, else ``structure()`` written out."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.topology.resolve() == path.resolve():
            return path
        if self.topology.suffix.lower() == ".pdb" and self.topology != self.trajectory:
            shutil.copyfile(self.topology, path)
            return path
        topology, positions = self.structure()
        with open(path, "w") as fh:
            app.PDBFile.writeFile(topology, positions * unit.nanometer, fh, keepIds=True)
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


def find_md_data(paths: Iterable[str | Path], topology: str | Path | None = None) -> list[MDData]:
    """The MD data behind each path, one MDData per molecule or trajectory file:

    - a folder: every molecule in the published layout in it;
    - a ``{name}-traj-arrays.npz`` file: its ``{name}-traj-state0.pdb`` beside it (or ``topology``);
    - any other trajectory mdtraj reads (.dcd, .xtc, .trr, .h5, multi-model .pdb ...): with ``topology``
      (a PDB with the atoms in the trajectory's order, or any topology file mdtraj reads), which formats
      that hold their own (PDB, HDF5) do without. The name is the file name without its extension.

    Raises InputError naming the path that holds no usable data.
    """
    found: list[MDData] = []
    arrays_glob = f"*{LAYOUT_SUFFIXES['arrays']}"
    topology = None if topology is None else Path(topology)
    if topology is not None and not topology.is_file():
        raise InputError(f"topology file not found: {topology}")
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if topology is not None:
                raise InputError(f"{path} is a folder in the published layout, whose topologies are its "
                                 f"NAME{LAYOUT_SUFFIXES['pdb']} files; a topology file goes with trajectory files")
            arrays = sorted(path.glob(arrays_glob))
            if not arrays:
                raise InputError(f"{path}: no {arrays_glob} files in this folder; simulate them first (`tbg "
                                 f"simulate --out {path}`), point to the MD data folder, or name a trajectory file")
            for a in arrays:
                found.append(_layout_file(a, None))
        elif path.is_file() and _layout_name(path) is not None:
            found.append(_layout_file(path, topology))
        elif path.is_file() and (ext := trajectory_format(path)) is not None:
            top = topology or (path if ext in _WITH_TOPOLOGY else None)
            if top is None:
                raise InputError(f"{path}: a {ext} trajectory holds no topology; give the molecule's topology "
                                 f"file too (a PDB with the atoms in the trajectory's order)")
            found.append(MDData(path.name[: -len(ext)], top, path))
        elif not path.exists():
            raise InputError(f"{path}: no such file or folder")
        else:
            raise InputError(f"{path}: expected a folder with MD data in the published layout, a file named "
                             f"NAME{LAYOUT_SUFFIXES['arrays']} (with NAME{LAYOUT_SUFFIXES['pdb']} beside it) or a "
                             f"trajectory mdtraj reads (.dcd, .xtc, .trr, .h5, .pdb ...)")
    return found


def _layout_file(arrays: Path, topology: Path | None) -> MDData:
    name = _layout_name(arrays)
    pdb = topology or layout_files(arrays.parent, name)["pdb"]
    if not pdb.is_file():
        raise InputError(f"{arrays} has no topology {pdb.name} beside it")
    return MDData(name, pdb, arrays)


def write_trajectory(positions_nm: np.ndarray, topology: mdtraj.Topology, path: str | Path) -> Path:
    """Write frames [n, atoms, 3] in nm as the trajectory ``path`` (format by extension, see WRITE_FORMATS;
    mdtraj converts to the format's units), atomically: a temporary name is renamed into place."""
    path = Path(path)
    ext = trajectory_format(path)
    if ext is None or ext.lstrip(".") not in WRITE_FORMATS:
        raise ValueError(f"{path}: write one of the formats {', '.join(WRITE_FORMATS)}")
    positions = np.asarray(positions_nm, dtype=np.float32)
    if positions.ndim != 3 or positions.shape[1:] != (topology.n_atoms, 3):
        raise ValueError(f"positions {positions.shape} do not match the {topology.n_atoms} atoms of the topology")
    tmp = path.with_name(f".{path.name[: -len(ext)]}.{os.getpid()}.tmp{ext}")
    tmp.unlink(missing_ok=True)  # mdtraj refuses to overwrite
    mdtraj.Trajectory(positions, topology).save(str(tmp))
    os.replace(tmp, path)
    return path
