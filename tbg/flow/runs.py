"""Run folders of flows trained on MD data and of their samples, as the `tbg` command makes them
(docs/architecture.md follows the data from MD frames to a report).

A training run folder holds, besides what ``tbg.flow.train`` writes (checkpoints/, model.pt,
train_log.csv), ``topology.pdb`` (the molecule, so that sampling needs nothing else) and ``run.json``. A
sampling folder holds what ``tbg.flow.sample`` writes (chunks/, samples.npz, positions in model units =
nm x SCALE), ``topology.pdb``, ``run.json`` and the samples for molecular viewers (``export_samples``):
``samples.pdb``, ``samples.dcd`` ... in nm, atoms in the order of topology.pdb, with
``samples_weights.csv`` beside them when the samples have a likelihood.

``run.json`` (``tbg.runfolder``) records what defines the run, and a rerun into the same folder resumes
only when its own record is the same; otherwise it is refused with the first field that differs, before
anything in the folder changes. While a run works, its folder is locked against other processes.

- Training: every molecule (name, residue sequence, atom names, SHA-256 of its topology, of its atom
  features and of its frames, frame count), the model (encoding, feature width, hidden size, layers) and
  the schedule that a checkpoint continues (batch size, validation fraction, seed, learning rate and its
  milestones, EMA, noise, coupling) and, for a run started from a trained model's weights, that
  checkpoint's SHA-256. Not recorded, so free to change on a rerun: the number of steps or
  epochs (more continues the run; fewer than the run has done is refused, as no such model is kept),
  checkpoint_every, keep_checkpoints, the backend, the device, progress bars.
- Sampling: the molecule (as above, with the features of the checkpoint's encoding), the checkpoint's
  SHA-256 and the sampler's settings (``tbg.flow.sample.sampling_manifest``).
- Fine-tuning by energy (``finetune_checkpoint``, `tbg finetune`): the molecule, the starting checkpoint's
  SHA-256, the temperature of the target and the objective's settings (objective, batch size, learning
  rate, gradient clipping, divergence estimator, ODE solver, seed) and the MD frames of the data objectives;
  the number of steps may grow on a rerun.
  The folder holds what ``tbg.flow.energy.train_by_energy`` writes (checkpoints/, energy_log.csv, model.pt)
  and topology.pdb, so that it samples like a training run folder.

Every checkpoint of a training or fine-tuning run names, in its "tbg" metadata, the MD frames that no stage
of its training has seen (``held_out_record``), so that a later stage on the same frames (`tbg finetune
--objective max-likelihood`, `tbg train --init`) keeps them unseen and they stay fair to measure on.

Refusing is the honest answer for every recorded option: a resumed run cannot take, say, a new learning
rate without becoming a run that is neither the old nor the new one.
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mdtraj
import numpy as np
import torch
from torch.utils.data import Subset

from tbg.chem.peptides import Peptide
from tbg.chem.trajectory import MDData, write_trajectory
from tbg.chem.units import SCALE
from tbg.errors import InputError
from tbg.flow import distributed as D
from tbg.flow.checkpointing import CHECKPOINT_DIR, latest_checkpoint
from tbg.flow.coupling import Coupling
from tbg.flow.energy import DATA_OBJECTIVES, EnergyTrainConfig, train_by_energy
from tbg.flow.profile import profile_run, stage
from tbg.flow.reweight import log_importance_weights, normalized_weights
from tbg.flow.sample import (LIKELIHOOD_CHECK_TOL, SampleConfig, likelihood_error, sample, sampling_folder,
                             sampling_manifest)
from tbg.flow.train import RaggedLoader, TrainConfig, train
from tbg.runfolder import arrays_sha256, claimed, file_sha256, write_atomically

if TYPE_CHECKING:
    import openmm.app as app

    from tbg.nn import BoundDynamics

log = logging.getLogger("tbg")

__all__ = ["FINETUNING_RUN", "SHIPPED_MODELS", "TOPOLOGY_FILE", "TRAINING_RUN", "TRAIN_LOG", "WEIGHTS_FILE",
           "FinetuneOptions", "SamplingOptions", "TrainingOptions", "checkpoint_dynamics", "export_samples",
           "check_sample_likelihood", "find_run_model", "find_shipped_model", "finetune_checkpoint", "held_out_record",
           "molecule_record", "molecule_topology", "random_dynamics", "read_train_log", "same_molecule",
           "sample_checkpoint", "split_frames", "split_recorded_frames", "train_on_md"]

TRAINING_RUN = "training"  # the kinds of run in run.json
FINETUNING_RUN = "fine-tuning"
TOPOLOGY_FILE = "topology.pdb"
FINAL_MODEL = "model.pt"
WEIGHTS_FILE = "samples_weights.csv"
TRAIN_LOG = "train_log.csv"
HELD_OUT = "held_out"  # the key of the frames no training stage has seen, in a checkpoint's "tbg" metadata

# Trained models shipped in the package: model.pt and topology.pdb as `tbg train` / `tbg finetune` write
# them, the runs' records (run.json, config.json, train_log.csv, energy_log.csv) and a README with the
# commands, machine and hours.
SHIPPED_MODELS: dict[str, Path] = {
    "alanine-dipeptide": Path(__file__).resolve().parents[1] / "data" / "models" / "alanine-dipeptide",
}


def atom_identities(atoms: Iterable[Any]) -> list[tuple[str, str, str]]:
    """(residue name, atom name, element) of each atom, in order: what makes two topologies (mdtraj or
    OpenMM) the same molecule in the same atom order."""
    return [(a.residue.name, a.name, a.element.symbol if a.element is not None else "") for a in atoms]


def molecule_record(topology: mdtraj.Topology, features: torch.Tensor) -> dict[str, Any]:
    """What identifies a molecule to a model: residue sequence, atom names, and SHA-256 of the topology
    (residues, atom names and elements in order, bonds) and of the atom features (float32)."""
    atoms = atom_identities(topology.atoms)
    bonds = np.array(sorted(tuple(sorted((b[0].index, b[1].index))) for b in topology.bonds), dtype=np.int64)
    return {"sequence": "-".join(r.name for r in topology.residues),
            "atom_names": " ".join(a.name for a in topology.atoms),
            "topology_sha256": arrays_sha256(np.array(atoms, dtype=str), bonds),
            "features_sha256": arrays_sha256(features.detach().to("cpu", torch.float32).numpy())}


@dataclass
class TrainingOptions:
    """Flow matching on MD frames: the model (hidden size, layers, atom encoding) and the schedule.

    ``encoding``: "atoms" (one class per atom: one molecule), "transfer" (76-wide, several molecules) or
    "auto" (atoms for one molecule, transfer for several). ``epochs`` replaces ``steps`` when given.
    ``val_fraction`` of the frames (a fixed random subset) is held out for the validation loss.
    ``init_from``: a checkpoint (published layout or ours) of the same size whose weights start the run in
    place of the random initialisation: a further stage of training, e.g. at a new learning rate (the
    optimizer, the schedule and the EMA start afresh; a resumed stage continues from its own checkpoints).
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
    init_from: Path | None = None


