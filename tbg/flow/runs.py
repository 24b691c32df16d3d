"""Run folders of flows trained on MD data and of their samples, as the `tbg` command makes them.

A training run folder holds, besides what ``tbg.flow.train`` writes (checkpoints/, model.pt,
train_log.csv), ``model.json`` (the model settings and molecules: a rerun with other settings is refused
instead of mixing two models) and ``topology.pdb`` (the molecule, so that sampling needs nothing else).
A sampling folder holds what ``tbg.flow.sample`` writes (chunks/, samples.npz), ``topology.pdb`` and
``checkpoint.json`` (path and SHA-256 of the model sampled: chunks of another model are never reused).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Subset

from tbg.chem.trajectory import MDData
from tbg.errors import InputError
from tbg.flow.sample import SampleConfig, sample
from tbg.flow.checkpointing import latest_checkpoint
from tbg.flow.train import RaggedLoader, TrainConfig, train

log = logging.getLogger("tbg")

__all__ = ["MODEL_FILE", "SOURCE_FILE", "TOPOLOGY_FILE", "TrainingOptions", "check_run_settings",
           "find_run_model", "record_sample_source", "sample_checkpoint", "split_frames", "train_on_md"]

MODEL_FILE = "model.json"
TOPOLOGY_FILE = "topology.pdb"
SOURCE_FILE = "checkpoint.json"
FINAL_MODEL = "model.pt"


@dataclass
class TrainingOptions:
    """Flow matching on MD frames: the model (hidden size, layers, atom encoding) and the schedule.

    ``encoding``: "atoms" (one class per atom: one molecule), "transfer" (76-wide, several molecules) or
    "auto" (atoms for one molecule, transfer for several). ``epochs`` replaces ``steps`` when given.
    ``val_fraction`` of the frames (a fixed random subset) is held out for the validation loss.
    """

    hidden: int = 64
    layers: int = 5
    steps: int = 1000
    epochs: int | None = None
    batch_size: int = 256
    lr: float = 5e-4
    lr_milestones: Sequence[int] = ()
    ema: float | None = None
    val_fraction: float = 0.1
    checkpoint_every: int = 100
    encoding: Literal["auto", "atoms", "transfer"] = "auto"
    backend: str = "auto"
    seed: int = 0
    progress: bool = True


def split_frames(n_frames: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) frame indices: a random ``val_fraction`` of the frames, fixed by ``seed``."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(n_frames, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(val_fraction * n_frames)
    if n_frames - n_val == 0:
        raise InputError(f"no training frames left after holding out a validation fraction of {val_fraction}")
    return order[n_val:], order[:n_val]


def check_run_settings(out: Path, settings: dict) -> None:
    """Write ``settings`` to out/model.json, or raise InputError if the folder holds a run with others."""
    path = out / MODEL_FILE
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise InputError(f"{out} holds a training run with other settings ({path.read_text().strip()}); "
                         f"rerun with those settings to resume it, or choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def train_on_md(data: Sequence[MDData], out: Path, options: TrainingOptions, device: torch.device | str, *,
                record: Callable[[Path], None] | None = None) -> Path:
    """Train an EGNN flow by flow matching on the frames of ``data`` into the run folder ``out`` (resuming
    a run there with the same settings); returns the final model (out/model.pt, published layout).

    ``record(out)``, if given, is called once the folder is known to hold this run, before training
    (the CLI writes its resolved options there).
    """
    from tbg.chem.data import PeptideDataset
    from tbg.nn import EGNN

    encoding = options.encoding if options.encoding != "auto" else ("atoms" if len(data) == 1 else "transfer")
    if encoding == "atoms" and len(data) > 1:
        raise InputError("the 'atoms' encoding describes one molecule; use the 'transfer' encoding for several")
    frames = PeptideDataset(list(data), encoding=encoding)
    train_idx, val_idx = split_frames(len(frames), options.val_fraction, options.seed)
    train_set, val_set = Subset(frames, train_idx), Subset(frames, val_idx)
    loader = RaggedLoader(train_set, options.batch_size, seed=options.seed,
                          drop_last=len(train_set) >= options.batch_size)
    val = RaggedLoader(val_set, options.batch_size, shuffle=False) if val_idx else None
    n_steps = options.steps if options.epochs is None else options.epochs * len(loader)
    n_features = frames.features[frames.names[0]].shape[1]
    check_run_settings(out, {"encoding": encoding, "n_features": n_features, "hidden": options.hidden,
                             "layers": options.layers, "molecules": [d.name for d in data]})
    if record is not None:
        record(out)
    data[0].write_topology_pdb(out / TOPOLOGY_FILE)
    torch.manual_seed(options.seed)
    model = EGNN(n_features, hidden=options.hidden, n_layers=options.layers).to(device)
    config = TrainConfig(n_steps=n_steps, lr=options.lr, lr_milestones=tuple(options.lr_milestones),
                         seed=options.seed, checkpoint_every=options.checkpoint_every,
                         validate_every=options.checkpoint_every, ema_decay=options.ema, backend=options.backend,
                         progress=options.progress)
    log.info("training %s on %d train / %d validation frames of %s for %d steps on %s", model.extra_repr(),
             len(train_set), len(val_set), ", ".join(d.name for d in data), n_steps, device)
    result = train(model, loader, out, config, val_data=val)
    if result.history:
        log.info("trained to step %d: loss %.4g, validation loss %s -> %s", result.step, result.train_loss,
                 "-" if result.val_loss is None else f"{result.val_loss:.4g}", result.model_path)
    return result.model_path


def find_run_model(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint, the run's topology.pdb or None) for a training run folder (its model.pt, else its
    newest checkpoint) or a checkpoint file (in the run folder or its checkpoints/)."""
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if path.is_dir():
        path = path / FINAL_MODEL if (path / FINAL_MODEL).is_file() else latest_checkpoint(path)
        if path is None:
            raise InputError(f"{run}: no {FINAL_MODEL} or checkpoints/step_*.pt in this folder")
    topology = run / TOPOLOGY_FILE
    return path, topology if topology.is_file() else None


