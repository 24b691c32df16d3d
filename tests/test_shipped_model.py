"""The shipped alanine-dipeptide model (tbg/data/models/alanine-dipeptide): it is complete, loads, gives
the field recorded when it was shipped, and >= 95% of 64 samples are correct configurations."""
import csv
import json

import mdtraj as md
import numpy as np
import pytest
import torch

import tbg
from tbg.chem import ALANINE_DIPEPTIDE_DIR, SCALE, encode_atoms, load_trajectory
from tbg.evaluate.validity import ValidityChecker
from tbg.flow import MeanFreeGaussian, SolverConfig, integrate
from tbg.flow.runs import FINETUNING_RUN, SHIPPED_MODELS, TRAINING_RUN, held_out_record, read_train_log, split_frames

MODEL = SHIPPED_MODELS["alanine-dipeptide"]
# Issue 14's target for 64 samples; the shipped model gave 96.9-100% over seeds 0-4 (seed 0: 96.9%).
TARGET_VALID = 0.95


@pytest.fixture(scope="module")
def shipped() -> tuple[tbg.EGNN, torch.Tensor, md.Topology]:
    topology = md.load(str(MODEL / "topology.pdb")).topology
    return tbg.nn.load_egnn(MODEL / "model.pt"), encode_atoms(topology), topology


# The stages after flow matching: (record name, its log, the step of the shipped weights in model.pt's meta).
FINETUNING_STAGES = (("finetune", "energy_log.csv", "finetune_step"),
                     ("max_likelihood", "max_likelihood_log.csv", "max_likelihood_step"),
                     ("max_likelihood_2", "max_likelihood_2_log.csv", "max_likelihood_2_step"),
                     ("max_likelihood_3", "max_likelihood_3_log.csv", "max_likelihood_3_step"),
                     ("max_likelihood_4", "max_likelihood_4_log.csv", "max_likelihood_4_step"),
                     ("max_likelihood_5", "max_likelihood_5_log.csv", "max_likelihood_5_step"))


def test_shipped_model_folder_is_complete():
    records = [f"{name}.{kind}.json" for name, *_ in (("training",), *FINETUNING_STAGES) for kind in ("run", "config")]
    for name in ("model.pt", "topology.pdb", "train_log.csv", "README.md", "field_check.npz", *records,
                 *(log for _, log, _ in FINETUNING_STAGES)):
        assert (MODEL / name).is_file(), name
    assert (MODEL / "model.pt").stat().st_size < 2**20
    training = json.loads((MODEL / "training.run.json").read_text())
    assert training["kind"] == TRAINING_RUN and training["defines"]["coupling"] == "aligned"
    for name, *_ in FINETUNING_STAGES:
        record = json.loads((MODEL / f"{name}.run.json").read_text())
        assert record["kind"] == FINETUNING_RUN
        assert record["defines"]["objective"] == ("reverse_kl" if name == "finetune" else "max_likelihood")
    meta = torch.load(MODEL / "model.pt", map_location="cpu", weights_only=True)["tbg"]
    # The logs end where the shipped weights were taken, and the README names the steps of every stage.
    assert read_train_log(MODEL)[-1]["step"] == meta["flow_matching_step"]
    for _, log, key in FINETUNING_STAGES:
        with (MODEL / log).open() as fh:
            assert int(list(csv.DictReader(fh))[-1]["step"]) == meta[key], log
    readme = (MODEL / "README.md").read_text()
    for key in ("flow_matching_step", *(key for *_, key in FINETUNING_STAGES)):
        assert f"step {meta[key]}" in readme, key
    # No stage has trained on the MD frames stage 1 held out for validation.
    (held_out,) = held_out_record(MODEL / "model.pt").values()
    assert held_out["frames"] == 10000 and held_out["indices"].tolist() == sorted(split_frames(10000, 0.1, 0)[1])


def test_shipped_model_matches_the_shipped_data(shipped):
    _, features, topology = shipped
    data_topology, _ = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
    assert [(a.residue.name, a.name) for a in topology.atoms] == \
        [(a.residue.name, a.name) for a in data_topology.atoms]
    assert features.shape == (22, 22)


@pytest.mark.parametrize("backend,dtype,tol", [("reference", torch.float64, 1e-10),
                                               ("auto", torch.float32, 2e-4)])
def test_shipped_model_reproduces_its_recorded_field(shipped, backend, dtype, tol):
    egnn, features, _ = shipped
    check = np.load(MODEL / "field_check.npz")
    t, x, expected = (torch.from_numpy(check[k]) for k in ("t", "x", "velocity"))
    with torch.no_grad():
        v = tbg.BoundDynamics(egnn.to(dtype), features.to(dtype), backend=backend)(t.to(dtype), x.to(dtype))
    scale = expected.abs().max()
    assert scale > 0.1  # the check is not of a zero field
    torch.testing.assert_close(v.double(), expected, atol=tol * scale, rtol=tol)


def _valid_fraction(shipped, n: int, seed: int) -> float:
    egnn, features, topology = shipped
    prior = MeanFreeGaussian(topology.n_atoms)
    z = prior.sample(n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = integrate(tbg.BoundDynamics(egnn.float(), features), z, likelihood=False,
                      solver=SolverConfig("dopri5", atol=1e-5, rtol=1e-5)).x
    _, md_positions = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
    checker = ValidityChecker(topology, md_positions[0])
    return float(checker.check(x.reshape(n, -1, 3).numpy() / SCALE).valid.mean())


def test_shipped_model_samples_are_valid(shipped):
    assert _valid_fraction(shipped, 64, seed=0) >= TARGET_VALID
