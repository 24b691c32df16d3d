"""tbg.chem.trajectory: the published layout's names, MD data in any format mdtraj reads (read back exactly
up to each format's precision), and trajectories written for viewers."""
from __future__ import annotations

from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch

from tbg.chem import md as chem_md
from tbg.chem.data import ALANINE_DIPEPTIDE_DIR, PeptideDataset
from tbg.chem.forcefield import default_temperature
from tbg.chem.peptides import build_peptide
from tbg.chem.trajectory import (LAYOUT_SUFFIXES, MDData, find_md_data, layout_files, layout_source,
                                 trajectory_format, write_trajectory)
from tbg.errors import InputError

# Largest error of a position read back, nm: DCD stores float32 Angstrom, XTC rounds to 1e-3 nm, PDB to
# 1e-3 Angstrom; TRR and HDF5 keep float32 nm.
PRECISION = {"dcd": 1e-6, "xtc": 5.01e-4, "trr": 0.0, "h5": 0.0, "pdb": 5.01e-5}


@pytest.fixture(scope="module")
def shipped() -> MDData:
    return layout_source(ALANINE_DIPEPTIDE_DIR, "ala2")


def test_layout_names_are_defined_once(tmp_path: Path) -> None:
    files = layout_files(tmp_path, "AY")
    assert {k: p.name for k, p in files.items()} == {k: "AY" + suffix for k, suffix in LAYOUT_SUFFIXES.items()}
    assert chem_md.paths(tmp_path, "AY") == files  # the simulation writes the same names


@pytest.mark.parametrize("fmt", sorted(PRECISION))
def test_md_data_in_any_format(fmt: str, shipped: MDData, tmp_path: Path) -> None:
    topology, frames = shipped.load()
    frames = frames[:25]
    path = write_trajectory(frames, topology, tmp_path / f"run1.{fmt}")
    needs_topology = fmt in ("dcd", "xtc", "trr")
    if needs_topology:
        with pytest.raises(InputError, match="holds no topology"):
            find_md_data([path])
    (data,) = find_md_data([path], shipped.topology if needs_topology else None)
    assert data.name == "run1" and data.trajectory == path
    top, positions = data.load()
    assert [a.name for a in top.atoms] == [a.name for a in topology.atoms]
    assert positions.shape == frames.shape and np.abs(positions - frames).max() <= PRECISION[fmt]
    # The force-field topology and reference structure: the PDB's own positions, else the first frame.
    omm, reference = data.structure()
    assert omm.getNumAtoms() == 22 and reference.shape == (22, 3)
    expected = shipped.structure()[1] if needs_topology else frames[0]
    np.testing.assert_allclose(reference, expected, atol=PRECISION[fmt] + 1e-7)
    # Training frames and features are those of the published layout (features: same bond graph).
    ds, ref = PeptideDataset(data, encoding="atoms"), PeptideDataset(shipped, encoding="atoms", max_frames=25)
    torch.testing.assert_close(ds.features["run1"], ref.features["ala2"])
    # centred: the error of an atom plus that of the mean, in model units (x 30)
    torch.testing.assert_close(ds.positions["run1"], ref.positions["ala2"], atol=2 * 30 * PRECISION[fmt] + 1e-5, rtol=0)
    pdb = data.write_topology_pdb(tmp_path / "topology.pdb")
    assert mdtraj.load(str(pdb)).n_frames == 1 and mdtraj.load_topology(str(pdb)).n_atoms == 22


def test_find_md_data_errors(shipped: MDData, tmp_path: Path) -> None:
    assert find_md_data([ALANINE_DIPEPTIDE_DIR]) == [shipped]
    with pytest.raises(InputError, match="goes with trajectory files"):
        find_md_data([ALANINE_DIPEPTIDE_DIR], shipped.topology)
    with pytest.raises(InputError, match="no such file"):
        find_md_data([tmp_path / "missing.xtc"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="trajectory mdtraj reads"):
        find_md_data([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="topology file not found"):
        find_md_data([shipped.trajectory], tmp_path / "none.pdb")
    with pytest.raises(InputError, match=r"no \*-traj-arrays.npz"):
        find_md_data([tmp_path])
    # A trajectory whose atom count differs from the topology's is named.
    topology, frames = shipped.load()
    short = write_trajectory(frames[:3, :21], topology.subset(range(21)), tmp_path / "short.dcd")
    with pytest.raises(InputError, match="short.dcd"):
        find_md_data([short], shipped.topology)[0].load()


def test_write_trajectory_checks(shipped: MDData, tmp_path: Path) -> None:
    topology, frames = shipped.load()
    with pytest.raises(ValueError, match="write one of"):
        write_trajectory(frames[:2], topology, tmp_path / "x.gro")
    with pytest.raises(ValueError, match="22 atoms"):
        write_trajectory(frames[:2, :5], topology, tmp_path / "x.dcd")
    first = write_trajectory(frames[:2], topology, tmp_path / "x.dcd")
    write_trajectory(frames[2:5], topology, first)  # overwrites
    assert mdtraj.load(str(first), top=topology).n_frames == 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcd"]  # no temporary file left
    assert trajectory_format("a.pdb.gz") == ".pdb.gz" and trajectory_format("a.npz") is None


def test_default_temperature(shipped: MDData) -> None:
    assert default_temperature(shipped.load_topology()) == 300.0  # capped: alanine dipeptide setting
    assert default_temperature(shipped.structure()[0]) == 300.0
    assert default_temperature(build_peptide("AY").topology) == 310.0