def record_sample_source(out: Path, checkpoint: Path) -> None:
    """Write out/checkpoint.json (path and SHA-256 of ``checkpoint``), or raise InputError if the samples
    in ``out`` came from another model: sample chunks on disk are reused on a rerun."""
    source = {"checkpoint": str(checkpoint), "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    path = out / SOURCE_FILE
    if path.is_file() and json.loads(path.read_text())["sha256"] != source["sha256"]:
        raise InputError(f"{out} holds samples of another model ({path.read_text().strip()}); choose a new "
                         f"output folder or delete {out} to sample {checkpoint}")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(source, indent=1) + "\n")


def sample_checkpoint(checkpoint: Path, topology_pdb: Path, out: Path, config: SampleConfig, *,
                      encoding: Literal["auto", "atoms", "transfer"] = "auto", backend: str = "auto") -> Path:
    """Sample a checkpoint (published layout: ours or the published code's) for the molecule in
    ``topology_pdb`` into ``out`` (resuming the chunks there); returns samples.npz.

    The atom features follow the checkpoint's input width (``tbg.chem.encoding.features_for_width``);
    topology.pdb in ``out`` is the molecule in the atom order of the samples.
    """
    import openmm.app as app

    from tbg.chem.encoding import features_for_width
    from tbg.nn import load_published
    from tbg.nn.checkpoint import egnn_state, infer_config, read_checkpoint

    if not topology_pdb.is_file():
        raise InputError(f"topology file not found: {topology_pdb}")
    topology = app.PDBFile(str(topology_pdb)).topology
    n_features = infer_config(egnn_state(read_checkpoint(checkpoint)))["n_features"]
    features = features_for_width(topology, n_features, encoding)
    device = torch.device(config.device or "cpu")
    dyn = load_published(checkpoint, features.to(device=device, dtype=getattr(torch, config.dtype)),
                         backend=backend)
    record_sample_source(out, checkpoint)
    if topology_pdb.resolve() != (out / TOPOLOGY_FILE).resolve():
        (out / TOPOLOGY_FILE).write_bytes(topology_pdb.read_bytes())
    log.info("sampling %d configurations of %s (%d atoms) with likelihood=%s, %s", config.n_samples,
             topology_pdb.name, dyn.n_atoms, config.likelihood, config.solver)
    return sample(dyn, dyn.n_atoms, out, config)