def held_out_record(checkpoint: Path | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The MD frames no stage of ``checkpoint``'s training (a path, or a checkpoint dict already read) has seen,
    by molecule: {SHA-256 of the molecule's frames (as ``molecule_record`` hashes them): {"frames": their
    count, "indices": int64 tensor}}, as `tbg train` and `tbg finetune` record it in their checkpoints' "tbg"
    metadata; {} for a checkpoint without the record (published checkpoints, runs of tbg before it)."""
    from tbg.nn.checkpoint import read_checkpoint

    return dict(read_checkpoint(checkpoint).get("tbg", {}).get(HELD_OUT, {}))


def _still_held_out(record: dict[str, dict[str, Any]], frames_sha256: str, n_frames: int,
                    held_out: Sequence[int]) -> dict[str, dict[str, Any]]:
    """``record`` after a stage that trained on the molecule whose frames hash to ``frames_sha256`` except
    ``held_out``: unseen now are the frames that no stage has used."""
    indices = torch.as_tensor(sorted(held_out), dtype=torch.int64)
    if (previous := record.get(frames_sha256)) is not None:
        if previous["frames"] != n_frames:
            raise InputError(f"the checkpoint's record of held-out frames is for {previous['frames']} frames of "
                             f"this molecule's data, which has {n_frames}")
        indices = indices[torch.isin(indices, previous["indices"])]
    return {**record, frames_sha256: {"frames": n_frames, "indices": indices}}


def split_recorded_frames(record: dict[str, dict[str, Any]], frames_sha256: str, n_frames: int, val_fraction: float,
                          seed: int) -> tuple[list[int], list[int]] | None:
    """(training, held-out) frame indices of the molecule whose frames hash to ``frames_sha256``, both in
    ``split_frames``' order for ``seed``, the held-out ones those ``record`` (``held_out_record``) names; None
    when it names none of these frames. With the split the record came from, it is ``split_frames``'."""
    if frames_sha256 not in record:
        return None
    recorded = set(record[frames_sha256]["indices"].tolist())
    train_idx, val_idx = split_frames(n_frames, val_fraction, seed)
    order = val_idx + train_idx
    return [i for i in order if i not in recorded], [i for i in order if i in recorded]


