"""tbg.chem: peptides, force field, energies (vs direct OpenMM), encodings, resumable MD, datasets."""
from __future__ import annotations

import os
import pickle

import mdtraj
import numpy as np
import openmm
import openmm.unit as u
import pytest
import torch

import tbg.chem as chem
from tbg.chem import encoding as enc
from tbg.chem import md as chem_md


@pytest.fixture(scope="module")
def ala2() -> chem.Peptide:
    return chem.alanine_dipeptide()


@pytest.fixture(scope="module")
def ay() -> chem.Peptide:
    return chem.build_peptide("AY")


def _direct_reduced(system: openmm.System, positions_nm: np.ndarray, temperature: float, platform: str):
    """U/kT and forces/kT from a fresh OpenMM context per configuration (the oracle)."""
    kt = (u.MOLAR_GAS_CONSTANT_R * temperature * u.kelvin).value_in_unit(u.kilojoule_per_mole)
    energies, forces = [], []
    for x in positions_nm:
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
        ctx.setPositions(x * u.nanometer)
        st = ctx.getState(getEnergy=True, getForces=True)
        energies.append(st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) / kt)
        forces.append(st.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer) / kt)
    return np.array(energies), np.array(forces)


def _perturbed(peptide: chem.Peptide, n: int, sigma: float = 0.005, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return peptide.positions[None] + rng.normal(0.0, sigma, (n, peptide.n_atoms, 3))


# ----------------------------------------------------------------------------------------- peptides


def test_alanine_dipeptide_builds(ala2: chem.Peptide) -> None:
    assert ala2.name == "ala2" and ala2.n_atoms == 22 and ala2.capped
    assert [r.name for r in ala2.topology.residues()] == ["ACE", "ALA", "NME"]
    assert ala2.mdtraj_topology.n_atoms == 22
    # hydrogens follow amber/PDB names
    ala = [a.name for a in list(ala2.topology.residues())[1].atoms()]
    assert {"H", "HA", "HB1", "HB2", "HB3"} <= set(ala)


def test_zwitterion_and_pdb_roundtrip(ay: chem.Peptide, tmp_path) -> None:
    names = [[a.name for a in r.atoms()] for r in ay.topology.residues()]
    assert {"H", "H2", "H3"} <= set(names[0]) and "OXT" in names[1]  # NH3+ ... COO-
    path = ay.to_pdb(tmp_path / "AY.pdb")
    traj = mdtraj.load(str(path))
    assert traj.n_atoms == ay.n_atoms
    np.testing.assert_allclose(traj.xyz[0], ay.positions, atol=2e-4)  # PDB keeps 0.001 nm


@pytest.mark.parametrize("bad, letter", [("AZ", "'Z'"), ("XA", "'X'"), ("ABJ", "'B', 'J'")])
def test_unknown_residue_letter_named(bad: str, letter: str) -> None:
    with pytest.raises(ValueError, match=letter):
        chem.build_peptide(bad)


def test_length_limits() -> None:
    with pytest.raises(ValueError, match="2-8 residues"):
        chem.build_peptide("A")
    with pytest.raises(ValueError, match="2-8 residues"):
        chem.build_peptide("A" * 9)


def test_longer_and_capped_peptides() -> None:
    pep = chem.build_peptide("ACDKW")
    assert pep.name == "ACDKW" and len(list(pep.topology.residues())) == 5
    with pytest.raises(ValueError, match="n_positions=2"):
        chem.encode_transfer(pep.topology)
    feats = chem.encode_transfer(pep.topology, n_positions=8)
    assert feats.shape == (pep.n_atoms, 8 + 20 + 54)
    capped = chem.build_peptide("GY", capped=True)
    assert capped.name == "Ace-GY-Nme"
    assert [r.name for r in capped.topology.residues()] == ["ACE", "GLY", "TYR", "NME"]


# ----------------------------------------------------------------------------------------- energies


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_reduced_energy_matches_openmm(ala2: chem.Peptide, platform: str) -> None:
    x = _perturbed(ala2, 6)
    model = chem.EnergyModel(ala2, platform=platform)
    assert model.temperature == chem.ALANINE_DIPEPTIDE_TEMPERATURE
    expected_u, expected_f = _direct_reduced(model.system, x, 300.0, platform)
    np.testing.assert_allclose(model.reduced_energy(x, unit="nm"), expected_u, rtol=1e-6)
    np.testing.assert_allclose(model.forces(x, unit="nm"), expected_f, rtol=1e-6, atol=1e-6 * np.abs(expected_f).max())


def test_units(ay: chem.Peptide) -> None:
    model = chem.EnergyModel(ay, platform="Reference")
    assert model.temperature == chem.DIPEPTIDE_TEMPERATURE
    # k_B N_A T at 310 K in kJ/mol (CODATA: R = 8.314462618 J/mol/K)
    assert model.kT == pytest.approx(8.314462618e-3 * 310.0, rel=1e-9)
    x = _perturbed(ay, 3)
    u_nm = model.reduced_energy(x, unit="nm")
    np.testing.assert_allclose(model.reduced_energy(x * chem.SCALE, unit="scaled"), u_nm, rtol=1e-12)
    np.testing.assert_allclose(model.reduced_energy(torch.tensor(x * 30.0).reshape(3, -1), unit="scaled"), u_nm,
                               rtol=1e-12)
    np.testing.assert_allclose(model.potential_energy(x, unit="nm"), u_nm * model.kT, rtol=1e-12)
    hot = chem.EnergyModel(ay, platform="Reference", temperature=620.0)
    np.testing.assert_allclose(hot.reduced_energy(x, unit="nm"), u_nm / 2, rtol=1e-12)
    # forces are -du/dx in kT/nm: central finite differences along a random direction
    direction = np.random.default_rng(1).normal(size=x[0].shape)
    h = 1e-5
    fd = (model.reduced_energy(x[:1] + h * direction, unit="nm") -
          model.reduced_energy(x[:1] - h * direction, unit="nm")) / (2 * h)
    f = model.forces(x[:1], unit="nm")[0]
    assert -np.sum(f * direction) == pytest.approx(fd[0], rel=1e-4)
    # forces stay in kT/nm whatever unit the positions come in
    np.testing.assert_allclose(model.forces(x[:1] * chem.SCALE, unit="scaled")[0], f, rtol=1e-10)
    with pytest.raises(ValueError, match="unit must be"):
        model.reduced_energy(x, unit="angstrom")
    with pytest.raises(ValueError, match="positions must be"):
        model.reduced_energy(x[:, :-1], unit="nm")


def test_wild_configurations_give_inf(ala2: chem.Peptide) -> None:
    x = np.repeat(ala2.positions[None], 6, axis=0)
    x[1, 3] = np.nan                      # NaN coordinate
    x[2] = 0.0                            # everything collapsed onto one point
    x[3, 5] = x[3, 4]                     # two atoms on top of each other
    x[4, 7] = np.inf
    x[5] *= 1e12                          # exploded
    for model in (chem.EnergyModel(ala2, platform="Reference"), chem.EnergyModel(ala2, platform="CPU")):
        u_red, bad = model.reduced_energy(x, unit="nm", return_flags=True)
        assert bad.tolist() == [False, True, True, True, True, bool(bad[5])]
        assert np.isfinite(u_red[0]) and np.isinf(u_red[1:5]).all() and (u_red[1:5] > 0).all()
        assert np.isinf(u_red[5]) == bad[5] and (np.isinf(u_red[5]) or u_red[5] > 1e10)
        f, fbad = model.forces(x, unit="nm", return_flags=True)
        assert np.isfinite(f[0]).all() and np.isnan(f[1:5]).all() and (fbad == bad).all()


def test_worker_pool_matches_single_process(ala2: chem.Peptide) -> None:
    x = _perturbed(ala2, 9)
    x[4, 2] = np.nan
    single = chem.EnergyModel(ala2, platform="Reference")
    with chem.EnergyModel(ala2, platform="Reference", n_workers=2, chunk_size=2) as pool:
        u_pool, bad = pool.reduced_energy(x, unit="nm", return_flags=True)
        f_pool = pool.forces(x[:3], unit="nm")
    np.testing.assert_allclose(u_pool, single.reduced_energy(x, unit="nm"), rtol=1e-12)
    np.testing.assert_allclose(f_pool, single.forces(x[:3], unit="nm"), rtol=1e-12)
    assert bad.tolist() == [i == 4 for i in range(9)]


# ----------------------------------------------------------------------------------------- encodings


def test_default_atom_types_match_rule_on_templates() -> None:
    table = chem.default_atom_types()
    assert len(table) == 54 and sorted(table.values()) == list(range(54))
    # derived from the amber14 templates with the naming rule, in alphabetical order
    assert enc.template_atom_types() == sorted(table) == list(table)


def test_ala2_encodings(ala2: chem.Peptide) -> None:
    feats = chem.encode_transfer(ala2.topology)
    assert feats.shape == (22, 76) and feats.dtype == torch.float32
    assert torch.equal(feats.sum(1), torch.full((22,), 3.0))
    assert torch.equal(feats[:, :2].sum(0), torch.tensor([22.0, 0.0]))      # caps belong to the Ala position
    assert torch.equal(feats[:, 2:22].argmax(1), torch.zeros(22, dtype=torch.long))  # ALA = 0
    types = chem.atom_type_indices(ala2.topology)
    table = chem.default_atom_types()
    names = [a.name for a in ala2.topology.atoms()]
    # methyl carbons of the caps are typed CA, their hydrogens HA (documented cap rule)
    assert types[names.index("CH3")] == table["CA"]
    atoms = chem.encode_atoms(ala2.topology)
    assert atoms.shape == (22, 22)
    classes = chem.atom_classes(ala2.topology)
    assert len(set(classes.tolist())) == 22 - 3 * 2  # three methyl groups, each three hydrogens -> one class
    top = ala2.mdtraj_topology
    for c in set(classes.tolist()):
        members = np.flatnonzero(classes == c)
        if len(members) > 1:
            assert len(members) == 3 and all(top.atom(int(i)).element.symbol == "H" for i in members)
    bare = mdtraj.Topology()
    chain = bare.add_chain()
    for atom in top.atoms:
        bare.add_atom(atom.name, atom.element, bare.add_residue(atom.residue.name, chain))
    with pytest.raises(ValueError, match="no bonds"):
        chem.encode_atoms(bare)
    pub = chem.published_alanine_dipeptide_encoding()
    assert pub.shape == (22, 21) and torch.equal(pub.sum(1), torch.ones(22))


def test_encoding_errors_name_the_culprit(ay: chem.Peptide) -> None:
    top = ay.mdtraj_topology
    top.residue(1).name = "XYZ"
    with pytest.raises(ValueError, match="XYZ"):
        chem.encode_transfer(top)
    top = ay.mdtraj_topology
    top.atom(5).name = "QQ7"
    with pytest.raises(ValueError, match="QQ7"):
        chem.encode_transfer(top)


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch /tmp/tbg-pwned",))


def test_load_atom_types_is_safe(tmp_path) -> None:
    table = chem.default_atom_types()
    npy = tmp_path / "atom_types_ecoding.npy"
    np.save(npy, np.array(table, dtype=object), allow_pickle=True)   # as the published file was written
    assert chem.load_atom_types(npy) == table
    plain = tmp_path / "types.pkl"
    plain.write_bytes(pickle.dumps(table))
    assert chem.load_atom_types(plain) == table
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"C": 0, "x": _Evil()}))
    with pytest.raises(ValueError, match="refusing"):
        chem.load_atom_types(evil)
    assert not os.path.exists("/tmp/tbg-pwned")
    np_scalar = tmp_path / "npint.pkl"
    np_scalar.write_bytes(pickle.dumps({"C": np.int64(1), "N": 0}))
    assert chem.load_atom_types(np_scalar) == {"C": 1, "N": 0}
    evil_npy = tmp_path / "evil.npy"
    np.save(evil_npy, np.array({"C": _Evil()}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refusing"):
        chem.load_atom_types(evil_npy)
    not_table = tmp_path / "list.pkl"
    not_table.write_bytes(pickle.dumps(["C", "N"]))
    with pytest.raises(ValueError, match="dict of str"):
        chem.load_atom_types(not_table)
    with pytest.raises(FileNotFoundError):
        chem.load_atom_types(tmp_path / "missing.npy")
    feats = chem.encode_transfer(chem.alanine_dipeptide(minimize=False).topology, npy)
    assert feats.shape == (22, 76)


# ----------------------------------------------------------------------------------------- MD


class _Interrupt(Exception):
    pass


def test_hydrogen_mass_repartitioning(ala2: chem.Peptide) -> None:
    plain = chem.create_system(ala2.topology)
    hmr = chem.create_system(ala2.topology, hydrogen_mass_amu=3.0)

    def masses(system: openmm.System) -> np.ndarray:
        return np.array([system.getParticleMass(i).value_in_unit(u.amu) for i in range(system.getNumParticles())])

    m0, m1 = masses(plain), masses(hmr)
    hydrogen = np.array([a.element.symbol == "H" for a in ala2.topology.atoms()])
    assert np.isclose(m0.sum(), m1.sum(), rtol=0, atol=1e-9)  # total mass conserved
    np.testing.assert_allclose(m1[hydrogen], 3.0)
    # each heavy atom gives up exactly what its own hydrogens gained
    gained = np.zeros(len(m0))
    for bond in ala2.topology.bonds():
        a, b = bond.atom1, bond.atom2
        if (a.element.symbol == "H") != (b.element.symbol == "H"):
            h, heavy = (a, b) if a.element.symbol == "H" else (b, a)
            gained[heavy.index] += m1[h.index] - m0[h.index]
    np.testing.assert_allclose(m0[~hydrogen] - m1[~hydrogen], gained[~hydrogen], atol=1e-9)
    assert gained[~hydrogen].max() > 3.9  # the methyl carbons carry three hydrogens
    # the potential energy, hence exp(-U/kT), does not depend on the masses
    rng = np.random.default_rng(0)
    positions = ala2.positions[None] + rng.normal(0, 0.003, (3, ala2.n_atoms, 3))
    e0, f0 = _direct_reduced(plain, positions, 300.0, "Reference")
    e1, f1 = _direct_reduced(hmr, positions, 300.0, "Reference")
    np.testing.assert_array_equal(e0, e1)
    np.testing.assert_array_equal(f0, f1)
    with pytest.raises(ValueError, match="between 1 and 4"):
        chem.create_system(ala2.topology, hydrogen_mass_amu=6.0)


def test_simulation_interrupted_and_resumed(tmp_path, monkeypatch) -> None:
    kwargs = dict(n_frames=8, frame_interval_steps=20, equilibration_steps=40, checkpoint_every_frames=3,
                  threads=1, progress=False, platform="CPU")
    real_tqdm = chem_md.tqdm

    def interrupting_tqdm(iterable, *a, **k):  # noqa: ANN001, ANN202 - dies after 5 production frames
        for i, item in enumerate(real_tqdm(iterable, *a, **k)):
            if k.get("desc") == "ala2" and i == 5:
                raise _Interrupt
            yield item

    monkeypatch.setattr(chem_md, "tqdm", interrupting_tqdm)
    with pytest.raises(_Interrupt):
        chem.simulate("ala2", tmp_path, **kwargs)
    topology, partial = chem.load_trajectory(tmp_path, "ala2")
    assert len(partial) == 3  # the last checkpoint, not the 5 frames in memory
    monkeypatch.setattr(chem_md, "tqdm", real_tqdm)
    path = chem.simulate("ala2", tmp_path, **kwargs)
    with np.load(path) as arrays:
        steps, positions = arrays["step"], arrays["positions"]
    assert steps.tolist() == [20 * (k + 1) for k in range(8)]  # no gap, no duplicate
    np.testing.assert_array_equal(positions[:3], partial)       # saved frames kept
    # continuity: consecutive frames 20 steps (10 fs) apart differ by small displacements everywhere
    jumps = np.linalg.norm(np.diff(positions, axis=0), axis=2).max(axis=1)
    assert jumps.max() < 0.05, jumps
    traj = mdtraj.Trajectory(positions, topology)
    traj_pdb = mdtraj.load(str(tmp_path / "ala2-traj-state0.pdb"))
    assert traj_pdb.n_atoms == 22 and np.isfinite(mdtraj.compute_phi(traj)[1]).all()
    # resuming with other settings is refused
    with pytest.raises(ValueError, match="other settings"):
        chem.simulate("ala2", tmp_path, **{**kwargs, "timestep_fs": 1.0})
    info = (tmp_path / "ala2-traj-info.json").read_text()
    assert '"n_frames": 8' in info and "ns_per_day" in info


# ----------------------------------------------------------------------------------------- datasets


def test_shipped_alanine_dipeptide_data() -> None:
    topology, positions = chem.load_trajectory(chem.ALANINE_DIPEPTIDE_DIR, "ala2")
    assert topology.n_atoms == 22 and positions.dtype == np.float32 and len(positions) >= 10000
    traj = mdtraj.Trajectory(positions, topology)
    phi, psi = mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]
    assert (phi < 0).mean() > 0.9  # L-alanine: the left-handed region (phi > 0) is rare at 300 K
    # the extended (beta/PII) and alpha_R basins are both well visited, with many transitions
    extended = (phi < 0) & ((psi > 1.5) | (psi < -2.5))
    alpha_r = (phi < 0) & (psi > -1.5) & (psi < 0.5)
    assert extended.mean() > 0.2 and alpha_r.mean() > 0.2
    assert np.count_nonzero(np.diff(extended.astype(int))) > 100
    model = chem.EnergyModel(topology)
    assert model.temperature == 300.0  # capped -> the alanine dipeptide setting
    assert np.isfinite(model.reduced_energy(positions[::50], unit="nm")).all()


def test_shipped_data_is_the_unconstrained_ensemble() -> None:
    """No X-H bond is constrained: each bond's length spreads as the force field's thermal spread,
    sqrt(kT / k) for its harmonic force constant k (a constrained bond would spread by float32 rounding)."""
    topology, positions = chem.load_trajectory(chem.ALANINE_DIPEPTIDE_DIR, "ala2")
    system = chem.create_system(topology.to_openmm())
    bond_force = next(f for f in system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    hydrogen = {a.index for a in topology.atoms if a.element.symbol == "H"}
    kt = chem.kT(300.0)
    checked = 0
    for k in range(bond_force.getNumBonds()):
        i, j, _, stiffness = bond_force.getBondParameters(k)
        if (i in hydrogen) == (j in hydrogen):
            continue
        length = np.linalg.norm(positions[:, i] - positions[:, j], axis=1)
        expected = np.sqrt(kt / stiffness.value_in_unit(u.kilojoule_per_mole / u.nanometer**2))
        assert 0.9 < length.std() / expected < 1.1, (i, j, length.std(), expected)
        checked += 1
    assert checked == 12


def test_shipped_frames_energies_match_direct_openmm() -> None:
    """The shipped frames through EnergyModel equal a fresh OpenMM evaluation of the same System, and their
    mean reduced energy is the recorded one (data README: -35.4 +- 0.2 over every 10th frame)."""
    topology, positions = chem.load_trajectory(chem.ALANINE_DIPEPTIDE_DIR, "ala2")
    frames = positions[::500].astype(np.float64)
    with chem.EnergyModel(topology, platform="Reference") as model:
        u_model = model.reduced_energy(frames, unit="nm")
        u_direct, _ = _direct_reduced(model.system, frames, 300.0, "Reference")
    np.testing.assert_allclose(u_model, u_direct, rtol=1e-9, atol=1e-9)
    with chem.EnergyModel(topology) as model:
        mean = model.reduced_energy(positions[::10], unit="nm").mean()
    assert abs(mean - (-35.4)) < 0.1


def _write_fake_layout(directory, peptide: chem.Peptide, n: int, seed: int) -> None:
    peptide.to_pdb(directory / f"{peptide.name}-traj-state0.pdb")
    pos = _perturbed(peptide, n, 0.002, seed).astype(np.float32)
    np.savez(directory / f"{peptide.name}-traj-arrays.npz", positions=pos, step=np.arange(1, n + 1) * 10000)


def test_dataset_batches(tmp_path, ala2: chem.Peptide, ay: chem.Peptide) -> None:
    _write_fake_layout(tmp_path, ay, 5, 0)
    _write_fake_layout(tmp_path, ala2, 4, 1)
    ds = chem.PeptideDataset(tmp_path, encoding="transfer")
    assert ds.names == ["AY", "ala2"] and len(ds) == 9
    _, raw = chem.load_trajectory(tmp_path, "AY")
    x, f, name = ds[2]
    assert name == "AY" and f.shape == (ay.n_atoms, 76)
    expected = (raw[2] - raw[2].astype(np.float64).mean(0)) * 30.0
    torch.testing.assert_close(x, torch.from_numpy(expected.astype(np.float32)), rtol=1e-5, atol=1e-5)
    batch = chem.collate_ragged([ds[0], ds[6], ds[-1]])
    assert batch.names == ["AY", "ala2", "ala2"]
    assert batch.mol_ptr.tolist() == [0, ay.n_atoms, ay.n_atoms + 22, ay.n_atoms + 44]
    assert batch.x.shape == (ay.n_atoms + 44, 3) and batch.features.shape == (ay.n_atoms + 44, 76)
    for b in range(3):
        s, e = batch.mol_ptr[b], batch.mol_ptr[b + 1]
        assert batch.x[s:e].mean(0).abs().max() < 1e-4
    moved = batch.to("cpu")
    assert moved.mol_ptr.dtype == torch.int64 and moved.names == batch.names
    empty = chem.collate_ragged([])
    assert empty.x.shape == (0, 3) and empty.mol_ptr.tolist() == [0]
    single = chem.PeptideDataset(tmp_path / "ala2-traj-arrays.npz", encoding="atoms")
    assert len(single) == 4 and single[0][1].shape == (22, 22)
    with pytest.raises(ValueError, match="different widths"):
        chem.PeptideDataset(tmp_path, encoding="atoms")
    with pytest.raises(FileNotFoundError):
        chem.load_trajectory(tmp_path, "GG")
    # loader: a torch DataLoader works with collate_ragged
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=chem.collate_ragged)
    assert sum(b.n_molecules for b in loader) == 9


def test_split_by_peptide() -> None:
    names = chem.all_dipeptides()
    assert len(names) == 400 and len(set(names)) == 400
    train, test = chem.split_by_peptide(names, 0.25, seed=3)
    assert len(test) == 100 and len(train) == 300 and not set(train) & set(test)
    assert set(train) | set(test) == set(names)
    assert chem.split_by_peptide(names, 0.25, seed=3) == (train, test)
    assert chem.split_by_peptide(names, 0.25, seed=4) != (train, test)


def test_simulate_many_in_parallel(tmp_path, ay: chem.Peptide) -> None:
    results = chem.simulate_many([ay, "GG"], tmp_path, processes=2, n_frames=3, frame_interval_steps=10,
                                 equilibration_steps=10, platform="CPU")
    assert sorted(results) == ["AY", "GG"]
    for name, path in results.items():
        topology, positions = chem.load_trajectory(path)
        assert positions.shape == (3, topology.n_atoms, 3)
    assert chem.PeptideDataset(tmp_path).names == ["AY", "GG"]


def test_torch_reduced_energy_gradient_is_minus_forces(ala2: chem.Peptide) -> None:
    """The differentiable energy: values as reduced_energy, gradients by central differences (float64),
    in model units (nm x 30); invalid configurations give +inf and a zero gradient."""
    model = chem.EnergyModel(ala2, platform="Reference")
    rng = np.random.default_rng(3)
    x_nm = ala2.positions[None] + rng.normal(0, 0.002, (2, ala2.n_atoms, 3))
    x = torch.tensor(x_nm * chem.SCALE, dtype=torch.float64, requires_grad=True)
    u_red = model.torch_reduced_energy(x)
    np.testing.assert_allclose(u_red.detach().numpy(), model.reduced_energy(x_nm, unit="nm"), rtol=1e-12)
    (grad,) = torch.autograd.grad((u_red * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum(), x)
    h = 1e-4  # model units
    for b, atom, k in [(0, 0, 0), (0, 7, 2), (1, 21, 1)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[b, atom, k] += h
        xm[b, atom, k] -= h
        fd = (model.reduced_energy(xp.numpy(), unit="scaled")[b] - model.reduced_energy(xm.numpy(), unit="scaled")[b]) / (2 * h)
        assert grad[b, atom, k].item() == pytest.approx([1.0, -2.0][b] * fd, rel=1e-4, abs=1e-6)
    broken = x.detach().clone()
    broken[0, 1] = broken[0, 0]  # two atoms on top of each other
    broken.requires_grad_(True)
    u_b = model.torch_reduced_energy(broken)
    assert torch.isinf(u_b[0]) and torch.isfinite(u_b[1])
    (g_b,) = torch.autograd.grad(u_b[1], broken)
    assert (g_b[0] == 0).all()
