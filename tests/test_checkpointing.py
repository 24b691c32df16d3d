"""tbg.flow.checkpointing, the resume helpers of both training loops: numbered checkpoints (newest N kept,
other loops' checkpoints refused) and the CSV log that forgets rows after the resumed step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tbg
from tbg.errors import InputError
from tbg.flow.checkpointing import Checkpoints, CsvLog, latest_checkpoint
from tbg.nn.checkpoint import egnn_state


def test_checkpoints_keep_newest_and_refuse_other_loops(tmp_path: Path) -> None:
    model = tbg.EGNN(2, hidden=4, n_layers=1)
    optimizer = torch.optim.Adam(model.parameters())
    store = Checkpoints(tmp_path, "energy_state", "an energy-training checkpoint", keep=2)
    assert store.latest() is None and store.load_latest() is None
    for step in (5, 10, 15):
        store.save(step, model, optimizer, {"step": step}, epoch=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000010.pt", "step_00000015.pt"]  # no temporary files left either
    path, state = store.load_latest()
    assert path == latest_checkpoint(tmp_path) and path.name == "step_00000015.pt"
    assert state["tbg"]["energy_state"] == {"step": 15} and state["global_it"] == 15 and state["epoch"] == 1
    for k, v in egnn_state(state).items():
        torch.testing.assert_close(v, model.state_dict()[k])
    other = Checkpoints(tmp_path, "train_state", "a flow-matching training checkpoint")
    with pytest.raises(InputError, match="is not a flow-matching training checkpoint"):
        other.load_latest()
    with pytest.raises(ValueError, match="keep"):
        Checkpoints(tmp_path, "x", "x", keep=0)


def test_csv_log_drops_rows_after_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    first = CsvLog(path, ("step", "epoch", "loss"), 0, int_fields=("step", "epoch"))
    assert first.previous == []
    for step in (1, 2, 3, 4):
        first.write({"step": step, "epoch": 0, "loss": step / 10 if step != 2 else ""})
    resumed = CsvLog(path, ("step", "epoch", "loss"), 2, int_fields=("step", "epoch"))
    assert resumed.previous == [{"step": 1, "epoch": 0, "loss": 0.1}, {"step": 2, "epoch": 0, "loss": ""}]
    resumed.write({"step": 3, "epoch": 0, "loss": 0.5})
    assert path.read_text().splitlines() == ["step,epoch,loss", "1,0,0.1", "2,0,", "3,0,0.5"]
    fresh = CsvLog(path, ("step", "loss"), 0)  # a new run (step 0) starts an empty log
    assert fresh.previous == [] and path.read_text().splitlines() == ["step,loss"]