def split_frames(n_frames: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) frame indices: a random ``val_fraction`` of the frames, fixed by ``seed``."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(n_frames, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(val_fraction * n_frames)
    if n_frames - n_val == 0:
        raise InputError(f"no training frames left after holding out a validation fraction of {val_fraction}")
    return order[n_val:], order[:n_val]


def train_on_md(data: Sequence[MDData], out: Path, options: TrainingOptions, device: torch.device | str, *,
                record: Callable[[Path], None] | None = None) -> Path:
    """Train an EGNN flow by flow matching on the frames of ``data`` into the run folder ``out`` (resuming
    a run there with the same inputs, see the module docstring); returns the final model (out/model.pt,
    published layout).

    ``record(out)``, if given, is called once the folder is known to hold this run, before training
    (the CLI writes its resolved options there).
    """
    from tbg.chem.data import PeptideDataset
    from tbg.nn import EGNN

    encoding = options.encoding if options.encoding != "auto" else ("atoms" if len(data) == 1 else "transfer")
    if encoding == "atoms" and len(data) > 1:
        raise InputError("the 'atoms' encoding describes one molecule; use the 'transfer' encoding for several")
    try:
        frames = PeptideDataset(list(data), encoding=encoding)
    except ValueError as err:  # e.g. a molecule given twice; InputErrors name their file already
        raise err if isinstance(err, InputError) else InputError(f"training data: {err}") from err
    train_idx, val_idx = split_frames(len(frames), options.val_fraction, options.seed)
    train_set, val_set = Subset(frames, train_idx), Subset(frames, val_idx)
    loader = RaggedLoader(train_set, options.batch_size, seed=options.seed,
                          drop_last=len(train_set) >= options.batch_size)
    val = RaggedLoader(val_set, options.batch_size, shuffle=False) if val_idx else None
    n_steps = options.steps if options.epochs is None else options.epochs * len(loader)
    n_features = frames.features[frames.names[0]].shape[1]
    try:
        config = TrainConfig(n_steps=n_steps, lr=options.lr, lr_milestones=tuple(options.lr_milestones),
                             seed=options.seed, checkpoint_every=options.checkpoint_every,
                             validate_every=options.checkpoint_every, ema_decay=options.ema,
                             backend=options.backend, coupling=options.coupling,
                             keep_checkpoints=options.keep_checkpoints, progress=options.progress)
    except ValueError as err:
        raise InputError(f"training options: {err}") from err
    molecules = [{"name": name, **molecule_record(frames.topologies[name], frames.features[name]),
                  "frames": len(frames.frames_of(name)),
                  "positions_sha256": arrays_sha256(frames.frames_of(name).numpy())} for name in frames.names]
    defines = {"molecules": molecules, "encoding": encoding, "n_features": n_features, "hidden": options.hidden,
               "layers": options.layers, "batch_size": options.batch_size, "val_fraction": options.val_fraction,
               "seed": options.seed, "lr": config.lr, "lr_milestones": config.lr_milestones,
               "lr_gamma": config.lr_gamma, "ema_decay": config.ema_decay, "sigma": config.sigma,
               "coupling": config.coupling, "grad_clip": config.grad_clip}
    initial, held_out = None, {}
    if options.init_from is not None:  # recorded only when given, so that older run folders still resume
        initial = _initial_weights(options.init_from, n_features, options)
        defines["init_sha256"] = file_sha256(options.init_from)
        held_out = held_out_record(options.init_from)
    first = 0
    for molecule in molecules:  # the dataset's frames are the molecules' frames one after another
        n = molecule["frames"]
        held_out = _still_held_out(held_out, molecule["positions_sha256"], n,
                                   [i - first for i in val_idx if first <= i < first + n])
        first += n
    info = {"data": [{"trajectory": str(d.trajectory), "topology": str(d.topology)} for d in data]}
    with ExitStack() as stack:
        D.init_distributed()
        D.enter_on_rank0(stack, lambda: claimed(out, TRAINING_RUN, defines, info=info,
                                                work=(CHECKPOINT_DIR, FINAL_MODEL)))
        torch.manual_seed(options.seed)
        model = EGNN(n_features, hidden=options.hidden, n_layers=options.layers)
        if initial is not None:
            model.load_state_dict(initial)
            log.info("starting from the weights of %s", options.init_from)
        model = model.to(device)
        log.info("training %s on %d train / %d validation frames of %s for %d steps on %s", model.extra_repr(),
                 len(train_set), len(val_set), ", ".join(d.name for d in data), n_steps, device)

        def start(step: int) -> None:  # the run goes ahead (train refuses e.g. fewer steps than done)
            data[0].write_topology_pdb(out / TOPOLOGY_FILE)
            if record is not None:
                record(out)

        result = train(model, loader, out, config, val_data=val, on_start=start, meta={HELD_OUT: held_out})
    if result.history:
        log.info("trained to step %d: loss %.4g, validation loss %s -> %s", result.step, result.train_loss,
                 "-" if result.val_loss is None else f"{result.val_loss:.4g}", result.model_path)
    return result.model_path


