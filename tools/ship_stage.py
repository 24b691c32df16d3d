"""Ship a finished `tbg finetune` run as the next stage of a model shipped in tbg/data/models.

    python tools/ship_stage.py RUN NAME --previous PREV [--model-dir DIR]

RUN is the run folder, NAME the stage's record name (``max_likelihood_5``), PREV the name under which the
model's README gives the folder the run started from (``ML4``). The tool

- checks that RUN finished (its log ends at the step its weights were taken), fine-tuned the same molecule
  as the shipped stages, left out the same held-out frames, and started from the shipped weights (when
  the folder its record names is at hand), and that NAME is new;
- writes RUN's weights as the shipped model.pt with the shipped ``"tbg"`` entry plus ``<NAME>_step``;
- writes ``<NAME>.run.json`` and ``<NAME>.config.json`` with the starting point named PREV (the records
  otherwise hold this machine's paths), and copies the logs as ``<NAME>_log.csv`` and (where the run has
  one) ``<NAME>_validation_log.csv``;
- recomputes field_check.npz's field with the reference backend in float64 on its stored inputs.

The README's stage list, its commands and tests/test_shipped_model.py's stage table are edited by hand:
they say why the stage was chosen, which no tool knows.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbg.errors import InputError
from tbg.flow.runs import SHIPPED_MODELS, checkpoint_dynamics, held_out_record
from tbg.nn.checkpoint import read_checkpoint
from tbg.runfolder import read_json, write_atomically, write_json

DEFAULT_MODEL = "alanine-dipeptide"
RUN_FILES = ("model.pt", "run.json", "config.json", "energy_log.csv")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_run(run: Path, name: str, model_dir: Path, shipped: dict[str, Any], new: dict[str, Any],
               record: dict[str, Any]) -> None:
    if f"{name}_step" in shipped["tbg"] or (model_dir / f"{name}.run.json").exists():
        raise InputError(f"the shipped model already has a stage named {name!r}")
    with (run / "energy_log.csv").open() as fh:
        last_step = int(list(csv.DictReader(fh))[-1]["step"])
    if last_step != new["global_it"]:
        raise InputError(f"{run}/model.pt holds step {new['global_it']} but the log ends at step {last_step}")
    for stage in sorted(model_dir.glob("*.run.json")):
        molecule = read_json(stage, "a stage record")["defines"].get("molecule")
        if molecule is not None and molecule != record["defines"]["molecule"]:
            raise InputError(f"{run} fine-tuned another molecule than {stage.name} names")
    old_held, new_held = held_out_record(shipped), held_out_record(new)
    if old_held.keys() != new_held.keys() or any(
            not torch.equal(old_held[k]["indices"], new_held[k]["indices"]) for k in old_held):
        raise InputError(f"{run} left out other frames than the shipped model records")
    start = Path(record["info"]["checkpoint"])
    if start.is_dir():
        start = start / "model.pt"
    if not start.is_file():
        print(f"warning: {start} (where the run started) is not here; not checked against the shipped weights",
              file=sys.stderr)
    elif not _same_weights(read_checkpoint(start)["model_state_dict"], shipped["model_state_dict"]):
        raise InputError(f"{run} started from {start}, whose weights are not the shipped ones")


def ship_stage(run: Path, name: str, previous: str, model_dir: Path) -> dict[str, Any]:
    """Ship ``run`` as stage ``name`` into ``model_dir``; returns the new model's ``"tbg"`` entry."""
    if not all((run / file).is_file() for file in RUN_FILES):
        raise InputError(f"{run} is not a finished tbg finetune run folder (it lacks one of {', '.join(RUN_FILES)})")
    shipped, new = read_checkpoint(model_dir / "model.pt"), read_checkpoint(run / "model.pt")
    record = read_json(run / "run.json", "a fine-tuning record")
    _check_run(run, name, model_dir, shipped, new, record)

    new["tbg"] = {**shipped["tbg"], f"{name}_step": new["global_it"]}
    write_atomically(model_dir / "model.pt", lambda tmp: torch.save(new, tmp))
    record["info"]["checkpoint"] = f"{previous}/model.pt"
    write_json(model_dir / f"{name}.run.json", record)
    config = read_json(run / "config.json", "a run configuration")
    config["checkpoint"] = previous
    write_json(model_dir / f"{name}.config.json", config)
    logs = {"energy_log.csv": f"{name}_log.csv", "validation_log.csv": f"{name}_validation_log.csv"}
    for log, shipped_log in logs.items():
        if (run / log).is_file():  # runs of tbg before the validation log have none
            write_atomically(model_dir / shipped_log, lambda tmp: shutil.copyfile(run / log, tmp))

    check = dict(np.load(model_dir / "field_check.npz"))
    field = checkpoint_dynamics(model_dir / "model.pt", model_dir / "topology.pdb", backend="reference",
                                dtype=torch.float64)
    with torch.no_grad():
        check["velocity"] = field(torch.from_numpy(check["t"]), torch.from_numpy(check["x"])).numpy()
    write_atomically(model_dir / "field_check.npz", lambda tmp: np.savez(tmp, **check))
    return new["tbg"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the finished tbg finetune run folder")
    parser.add_argument("name", help="the stage's record name, e.g. max_likelihood_5")
    parser.add_argument("--previous", required=True, help="the README's name for the folder the run started from")
    parser.add_argument("--model-dir", type=Path, default=SHIPPED_MODELS[DEFAULT_MODEL],
                        help=f"the shipped model's folder (default: the {DEFAULT_MODEL} model)")
    args = parser.parse_args(argv)
    try:
        meta = ship_stage(args.run, args.name, args.previous, args.model_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print({k: v for k, v in meta.items() if k != "held_out"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
