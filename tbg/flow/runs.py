"""Run folders of flows trained on MD data and of their samples, as the `tbg` command makes them.

A training run folder holds, besides what ``tbg.flow.train`` writes (checkpoints/, model.pt,
train_log.csv), ``model.json`` (the model settings and molecules: a rerun with other settings is refused
instead of mixing two models) and ``topology.pdb`` (the molecule, so that sampling needs nothing else).
A sampling folder holds what ``tbg.flow.sample`` writes (chunks/, samples.npz, positions in model units =
nm x SCALE), ``topology.pdb``, ``checkpoint.json`` (path and SHA-256 of the model sampled: chunks of another
model are never reused) and the samples for molecular viewers (``export_samples``): ``samples.pdb``,
``samples.dcd`` ... in nm, atoms in the order of topology.pdb, with ``samples_weights.csv`` beside them
when the samples have a likelihood.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch.utils.data import Subset

from tbg.chem.trajectory import MDData, write_trajectory
from tbg.chem.units import SCALE
from tbg.errors import InputError
from tbg.flow import distributed as D
from tbg.flow.checkpointing import latest_checkpoint
from tbg.flow.coupling import Coupling
from tbg.flow.reweight import log_importance_weights, normalized_weights
from tbg.flow.sample import SampleConfig, sample
from tbg.flow.train import RaggedLoader, TrainConfig, train

if TYPE_CHECKING:
    import openmm.app as app

log = logging.getLogger("tbg")

__all__ = ["MODEL_FILE", "SOURCE_FILE", "TOPOLOGY_FILE", "WEIGHTS_FILE", "SamplingOptions", "TrainingOptions",
           "check_run_settings", "export_samples", "find_run_model", "record_sample_source", "sample_checkpoint",
           "split_frames", "train_on_md"]

MODEL_FILE = "model.json"
TOPOLOGY_FILE = "topology.pdb"
SOURCE_FILE = "checkpoint.json"
FINAL_MODEL = "model.pt"
WEIGHTS_FILE = "samples_weights.csv"


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
    coupling: Coupling = "independent"
    val_fraction: float = 0.1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
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
                         coupling=options.coupling, keep_checkpoints=options.keep_checkpoints,
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


@dataclass
class SamplingOptions:
    """Sampling a checkpoint: the sampler's ``config``, the atom ``encoding`` ("auto": by the checkpoint's
    input width), the EGNN ``backend``, and what is written beside samples.npz (``export_samples``):
    trajectories in ``trajectory_formats`` and weights at ``temperature`` (None: the molecule's default)."""

    config: SampleConfig = field(default_factory=SampleConfig)
    encoding: Literal["auto", "atoms", "transfer"] = "auto"
    backend: str = "auto"
    trajectory_formats: Sequence[str] = ("pdb", "dcd")
    temperature: float | None = None


def sample_checkpoint(checkpoint: Path, topology_pdb: Path, out: Path, options: SamplingOptions) -> Path:
    """Sample a checkpoint (published layout: ours or the published code's) for the molecule in
    ``topology_pdb`` into ``out`` (resuming the chunks there); returns samples.npz.

    The atom features follow the checkpoint's input width (``tbg.chem.encoding.features_for_width``);
    topology.pdb in ``out`` is the molecule in the atom order of the samples, which are also written out
    for viewers (``export_samples``).
    """
    import openmm.app as app

    from tbg.chem.encoding import features_for_width
    from tbg.nn import load_published
    from tbg.nn.checkpoint import egnn_state, infer_config, read_checkpoint

    if not topology_pdb.is_file():
        raise InputError(f"topology file not found: {topology_pdb}")
    topology = app.PDBFile(str(topology_pdb)).topology
    n_features = infer_config(egnn_state(read_checkpoint(checkpoint)))["n_features"]
    features = features_for_width(topology, n_features, options.encoding)
    config = options.config
    device = torch.device(config.device or "cpu")
    dyn = load_published(checkpoint, features.to(device=device, dtype=getattr(torch, config.dtype)),
                         backend=options.backend)
    record_sample_source(out, checkpoint)
    if topology_pdb.resolve() != (out / TOPOLOGY_FILE).resolve():
        shutil.copyfile(topology_pdb, out / TOPOLOGY_FILE)
    log.info("sampling %d configurations of %s (%d atoms) with likelihood=%s, %s", config.n_samples,
             topology_pdb.name, dyn.n_atoms, config.likelihood, config.solver)
    samples = sample(dyn, dyn.n_atoms, out, config)
    if D.rank() == 0:
        export_samples(samples, out / TOPOLOGY_FILE, options.trajectory_formats, options.temperature)
    return samples


def export_samples(samples_npz: Path, topology_pdb: Path, formats: Sequence[str],
                   temperature: float | None = None) -> list[Path]:
    """Write the samples of ``samples_npz`` beside it for molecular viewers; returns the files written.

    ``samples.<format>`` for each format (tbg.chem.trajectory.WRITE_FORMATS): positions in nm (the samples
    / SCALE, not re-centred), atoms in the order of ``topology_pdb``, one frame per sample in the order of
    samples.npz. When the samples have a likelihood, also ``samples_weights.csv``: per frame the reduced
    energy u (tbg.chem's force field at ``temperature``, by default the molecule's), the log importance
    weight log w = -u + prior_energy + dlogp and the normalised weight. These are the weights of the raw
    samples: ``tbg evaluate`` also checks their chemistry and reweights the correct configurations only.
    """
    import mdtraj
    import openmm.app as app

    with np.load(samples_npz) as f:
        arrays = {k: f[k] for k in ("samples", "prior_energy", "dlogp") if k in f}
    topology = mdtraj.load_topology(str(topology_pdb))
    positions_nm = arrays["samples"].reshape(len(arrays["samples"]), topology.n_atoms, 3) / SCALE
    written = [write_trajectory(positions_nm, topology, samples_npz.with_suffix(f".{fmt}")) for fmt in formats]
    if "dlogp" in arrays:
        weights = _sample_weights(positions_nm, app.PDBFile(str(topology_pdb)).topology, arrays["prior_energy"],
                                  arrays["dlogp"], temperature)
        if weights is not None:
            written.append(_write_weights(samples_npz.with_name(WEIGHTS_FILE), *weights))
    log.info("samples for viewers: %s", ", ".join(p.name for p in written))
    return written


def _sample_weights(positions_nm: np.ndarray, topology: app.Topology, prior_energy: np.ndarray,
                    dlogp: np.ndarray, temperature: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(u, log w, normalised w) of every sample, None when the force field does not cover the molecule."""
    from tbg.chem.energy import EnergyModel

    try:
        energy = EnergyModel(topology, temperature=temperature)
    except ValueError as err:  # OpenMM names the residue it has no template for
        log.warning("no sample weights: the force field does not cover this molecule (%s)", err)
        return None
    with energy:
        u = energy.reduced_energy(positions_nm, unit="nm")
    log_w = log_importance_weights(u, prior_energy, dlogp)
    if not torch.isfinite(log_w).any():  # e.g. an untrained model: every sample broken
        log.warning("no sample has a finite energy: every weight in %s is 0", WEIGHTS_FILE)
        return u, log_w.numpy(), np.zeros(len(u))
    return u, log_w.numpy(), normalized_weights(log_w).numpy()


def _write_weights(path: Path, u: np.ndarray, log_w: np.ndarray, w: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["frame", "reduced_energy", "log_weight", "weight"])
        out.writerows([i, f"{u[i]:.10g}", f"{log_w[i]:.10g}", f"{w[i]:.10g}"] for i in range(len(u)))
    tmp.replace(path)
    return path