def _initial_weights(checkpoint: Path, n_features: int, options: TrainingOptions) -> dict[str, torch.Tensor]:
    """The EGNN weights of ``checkpoint`` for a run of ``options``' size, or an InputError naming the
    difference (read before the run folder is claimed, so a wrong file leaves nothing behind)."""
    from tbg.nn import EGNN
    from tbg.nn.checkpoint import egnn_state, infer_config, read_checkpoint

    state = egnn_state(read_checkpoint(checkpoint))
    found = infer_config(state)
    wanted = infer_config(EGNN(n_features, hidden=options.hidden, n_layers=options.layers).state_dict())
    if found != wanted:
        diff = ", ".join(f"{k} {found[k]} (this run: {wanted[k]})" for k in wanted if found[k] != wanted[k])
        raise InputError(f"{checkpoint}: its model does not fit this run: {diff}")
    return state


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


def read_train_log(run: Path) -> list[dict[str, float]]:
    """The rows of a run's train_log.csv (step, loss, seconds, ...) as numbers; [] when there is none."""
    path = run / TRAIN_LOG
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def same_molecule(pdb_a: Path, pdb_b: Path) -> bool:
    """Whether two PDB files hold the same molecule in the same atom order (residue names, atom names and
    elements, atom by atom): a model trained on one can sample the other."""
    import openmm.app as app

    def atoms(path: Path) -> list[tuple[str, str, str]]:
        return atom_identities(app.PDBFile(str(path)).topology.atoms())

    return atoms(pdb_a) == atoms(pdb_b)


