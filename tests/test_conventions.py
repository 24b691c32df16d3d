"""The published conventions docs/model.md states that no other test pins: units and temperatures, the
module's options, the published alanine-dipeptide table and its quirk, the transfer encoding's rules, the
training and sampling defaults, the bond cutoffs and the MD settings. Expected values are written out
here from the description in docs/model.md, not read from the code under test."""
from __future__ import annotations

import inspect
import logging
import math

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import pytest
import torch

import tbg
from tbg import chem
from tbg.chem import encoding
from tbg.evaluate import bond_cutoffs, bond_pairs
from tbg.flow import RaggedLoader, SampleConfig, SolverConfig, TrainConfig, train

SHIPPED_PDB = chem.ALANINE_DIPEPTIDE_DIR / "ala2-traj-state0.pdb"


def _dipeptide_topology(first: str, second: str) -> mdtraj.Topology:
    """Residues only (no atoms): enough for the rules that look at residue names."""
    top = mdtraj.Topology()
    chain = top.add_chain()
    for name in (first, second):
        top.add_residue(name, chain)
    return top


def test_model_units_and_temperatures() -> None:
    assert chem.SCALE == 30.0
    x = np.random.default_rng(0).normal(size=(2, 5, 3))
    np.testing.assert_array_equal(chem.units.to_nm(x * 30.0, "scaled"), x * 30.0 / 30.0)
    assert chem.kT(300.0) == pytest.approx(8.314462618e-3 * 300.0, rel=1e-9)  # R T in kJ/mol
    # Training frames are centred per frame, then scaled: (positions - mean) x 30.
    topology, positions = chem.load_trajectory(chem.ALANINE_DIPEPTIDE_DIR, "ala2")
    frames = chem.PeptideDataset(chem.ALANINE_DIPEPTIDE_DIR, encoding="atoms", max_frames=3).frames_of("ala2")
    expected = (positions[:3].astype(np.float64) - positions[:3].mean(1, keepdims=True)) * 30.0
    np.testing.assert_allclose(frames.numpy(), expected, rtol=1e-6, atol=1e-5)
    # 300 K for capped peptides (alanine dipeptide), 310 K for the zwitterionic dipeptides.
    assert chem.default_temperature(topology) == 300.0
    assert chem.default_temperature(_dipeptide_topology("ALA", "TYR")) == 310.0


def test_published_egnn_options() -> None:
    model = tbg.EGNN(7)
    assert (model.hidden, model.n_layers, model.coords_range) == (64, 5, 15.0)
    assert model.attention and model.tanh and model.layer_range == 15.0 / 5
    assert (model.embedding.in_features, model.embedding.out_features) == (8, 64)  # features + t
    assert (model.embedding_out.in_features, model.embedding_out.out_features) == (64, 8)
    for gcl in model.layers:
        last = gcl.coord_mlp[2]
        assert last.bias is None and last.weight.shape == (1, 64)
        bound = 0.001 * math.sqrt(6.0 / (64 + 1))  # Xavier-uniform with gain 0.001
        assert last.weight.abs().max() <= bound and last.weight.abs().max() > bound / 2
        assert isinstance(gcl.coord_mlp[-1], torch.nn.Tanh)


def test_published_alanine_dipeptide_encoding(caplog: pytest.LogCaptureFixture) -> None:
    classes = list(range(22))
    for group, cls in (((1, 2, 3), 2), ((11, 12, 13), 12), ((19, 20, 21), 20)):
        for atom in group:
            classes[atom] = cls
    table = chem.published_alanine_dipeptide_encoding()
    assert table.shape == (22, 21) and table.dtype == torch.float32  # width = largest class + 1
    assert torch.equal(table, torch.nn.functional.one_hot(torch.tensor(classes), 21).float())
    # The quirk: atom 1 (ACE's methyl carbon in openmmtools' order) shares its class with atoms 2 and 3,
    # while atom 0 (one of that carbon's hydrogens) keeps a class of its own.
    assert classes[0] == 0 and classes[1] == classes[2] == classes[3]
    # A 21-column checkpoint and a 22-atom molecule get this table, with a warning about the atom order.
    topology = mdtraj.load_topology(str(SHIPPED_PDB))
    with caplog.at_level(logging.WARNING, logger="tbg"):
        assert torch.equal(chem.features_for_width(topology, 21), table)
    assert "openmmtools atom order" in caplog.text


