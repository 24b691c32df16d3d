"""`tbg finetune`: fine-tuning a trained flow by energy into a resumable run folder that samples like a
training run (tbg.flow.runs.finetune_checkpoint over tbg.flow.energy.train_by_energy)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from tbg.chem import ALANINE_DIPEPTIDE_DIR
from tbg.flow.runs import FINETUNING_RUN, SHIPPED_MODELS, held_out_record, split_frames
from cli_helpers import FAST_SAMPLE, run

SHIPPED = SHIPPED_MODELS["alanine-dipeptide"]
# Two tiny steps of a fixed-step solve: the mechanics, not a result.
TINY = ["--batch-size", "2", "--ode-steps", "2", "--checkpoint-every", "1", "--no-progress"]


def _log(folder: Path) -> list[dict[str, str]]:
    with (folder / "energy_log.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_finetune_runs_resumes_and_samples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft"
    code, stdout, err = run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--steps", "2", *TINY], capsys)
    assert code == 0, err
    assert f"fine-tuned model: {out / 'model.pt'}" in stdout
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(float(r["mean_energy"]))) for r in rows)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["kind"] == FINETUNING_RUN and manifest["defines"]["batch_size"] == 2
    assert "panels" not in manifest["defines"]["solver"]  # as recorded before the option existed
    assert (out / "topology.pdb").read_bytes() == (SHIPPED / "topology.pdb").read_bytes()
    before = torch.load(SHIPPED / "model.pt", weights_only=True)["model_state_dict"]
    after = torch.load(out / "model.pt", weights_only=True)["model_state_dict"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained

    # More steps continue the run; other inputs are refused before anything changes.
    assert run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--steps", "3", *TINY], capsys)[0] == 0
    assert [int(r["step"]) for r in _log(out)] == [1, 2, 3]
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--steps", "4", *TINY, "--lr", "1e-3"],
                       capsys)
    assert code != 0 and "lr is 0.0001 there but 0.001 now" in err
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--steps", "4", *TINY, "--ode-panels", "0.1",
                        "0.3"], capsys)
    assert code != 0 and 'solver.panels is "(absent)" there but [0.1, 0.3] now' in err, err
    assert len(_log(out)) == 3

    # The folder samples like a training run folder.
    code, _, err = run(["sample", "--checkpoint", out, "--out", tmp_path / "s", "--n", "2", *FAST_SAMPLE], capsys)
    assert code == 0, err


def test_finetune_max_likelihood_of_md_frames(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ml"
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--objective", "max-likelihood",
                        "--steps", "1", *TINY], capsys)
    assert code == 0, err
    (row,) = _log(out)
    assert row["mean_energy"] == "nan" and row["ess"] == "nan"  # no energy on MD frames
    assert torch.isfinite(torch.tensor(float(row["loss"])))
    data = json.loads((out / "run.json").read_text())["defines"]["data"]
    assert data["frames"] == 10000 and data["held_out"] == 1000 and data["held_out_by"] == "checkpoint"
    assert _unseen(out / "model.pt") == _unseen(SHIPPED / "model.pt")  # still unseen: not trained on
    with (out / "validation_log.csv").open() as fh:  # 64 held-out frames scored at the start and the checkpoint
        scored = list(csv.DictReader(fh))
    assert [(int(r["step"]), int(r["frames"])) for r in scored] == [(0, 64), (1, 64)]
    assert all(torch.isfinite(torch.tensor([float(r["nll"]), float(r["nll_stderr"])])).all() for r in scored)
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", tmp_path / "unscored", "--objective",
                        "max-likelihood", "--validation-frames", "0", "--steps", "1", *TINY], capsys)
    assert code == 0, err
    assert not (tmp_path / "unscored" / "validation_log.csv").exists()

    # Frames whose atoms are not the molecule's, in its order, are refused before anything is written.
    md = tmp_path / "swapped"
    md.mkdir()
    lines = (ALANINE_DIPEPTIDE_DIR / "ala2-traj-state0.pdb").read_text().splitlines(keepends=True)
    atoms = [i for i, line in enumerate(lines) if line.startswith(("ATOM", "HETATM"))]
    lines[atoms[0]], lines[atoms[1]] = lines[atoms[1]], lines[atoms[0]]
    (md / "ala2-traj-state0.pdb").write_text("".join(lines))
    (md / "ala2-traj-arrays.npz").write_bytes((ALANINE_DIPEPTIDE_DIR / "ala2-traj-arrays.npz").read_bytes())
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", tmp_path / "no", "--objective", "max-likelihood",
                        "--data", md, "--steps", "1", *TINY], capsys)
    assert code != 0 and "its atoms are not the fine-tuned molecule's" in err, err
    assert not (tmp_path / "no").exists()


def _unseen(checkpoint: Path) -> list[int]:
    """The shipped MD frames that no stage of ``checkpoint``'s training has seen, by index."""
    (record,) = held_out_record(checkpoint).values()
    return record["indices"].tolist()


def test_finetune_leaves_the_frames_its_checkpoint_held_out_unseen(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Another --seed than the flow-matching run's does not train on that run's validation frames; a
    checkpoint without the record (published, or from an older tbg) falls back to the seed's 10%."""
    assert _unseen(SHIPPED / "model.pt") == sorted(split_frames(10000, 0.1, 0)[1])  # stage 1: seed 0
    out = tmp_path / "seed3"
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--objective", "max-likelihood",
                        "--seed", "3", "--steps", "1", *TINY], capsys)
    assert code == 0, err
    assert _unseen(out / "model.pt") == _unseen(SHIPPED / "model.pt")

    bare = tmp_path / "bare" / "model.pt"
    bare.parent.mkdir()
    checkpoint = torch.load(SHIPPED / "model.pt", weights_only=True)
    del checkpoint["tbg"]["held_out"]
    torch.save(checkpoint, bare)
    code, _, err = run(["finetune", "--checkpoint", bare, "--pdb", SHIPPED / "topology.pdb", "--out", tmp_path / "b",
                        "--objective", "max-likelihood", "--seed", "3", "--steps", "1", *TINY], capsys)
    assert code == 0, err
    assert ("does not record which MD frames its training held out: holding out 10% of the frames by seed 3"
            in caplog.text)
    data = json.loads((tmp_path / "b" / "run.json").read_text())["defines"]["data"]
    assert data["val_fraction"] == 0.1 and "held_out_by" not in data
    assert _unseen(tmp_path / "b" / "model.pt") == sorted(split_frames(10000, 0.1, 3)[1])


def test_finetune_renyi_weights_md_frames(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "renyi"
    code, _, err = run(["finetune", "--checkpoint", SHIPPED, "--out", out, "--objective", "renyi", "--renyi-order",
                        "1.5", "--steps", "1", *TINY], capsys)
    assert code == 0, err
    (row,) = _log(out)
    assert -60 < float(row["mean_energy"]) < 0  # the MD frames' reduced energy (MD's mean is -35.5)
    assert 0 < float(row["ess"]) <= 1 and torch.isfinite(torch.tensor(float(row["loss"])))
    defines = json.loads((out / "run.json").read_text())["defines"]
    assert defines["renyi_order"] == 1.5 and defines["data"]["held_out"] == 1000