def find_shipped_model(md: MDData, workdir: Path) -> Path | None:
    """The run folder of the shipped model (SHIPPED_MODELS) trained on the molecule of ``md``, or None.
    The molecule's topology is written to workdir/topology.pdb to compare atom by atom."""
    mine = md.write_topology_pdb(workdir / TOPOLOGY_FILE)
    for name, run in SHIPPED_MODELS.items():
        if (run / TOPOLOGY_FILE).is_file() and same_molecule(run / TOPOLOGY_FILE, mine):
            log.info("the shipped %s model fits %s (%s)", name, md.name, run)
            return run
    log.warning("no shipped model fits %s", md.name)
    return None


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


def molecule_topology(molecule: Path | Peptide) -> app.Topology:
    """The OpenMM topology of a ``Peptide`` or of a PDB file (checked: readable, with atoms)."""
    if isinstance(molecule, Peptide):
        return molecule.topology
    return _read_pdb(Path(molecule))


def _read_pdb(path: Path) -> app.Topology:
    import openmm.app as app

    if not path.is_file():
        raise InputError(f"topology file not found: {path}")
    try:
        topology = app.PDBFile(str(path)).topology
    except Exception as err:  # noqa: BLE001 - OpenMM's reader fails in many ways on a broken file
        raise InputError(f"{path}: not a readable PDB file ({type(err).__name__}: {err})") from err
    if topology.getNumAtoms() == 0:
        raise InputError(f"{path}: the PDB file holds no atoms")
    return topology


