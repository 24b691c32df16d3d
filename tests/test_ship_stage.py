"""tools/ship_stage.py: a finished fine-tuning run becomes the next stage of a shipped model, with its records,
and the tool refuses runs that do not continue the shipped stages."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch

import tbg
from tbg.chem import encode_atoms
from tbg.errors import InputError
from tbg.flow.runs import SHIPPED_MODELS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = SHIPPED_MODELS["alanine-dipeptide"]
LAST_STAGE = "max_likelihood_4"  # a shipped stage whose records serve as the fake run's


def _tool():
    spec = importlib.util.spec_from_file_location("ship_stage", ROOT / "tools" / "ship_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ship_stage = _tool().ship_stage


def _plain(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "held_out"}


def _field(model_dir: Path, checkpoint: Path) -> np.ndarray:
    check = np.load(model_dir / "field_check.npz")
    topology = md.load(str(model_dir / "topology.pdb")).topology
    dyn = tbg.BoundDynamics(tbg.nn.load_egnn(checkpoint).double(), encode_atoms(topology).double(),
                            backend="reference")
    with torch.no_grad():
        return dyn(torch.from_numpy(check["t"]), torch.from_numpy(check["x"])).numpy()


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(model folder: a copy of the shipped one, run folder: a 3-step fine-tuning of its weights)."""
    model_dir = shutil.copytree(SHIPPED, tmp_path / "model")
    start = tmp_path / "ML8"
    start.mkdir()
    shutil.copy(SHIPPED / "model.pt", start / "model.pt")
    shipped = torch.load(SHIPPED / "model.pt", map_location="cpu", weights_only=True)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in shipped["model_state_dict"].items()}
    meta = {k: v for k, v in shipped["tbg"].items() if not k.endswith("_step")}
    run = tmp_path / "ML9"
    run.mkdir()
    torch.save({"model_state_dict": weights, "global_it": 3, "tbg": meta}, run / "model.pt")
    with (run / "energy_log.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss", "reduced_energy", "ess"])
        writer.writerows([[step, 2.0, "nan", "nan"] for step in (1, 2, 3)])
    (run / "validation_log.csv").write_text("step,frames,nll,nll_stderr\n0,64,-30.0,0.5\n3,64,-30.5,0.5\n")
    record = json.loads((SHIPPED / f"{LAST_STAGE}.run.json").read_text())
    record["info"]["checkpoint"] = str(start / "model.pt")
    (run / "run.json").write_text(json.dumps(record))
    config = json.loads((SHIPPED / f"{LAST_STAGE}.config.json").read_text())
    config["checkpoint"] = str(start)
    (run / "config.json").write_text(json.dumps(config))
    return model_dir, run


def test_a_run_becomes_the_next_stage(folders: tuple[Path, Path]) -> None:
    model_dir, run = folders
    before = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)["tbg"]
    meta = ship_stage(run, "max_likelihood_9", "ML8", model_dir)
    shipped = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    new = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert _plain(meta) == _plain(shipped["tbg"]) == {**_plain(before), "max_likelihood_9_step": 3}
    (key, held_out), = meta["held_out"].items()
    assert torch.equal(held_out["indices"], before["held_out"][key]["indices"])
    assert all(torch.equal(shipped["model_state_dict"][k], v) for k, v in new["model_state_dict"].items())
    # The recorded field is the new weights' field, which differs from the old one's.
    recorded = np.load(model_dir / "field_check.npz")["velocity"]
    np.testing.assert_array_equal(recorded, _field(model_dir, model_dir / "model.pt"))
    assert not np.allclose(recorded, np.load(SHIPPED / "field_check.npz")["velocity"])
    assert json.loads((model_dir / "max_likelihood_9.run.json").read_text())["info"]["checkpoint"] == "ML8/model.pt"
    assert json.loads((model_dir / "max_likelihood_9.config.json").read_text())["checkpoint"] == "ML8"
    for log, shipped_log in (("energy_log.csv", "max_likelihood_9_log.csv"),
                             ("validation_log.csv", "max_likelihood_9_validation_log.csv")):
        assert (model_dir / shipped_log).read_bytes() == (run / log).read_bytes()
    with pytest.raises(InputError, match="already has a stage"):
        ship_stage(run, "max_likelihood_9", "ML8", model_dir)


def _other_start(run: Path) -> None:
    start = Path(json.loads((run / "run.json").read_text())["info"]["checkpoint"])
    checkpoint = torch.load(start, map_location="cpu", weights_only=True)
    checkpoint["model_state_dict"] = {k: v + 1 for k, v in checkpoint["model_state_dict"].items()}
    torch.save(checkpoint, start)


def _other_held_out(run: Path) -> None:
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    for record in checkpoint["tbg"]["held_out"].values():
        record["indices"] = record["indices"][1:]
    torch.save(checkpoint, run / "model.pt")


def _unfinished(run: Path) -> None:
    lines = (run / "energy_log.csv").read_text().splitlines()
    (run / "energy_log.csv").write_text("\n".join(lines[:-1]) + "\n")


def _no_weights(run: Path) -> None:
    (run / "model.pt").unlink()


def _other_molecule(run: Path) -> None:
    record = json.loads((run / "run.json").read_text())
    record["defines"]["molecule"]["sequence"] = "ACE-GLY-NME"
    (run / "run.json").write_text(json.dumps(record))


@pytest.mark.parametrize("spoil, message", [
    (_other_start, "not the shipped ones"), (_other_held_out, "left out other frames"),
    (_unfinished, "log ends at step 2"), (_other_molecule, "another molecule"),
    (_no_weights, "not a finished tbg finetune run folder")])
def test_runs_that_do_not_continue_the_shipped_stages_are_refused(folders, spoil, message) -> None:
    model_dir, run = folders
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    spoil(run)
    with pytest.raises(InputError, match=message):
        ship_stage(run, "max_likelihood_9", "ML8", model_dir)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