def test_transfer_encoding_rules() -> None:
    standard = ("ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL").split()
    assert chem.AMINO_ACID_ORDER == tuple(standard)  # alphabetical by three-letter code
    for variant, acid in (("HID", "HIS"), ("HIE", "HIS"), ("HIP", "HIS"), ("CYX", "CYS"), ("ASH", "ASP"),
                          ("GLH", "GLU"), ("LYN", "LYS")):
        assert encoding.canonical_residue(variant) == acid
    rule = {("ALA", "HB1"): "HB", ("LYS", "HZ3"): "HZ", ("GLY", "HA2"): "HA", ("ALA", "H2"): "H",
            ("PHE", "HD1"): "HD1", ("TRP", "HZ2"): "HZ2", ("TYR", "HH"): "HH", ("HIS", "HE2"): "HE2",
            ("ASP", "OD1"): "OD", ("GLU", "OE2"): "OE", ("THR", "OG1"): "OG1", ("ILE", "CD1"): "CD1",
            ("ARG", "NH1"): "NH1", ("LEU", "CD2"): "CD2"}
    assert {key: encoding.atom_type_name(*key) for key in rule} == rule
    assert encoding.TRANSFER_WIDTH == 2 + 20 + len(chem.default_atom_types()) == 76


def test_published_training_and_sampling_defaults(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig()
    assert (config.lr, config.lr_gamma, config.sigma) == (5e-4, 0.1, 0.01)
    assert (config.coupling, config.ema_decay, config.grad_clip) == ("independent", None, None)
    solver = SolverConfig()
    assert (solver.method, solver.atol, solver.rtol) == ("dopri5", 1e-4, 1e-4)
    sampling = SampleConfig()
    assert (sampling.likelihood, sampling.batch_size, sampling.solver) == ("joint", 500, solver)
    # The optimizer is Adam (not AdamW or SGD) at the configured learning rate.
    made = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs) -> None:  # noqa: ANN001
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    items = [(torch.randn(3, 3), torch.eye(3)[:, :2], f"m{k}") for k in range(2)]
    train(tbg.EGNN(2, 8, 1), RaggedLoader(items, 2), tmp_path, TrainConfig(n_steps=1, progress=False))
    assert made == [{"lr": 5e-4}]


def test_bond_cutoffs() -> None:
    elements = ["H", "S", "C", "N", "O"]
    expected = np.array([[0.00, 0.14, 0.14, 0.14, 0.14],    # H first: any pair with a hydrogen
                         [0.14, 0.00, 0.22, 0.22, 0.22],    # then S
                         [0.14, 0.22, 0.00, 0.18, 0.18],    # then C
                         [0.14, 0.22, 0.18, 0.00, 0.00],    # N-O, N-N, O-O: never bonded
                         [0.14, 0.22, 0.18, 0.00, 0.00]])
    np.testing.assert_array_equal(bond_cutoffs(elements), expected)
    assert bond_cutoffs(["C", "C"])[0, 1] == 0.18 and bond_cutoffs(["N", "N"])[0, 1] == 0.0
    # "below" the cutoff: strictly shorter bonds only.
    for distance, bonded in ((0.1799, True), (0.1801, False)):
        assert (bond_pairs(np.array([[0.0, 0.0, 0.0], [distance, 0.0, 0.0]]), ["C", "C"]) == [(0, 1)]) == bonded


def test_published_md_settings() -> None:
    assert chem.forcefield.DEFAULT_FORCEFIELD_FILES == ("amber14-all.xml", "implicit/obc1.xml")
    assert (chem.DIPEPTIDE_TEMPERATURE, chem.ALANINE_DIPEPTIDE_TEMPERATURE) == (310.0, 300.0)
    system = chem.create_system(app.PDBFile(str(SHIPPED_PDB)).topology)
    assert system.getNumConstraints() == 0
    forces = {type(f).__name__: f for f in system.getForces()}
    for name in ("NonbondedForce", "CustomGBForce"):  # OBC1 implicit solvent is a CustomGBForce in OpenMM
        assert forces[name].getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic
        assert forces[name].getCutoffDistance().value_in_unit(u.nanometer) == pytest.approx(2.0)
    defaults = {k: p.default for k, p in inspect.signature(chem.simulate).parameters.items()}
    assert (defaults["timestep_fs"], defaults["friction_per_ps"], defaults["frame_interval_steps"]) == (0.5, 0.3, 10000)
    assert defaults["constraints"] is None and defaults["temperature"] is None  # None: default_temperature
