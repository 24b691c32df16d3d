"""Resumable training on disk, shared by ``tbg.flow.train`` and ``tbg.flow.energy``.

``Checkpoints`` keeps numbered checkpoints ``checkpoints/step_XXXXXXXX.pt`` of a run folder: the published
layout (``tbg.nn.save_published``, written to a temporary name and renamed, so a crash never leaves half a
file) plus the loop's own state under ``"tbg"`` -> ``state_key``; after each save only the newest ``keep``
remain. A resume starts from the newest checkpoint that can be read, setting aside newer unreadable ones.
``CsvLog`` is the run's CSV log: on resume it drops the rows written after the checkpoint the run continues
from, so a killed and restarted run logs every step exactly once.
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tbg.errors import InputError
from tbg.nn.checkpoint import CheckpointError, read_checkpoint, save_published
from tbg.nn.egnn import EGNN
from tbg.runfolder import write_atomically

log = logging.getLogger("tbg")

__all__ = ["CHECKPOINT_DIR", "Checkpoints", "CsvLog", "latest_checkpoint"]

CHECKPOINT_DIR = "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest ``checkpoints/step_*.pt`` under out_dir, or None."""
    found = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step_*.pt"))
    return found[-1] if found else None


class Checkpoints:
    """The numbered checkpoints of one training loop; ``description`` names them in errors, e.g. "an
    energy-training checkpoint"."""

    def __init__(self, out_dir: str | Path, state_key: str, description: str, keep: int = 3,
                 meta: Mapping[str, Any] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.out, self.state_key, self.description, self.keep = Path(out_dir), state_key, description, keep
        self.meta = dict(meta or {})  # further "tbg" metadata of every checkpoint

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out)

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """(path, checkpoint dict) of the newest readable checkpoint, None when there is none; refuses one
        written by another kind of training. Newer checkpoints that cannot be read (a disk error, a copy cut
        short) are renamed to ``step_XXXXXXXX.pt.corrupt``, kept for inspection, with a warning naming them."""
        for path in reversed(sorted((self.out / CHECKPOINT_DIR).glob("step_*.pt"))):
            try:
                checkpoint = read_checkpoint(path)
            except CheckpointError as err:
                aside = path.with_name(path.name + ".corrupt")
                try:
                    path.replace(aside)
                except FileNotFoundError:  # another rank of this run set it aside first
                    pass
                log.warning("skipping an unreadable checkpoint (%s); set aside as %s, resuming from an older one "
                            "if there is one", err, aside.name)
                continue
            if self.state_key not in checkpoint.get("tbg", {}):
                raise InputError(f"{path} is not {self.description}; give each training its own output folder")
            return path, checkpoint
        return None

    def save(self, step: int, model: EGNN, optimizer: torch.optim.Optimizer, state: dict[str, Any],
             **extra: Any) -> Path:
        """Write checkpoint ``step`` (model, optimizer, ``state`` and published ``extra`` entries such as
        epoch), then delete all but the newest ``keep``."""
        path = self.out / CHECKPOINT_DIR / f"step_{step:08d}.pt"
        save_published(path, model, optimizer_state_dict=optimizer.state_dict(), global_it=step,
                       tbg={**self.meta, self.state_key: state}, **extra)
        for old in sorted((self.out / CHECKPOINT_DIR).glob("step_*.pt"))[:-self.keep]:
            old.unlink()
        return path


class CsvLog:
    """Append-only CSV of training rows with columns ``fields``; rows after ``resume_step`` are dropped."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int, *,
                 int_fields: Sequence[str] = ("step",)) -> None:
        self.path, self.fields, self.int_fields = path, list(fields), tuple(int_fields)
        rows = []
        if path.exists() and resume_step > 0:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

        def rewrite(tmp: Path) -> None:  # renamed into place: a kill meanwhile loses no row
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, self.fields)
                w.writeheader()
                w.writerows(rows)

        write_atomically(path, rewrite)
        # Rows kept from before the restart, typed like the rows the loop writes ("" stays "").
        self.previous = [{k: self._parse(k, v) for k, v in r.items()} for r in rows]

    def _parse(self, key: str, value: str) -> Any:
        if value == "":
            return ""
        return int(value) if key in self.int_fields else float(value)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)