def checkpoint_dynamics(checkpoint: Path, molecule: Path | Peptide, *, encoding: str = "auto",
                        backend: str = "auto", device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> BoundDynamics:
    """The flow of a checkpoint (published layout: ours or the published code's) bound to ``molecule`` (a PDB
    file or a ``Peptide``); the atom features follow the checkpoint's input width
    (``tbg.chem.encoding.features_for_width``), and an ``encoding`` of another width is refused."""
    from tbg.chem.encoding import features_for_width
    from tbg.nn import load_published
    from tbg.nn.checkpoint import egnn_state, infer_config, read_checkpoint

    topology = molecule_topology(molecule)
    state = read_checkpoint(checkpoint)
    n_features = infer_config(egnn_state(state))["n_features"]
    features = features_for_width(topology, n_features, encoding)
    if features.shape[1] != n_features:
        raise InputError(f"the {encoding} encoding gives {features.shape[1]} atom features, but {checkpoint} "
                         f"expects {n_features}; use the encoding the model was trained with (auto picks it by width)")
    return load_published(state, features.to(device=device, dtype=dtype), backend=backend)


def random_dynamics(molecule: Path | Peptide, *, hidden: int, layers: int, encoding: str = "auto",
                    backend: str = "auto", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> BoundDynamics:
    """A randomly initialised flow (the published initialisation, seeded) of ``hidden`` x ``layers`` bound to
    ``molecule``, with the per-atom encoding ("atoms", also for "auto") or the 76-wide "transfer" encoding:
    for measuring speed and memory before a model is trained (``tbg profile``)."""
    from tbg.chem.encoding import TRANSFER_WIDTH, features_for_width
    from tbg.nn import EGNN, BoundDynamics

    topology = molecule_topology(molecule)
    kind = "transfer" if encoding == "transfer" else "atoms"
    features = features_for_width(topology, TRANSFER_WIDTH if kind == "transfer" else topology.getNumAtoms(), kind)
    torch.manual_seed(seed)
    egnn = EGNN(features.shape[1], hidden=hidden, n_layers=layers).to(device=device, dtype=dtype)
    return BoundDynamics(egnn, features.to(device=device, dtype=dtype), backend=backend)


def sample_checkpoint(checkpoint: Path, molecule: Path | Peptide, out: Path, options: SamplingOptions, *,
                      record: Callable[[Path], None] | None = None) -> Path:
    """Sample a checkpoint (published layout: ours or the published code's) for ``molecule`` (a PDB file or
    a ``Peptide``) into ``out`` (resuming the chunks of the same run there, see the module docstring);
    returns samples.npz.

    The atom features follow the checkpoint's input width (``checkpoint_dynamics``); topology.pdb in ``out``
    is the molecule in the atom order of the samples, which are also written out for viewers
    (``export_samples``). ``record(out)``, if given, is called once the folder is known to hold this run (the
    CLI writes its resolved options there). With ``options.config.profile`` the profile (profile.json) covers
    the export too (trajectories as I/O, the weights' energies as the stage "energies").
    """
    config = options.config
    device = torch.device(config.device or "cpu")
    dyn = checkpoint_dynamics(checkpoint, molecule, encoding=options.encoding, backend=options.backend,
                              device=device, dtype=getattr(torch, config.dtype))
    identity = {"molecule": molecule_record(mdtraj.Topology.from_openmm(molecule_topology(molecule)), dyn.features),
                "checkpoint_sha256": file_sha256(checkpoint)}
    name = molecule.name if isinstance(molecule, Peptide) else Path(molecule).name
    with ExitStack() as stack:
        D.init_distributed()
        manifest = sampling_manifest(dyn, dyn.n_atoms, config, identity)
        D.enter_on_rank0(stack, lambda: sampling_folder(out, manifest, info={"checkpoint": str(checkpoint),
                                                                             "molecule": name}))
        if D.rank() == 0:
            _write_topology(molecule, out / TOPOLOGY_FILE)
            if record is not None:
                record(out)
        log.info("sampling %d configurations of %s (%d atoms) with likelihood=%s, %s", config.n_samples, name,
                 dyn.n_atoms, config.likelihood, config.solver)
        stack.enter_context(profile_run(out, device, config.profile))
        samples = sample(dyn, dyn.n_atoms, out, config, identity=identity)
        if D.rank() == 0:
            export_samples(samples, out / TOPOLOGY_FILE, options.trajectory_formats, options.temperature)
    return samples



def check_sample_likelihood(checkpoint: Path, molecule: Path | Peptide, samples_npz: Path, out: Path,
                            options: SamplingOptions, *, n: int,
                            tol: float = LIKELIHOOD_CHECK_TOL) -> dict[str, Any]:
    """Measure the likelihood error of the first ``n`` samples of ``samples_npz`` (drawn from ``checkpoint``
    with ``options``) against a tight joint solve (``tbg.flow.sample.likelihood_error``) and write it to
    ``out`` (JSON); returns it. A result on disk for the same samples, n and tol is returned as it is."""
    with np.load(samples_npz) as npz:
        if "dlogp" not in npz.files:
            raise InputError(f"{samples_npz} holds no likelihoods (sampled with likelihood 'none'): nothing to check")
        latents, dlogp = npz["latents"][:n], npz["dlogp"][:n]
    identity = {"checkpoint_sha256": file_sha256(checkpoint), "samples_sha256": arrays_sha256(latents, dlogp),
                "n": len(dlogp), "tol": tol}
    if out.is_file():
        found = json.loads(out.read_text())
        if {k: found.get(k) for k in identity} == identity:
            return found
    config = options.config
    dyn = checkpoint_dynamics(checkpoint, molecule, encoding=options.encoding, backend=options.backend,
                              device=config.device or "cpu", dtype=getattr(torch, config.dtype))
    log.info("likelihood check: %d samples against a joint dopri5 solve at atol = rtol = %g", len(dlogp), tol)
    error = likelihood_error(dyn, torch.from_numpy(latents).to(dyn.features), torch.from_numpy(dlogp), tol=tol,
                             progress=config.progress)
    result = {**identity, **error}
    write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    return result

@dataclass(frozen=True)
class FinetuneOptions:
    """What ``finetune_checkpoint`` needs besides its paths: the objective's settings (``config``), the atom
    encoding of the checkpoint (auto: by its input width), the target's temperature (None: the molecule's
    default, see ``tbg.chem.forcefield.default_temperature``) and, for the objectives on MD frames
    (``tbg.flow.energy.DATA_OBJECTIVES``), the frames of the molecule (``data``). Fine-tuning leaves unseen
    the frames the checkpoint records as unseen by its training (``held_out_record``); for a checkpoint
    without that record, ``val_fraction`` of them as ``train_on_md`` holds it out with ``config.seed``.
    ``validation_frames`` of the held-out frames, spread evenly over them, are scored at the start and at
    every checkpoint (validation_log.csv, see ``tbg.flow.energy``); 0 scores none."""

    config: EnergyTrainConfig
    encoding: str = "auto"
    temperature: float | None = None
    data: MDData | None = None
    val_fraction: float = 0.1
    validation_frames: int = 64


def finetune_checkpoint(checkpoint: Path, molecule: Path | Peptide, out: Path, options: FinetuneOptions, *,
                        device: torch.device | str = "cpu", platform: Any = None,
                        record: Callable[[Path], None] | None = None) -> Path:
    """Fine-tune a checkpoint toward exp(-U/kT) of ``molecule`` (amber14 + OBC1 energies and forces from
    OpenMM, ``platform``) with ``tbg.flow.energy.train_by_energy`` into the run folder ``out`` (resuming a
    run there with the same inputs, see the module docstring); returns out/model.pt.

    Flow matching leaves the stiff coordinates (bond lengths and angles) loose; the reverse KL objective
    pulls the flow's own samples toward low energy while its log-likelihood term keeps their spread; the
    max_likelihood and renyi objectives on MD frames then cover what the reverse KL left under-sampled.
    ``record(out)``, if given, is called once the folder is known to hold this run.
    """
    from tbg.chem.energy import EnergyModel

    cfg = options.config
    dyn = checkpoint_dynamics(checkpoint, molecule, encoding=options.encoding, backend=cfg.backend, device=device)
    openmm_topology = molecule_topology(molecule)
    topology = mdtraj.Topology.from_openmm(openmm_topology)
    energy = EnergyModel(openmm_topology, temperature=options.temperature, platform=platform)
    defines = {"molecule": molecule_record(topology, dyn.features),
               "checkpoint_sha256": file_sha256(checkpoint), "temperature": energy.temperature,
               "objective": cfg.objective, "batch_size": cfg.batch_size, "lr": cfg.lr, "grad_clip": cfg.grad_clip,
               "divergence": cfg.divergence, "n_probes": cfg.n_probes, "solver": cfg.solver.record(),
               "sample_solver": cfg.sample_solver.record(), "seed": cfg.seed}
    if cfg.micro_batch_size is not None:  # recorded only when set: runs from before the option still resume
        defines["micro_batch_size"] = cfg.micro_batch_size
    frames, validation, held_out = None, None, held_out_record(checkpoint)
    if cfg.objective == "renyi":
        defines["renyi_order"] = cfg.renyi_order
    if cfg.objective in DATA_OBJECTIVES:
        if options.data is None:
            raise InputError(f"the {cfg.objective} objective needs the MD frames of the molecule")
        frames, validation, defines["data"], held_out = _training_frames(
            options.data, topology, held_out, options.val_fraction, cfg.seed, options.validation_frames)
    elif options.data is not None:
        raise InputError(f"MD frames are the data of the objectives {', '.join(DATA_OBJECTIVES)} only, "
                         f"not of {cfg.objective}")
    name = molecule.name if isinstance(molecule, Peptide) else Path(molecule).name
    with claimed(out, FINETUNING_RUN, defines, info={"checkpoint": str(checkpoint), "molecule": name},
                 work=(CHECKPOINT_DIR, FINAL_MODEL)):
        _write_topology(molecule, out / TOPOLOGY_FILE)
        if record is not None:
            record(out)
        log.info("fine-tuning %s on %s by %s at %.1f K for %d steps", checkpoint, name, cfg.objective,
                 energy.temperature, cfg.n_steps)
        try:
            train_by_energy(dyn.egnn, dyn.features, energy.torch_reduced_energy, out, cfg, data=frames,
                            validation=validation, meta={HELD_OUT: held_out} if held_out else None)
        except FloatingPointError as err:  # the flow's samples include broken molecules
            raise InputError(f"{checkpoint}: {err}") from err
    return out / FINAL_MODEL


def _training_frames(md: MDData, topology: mdtraj.Topology, held_out: dict[str, dict[str, Any]], val_fraction: float,
                     seed: int, n_validation: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any],
                                                            dict[str, dict[str, Any]]]:
    """The frames of ``md`` [M, 3N] (model units) to train on, ``n_validation`` of the held-out ones spread
    evenly over them (None for 0), the training frames' record and the held-out record after training on
    them. Left out are the frames the checkpoint's record ``held_out`` (``held_out_record``) names
    for these data, which no stage of its training has seen; data it names no frames of (or a checkpoint
    without the record) lose the ``val_fraction`` that ``split_frames`` holds out with ``seed``, as `tbg
    train` would. The atoms must be ``topology``'s, in its order."""
    from tbg.chem.data import PeptideDataset

    try:
        frames = PeptideDataset(md, encoding="atoms")
    except ValueError as err:
        raise err if isinstance(err, InputError) else InputError(f"MD data: {err}") from err
    name = frames.names[0]
    if atom_identities(frames.topologies[name].atoms) != atom_identities(topology.atoms):
        raise InputError(f"{md.trajectory}: its atoms are not the fine-tuned molecule's (in the same order)")
    positions = frames.frames_of(name)
    sha = arrays_sha256(positions.numpy())
    record = {"frames": len(positions), "positions_sha256": sha}
    if (split := split_recorded_frames(held_out, sha, len(positions), val_fraction, seed)) is not None:
        train_idx, val_idx = split  # recorded by the checkpoint's training: the same frames stay unseen
        record.update(held_out=len(val_idx), held_out_by="checkpoint")
    else:
        if held_out:
            log.info("the checkpoint records no held-out frames of %s: holding out %.0f%% of them by seed %d",
                     md.trajectory, 100 * val_fraction, seed)
        else:
            log.warning("the checkpoint does not record which MD frames its training held out: holding out "
                        "%.0f%% of the frames by seed %d, as `tbg train --seed %d` does", 100 * val_fraction, seed,
                        seed)
        train_idx, val_idx = split_frames(len(positions), val_fraction, seed)
        record.update(held_out=len(val_idx), val_fraction=val_fraction)
    if not train_idx:
        raise InputError(f"{md.trajectory}: every frame is held out from training, none is left to train on")
    held_out = _still_held_out(held_out, sha, len(positions), val_idx)
    validation = None
    if n_validation > 0 and val_idx:
        spread = torch.linspace(0, len(val_idx) - 1, min(n_validation, len(val_idx))).round().long()
        chosen = torch.as_tensor(sorted(val_idx))[spread]
        validation = positions[chosen].reshape(len(chosen), -1)
    return positions[torch.as_tensor(train_idx)].reshape(len(train_idx), -1), validation, record, held_out


def _write_topology(molecule: Path | Peptide, path: Path) -> None:
    """The molecule as out/topology.pdb (a PDB file is copied byte for byte)."""
    if isinstance(molecule, Peptide):
        write_atomically(path, molecule.to_pdb)
    elif Path(molecule).resolve() != path.resolve():
        write_atomically(path, lambda tmp: tmp.write_bytes(Path(molecule).read_bytes()))


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
    with stage("io"):
        written = [write_trajectory(positions_nm, topology, samples_npz.with_suffix(f".{fmt}")) for fmt in formats]
    if "dlogp" in arrays:
        weights = _sample_weights(positions_nm, app.PDBFile(str(topology_pdb)).topology, arrays["prior_energy"],
                                  arrays["dlogp"], temperature)
        if weights is not None:
            with stage("io"):
                written.append(_write_weights(samples_npz.with_name(WEIGHTS_FILE), *weights))
    log.info("samples for viewers: %s", ", ".join(p.name for p in written))
    return written


def _sample_weights(positions_nm: np.ndarray, topology: app.Topology, prior_energy: np.ndarray,
                    dlogp: np.ndarray, temperature: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(u, log w, normalised w) of every sample, None when the force field does not cover the molecule."""
    from tbg.chem.energy import EnergyModel

    with stage("energies"):
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
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["frame", "reduced_energy", "log_weight", "weight"])
            out.writerows([i, f"{u[i]:.10g}", f"{log_w[i]:.10g}", f"{w[i]:.10g}"] for i in range(len(u)))

    return write_atomically(path, write)
