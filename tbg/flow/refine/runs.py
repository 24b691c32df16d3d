"""Refinement run folders, as `tbg refine` makes them: SMC and/or independence Metropolis-Hastings on the
samples of one `tbg sample` folder, with the molecule's OpenMM energies and forces.

The input is a sampling folder (``tbg.flow.runs.sample_checkpoint``): samples.npz with the likelihood
(latents, samples, dlogp), topology.pdb and run.json, which names the checkpoint that made the samples.
The flow's log-density at its own samples comes from what the sampler stored, log q = log q0(z) - dlogp;
moves that leave the samples need log q elsewhere (annealed SMC below beta = 1, local moves of MCMC):
then the checkpoint is loaded (the path run.json records, or one given; its SHA-256 must be the one the
samples were made with) and log q is integrated back with the sampler's solver (``FlowDensity``).

The refinement folder holds:

- ``run.json`` (``tbg.runfolder``): the source samples (SHA-256 of their arrays) and the checkpoint's
  SHA-256, the molecule, the temperature, the particles and the SMC/MCMC settings. A rerun with the same
  record resumes; another record is refused before anything changes. Not recorded: device, OpenMM
  platform, checkpoint interval, trajectory formats, progress bars.
- ``state/smc.npz``, ``state/mcmc.npz``: the running method's checkpoint (``SMCCheckpoint``,
  ``MCMCCheckpoint``), written every ``checkpoint_every_s`` seconds and removed when the method is done;
  a rerun continues from it and ends with the result the uninterrupted run would have given.
- ``smc.npz``: ``samples`` [n, 3N] (model units, like samples.npz), ``log_weights`` [n] (the final SMC
  weights; -inf is weight 0), ``ancestors`` [n] (index of the flow sample each particle descends from, in
  the order of samples.npz), ``reduced_energy`` [n], ``summary`` (JSON text: settings, per-stage log,
  costs); ``smc_log.csv``: per stage beta, ESS, CESS, resampling, acceptance, step size, log Z, distinct
  ancestors and the cumulative evaluation counts.
- ``mcmc.npz``: ``samples`` [C L, 3N] (the chains' recorded states, chain after chain), ``chain`` and
  ``step`` [C L], ``source`` [C L] (the flow sample each state is or descends from), ``reduced_energy``,
  ``summary`` (acceptance, autocorrelation time and ESS, costs).
- ``refine.json``: the summaries of both methods; ``topology.pdb``; the samples for molecular viewers
  (``smc.pdb``, ``smc.dcd``, ``mcmc.pdb`` ... in nm, as ``tbg.flow.runs.export_samples`` writes them) and
  ``smc_weights.csv`` (per particle: reduced energy, log weight, normalised weight, ancestor).

Costs count energy evaluations (with or without forces), likelihood evaluations (backward solves of the
flow) and wall time, summed over sessions; MCMC's include the energies of its proposals. Samples whose
stored dlogp or prior energy is not finite are left out (counted in refine.json).

``read_refinement`` gives a folder's refined sets to the evaluation (``tbg evaluate --samples DIR``).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tbg.chem.units import SCALE
from tbg.errors import InputError
from tbg.flow.ode import SolverConfig
from tbg.flow.prior import MeanFreeGaussian
from tbg.flow.refine.mcmc import MCMCCheckpoint, MCMCConfig, independence_metropolis
from tbg.flow.refine.smc import SMCCheckpoint, SMCConfig, smc
from tbg.flow.refine.targets import FlowDensity, energy_model_potential, mean_free_projection
from tbg.flow.sample import SAMPLES_FILE, SAMPLING_RUN
from tbg.runfolder import MANIFEST_FILE, arrays_sha256, claimed, file_sha256, read_json, write_atomically, write_json

log = logging.getLogger("tbg")

__all__ = ["REFINEMENT_RUN", "SUMMARY_FILE", "RefineOptions", "RefinedSet", "is_refinement", "read_refinement",
           "refine_samples", "method_name"]

REFINEMENT_RUN = "refinement"  # the kind of run in run.json
SUMMARY_FILE = "refine.json"
STATE_DIR = "state"
TOPOLOGY_FILE = "topology.pdb"
RESULT_FILES = {"smc": "smc.npz", "mcmc": "mcmc.npz"}


@dataclass
class RefineOptions:
    """What `tbg refine` runs: SMC (``smc``; None: none) and/or independence MH (``mcmc``; None: none) on the
    first ``particles`` flow samples (None: all), energies at ``temperature`` (None: the molecule's default).
    ``device``/``backend``: where and how the flow's density is integrated when a method needs it.
    ``checkpoint_every_s``: seconds between checkpoints of a running method (0: after every step)."""

    smc: SMCConfig | None = field(default_factory=lambda: SMCConfig(schedule="resample_move"))
    mcmc: MCMCConfig | None = None
    particles: int | None = None
    temperature: float | None = None
    device: str = "cpu"
    backend: str = "auto"
    trajectory_formats: Sequence[str] = ("pdb", "dcd")
    checkpoint_every_s: float = 60.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.smc is None and self.mcmc is None:
            raise InputError("nothing to run: choose an SMC scheme and/or MCMC")
        if self.particles is not None and self.particles < 2:
            raise InputError(f"particles must be >= 2, got {self.particles}")
        if not self.checkpoint_every_s >= 0:
            raise InputError(f"checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")

    def needs_density(self) -> bool:
        """Whether a method evaluates the flow's density away from its samples (loads the checkpoint)."""
        annealed = self.smc is not None and (self.smc.schedule != "resample_move" or self.smc.drift == "exact")
        return annealed or (self.mcmc is not None and self.mcmc.local_steps > 0)


def method_name(kind: str, config: SMCConfig | MCMCConfig | Mapping[str, Any]) -> str:
    """How reports name a method: "SMC resample-move", "SMC adaptive", "IMH", "IMH + 2 MALA"."""
    c = asdict(config) if not isinstance(config, Mapping) else config
    if kind == "smc":
        schedule = c["schedule"]
        return "SMC " + (schedule.replace("_", "-") if isinstance(schedule, str) else f"{len(schedule)} stages")
    return "IMH" + (f" + {c['local_steps']} MALA" if c["local_steps"] else "")


# ---------------------------------------------------------------------------------------------------
# Input: the sampling folder.

@dataclass
class _Source:
    folder: Path
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]
    topology_pdb: Path

    @property
    def sha256(self) -> str:
        return arrays_sha256(*(self.arrays[k] for k in ("latents", "samples", "dlogp")))

    @property
    def prior(self) -> MeanFreeGaussian:
        """The Gaussian the latents were drawn from (scaled when the sampling run was)."""
        return MeanFreeGaussian(self.arrays["latents"].shape[1] // 3,
                                scale=self.manifest["defines"].get("prior_scale", 1.0))


def _read_source(samples: Path) -> _Source:
    """The sampling folder ``samples`` (or its samples.npz), checked: the likelihood present, run.json of a
    sampling run, topology.pdb."""
    folder = samples.parent if samples.suffix == ".npz" else samples
    npz = folder / SAMPLES_FILE
    if not npz.is_file():
        raise InputError(f"{npz} not found: --samples names the folder of a `tbg sample` run")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("latents", "samples", "dlogp") if k in f}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{npz}: not a readable .npz file ({type(err).__name__}: {err})") from err
    if "dlogp" not in arrays:
        raise InputError(f"{npz} has no dlogp (sampled without likelihood): refinement weighs the samples by the "
                         f"flow's density; sample with --likelihood joint or decoupled")
    if "latents" not in arrays or "samples" not in arrays:
        raise InputError(f"{npz} lacks latents or samples (it has: {', '.join(sorted(arrays))})")
    n = len(arrays["samples"])
    if arrays["latents"].shape != arrays["samples"].shape or arrays["samples"].ndim != 2 or \
            arrays["dlogp"].shape != (n,):
        raise InputError(f"{npz}: arrays of shapes {({k: list(a.shape) for k, a in arrays.items()})} do not fit "
                         f"together")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(f"{folder} has no {MANIFEST_FILE}: refinement needs the record of the sampling run (which "
                         f"checkpoint made the samples)")
    manifest = read_json(manifest_path, "run manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != SAMPLING_RUN:
        raise InputError(f"{folder} holds a {manifest.get('kind') if isinstance(manifest, dict) else 'unknown'} run, "
                         f"not a sampling run")
    if not (folder / TOPOLOGY_FILE).is_file():
        raise InputError(f"{folder / TOPOLOGY_FILE} not found (written by `tbg sample`)")
    return _Source(folder, arrays, manifest, folder / TOPOLOGY_FILE)


def _flow_density(source: _Source, checkpoint: Path | None, options: RefineOptions, topology: Any) -> FlowDensity:
    """The density of the flow that made the samples: the checkpoint (given, or the one run.json names),
    checked against the SHA-256 the samples were made with."""
    import mdtraj

    from tbg.chem.encoding import features_for_width
    from tbg.flow.runs import molecule_record
    from tbg.nn import load_published
    from tbg.nn.checkpoint import egnn_state, infer_config, read_checkpoint

    defines = source.manifest["defines"]
    path = checkpoint or Path(source.manifest.get("info", {}).get("checkpoint", ""))
    if not path.is_file():
        raise InputError(f"the checkpoint that made the samples ({path}, recorded in {source.folder / MANIFEST_FILE}) "
                         f"is not there; name it with --checkpoint")
    if file_sha256(path) != defines.get("checkpoint_sha256"):
        raise InputError(f"{path} is not the checkpoint that made the samples in {source.folder} (SHA-256 differs "
                         f"from the one in its {MANIFEST_FILE})")
    state = read_checkpoint(path)
    features = features_for_width(topology, infer_config(egnn_state(state))["n_features"], "auto")
    record = molecule_record(mdtraj.Topology.from_openmm(topology), features)
    if record["features_sha256"] != defines.get("molecule", {}).get("features_sha256"):
        raise InputError(f"the atom features of {source.topology_pdb} for {path} differ from those the samples were "
                         f"made with")
    dtype = getattr(torch, defines.get("dtype", "float32"))
    dyn = load_published(state, features.to(device=options.device, dtype=dtype), backend=options.backend)
    return FlowDensity(dyn, source.prior, solver=SolverConfig(**defines["solver"]),
                       batch_size=defines.get("batch_size", 256))


# ---------------------------------------------------------------------------------------------------
# Checkpoints and results on disk.

def _save_state(path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays, meta=np.array(json.dumps(meta))))


def _load_state(path: Path, kind: type[SMCCheckpoint] | type[MCMCCheckpoint]):  # -> checkpoint | None
    """The checkpoint in ``path``, None when there is none; an unreadable one is set aside (the method then
    starts over, with the same result)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k != "meta"}
            meta = json.loads(str(f["meta"]))
        return kind.from_arrays(arrays, meta)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        log.warning("%s: unreadable checkpoint (%s: %s); set aside as %s, starting the method over", path,
                    type(err).__name__, err, aside.name)
        return None


def _read_result(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k != "summary"}
            summary = json.loads(str(f["summary"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable refinement result ({type(err).__name__}: {err}); delete it to "
                         f"run the method again") from err
    return arrays, summary


def _strict_json(obj: Any) -> Any:
    """``obj`` as strict JSON gives it back: NaN and infinities (an undefined acceptance, autocorrelation
    time) become None."""
    return json.loads(json.dumps(obj), parse_constant=lambda _: None)


def _write_result(path: Path, summary: Mapping[str, Any], **arrays: np.ndarray) -> None:
    text = json.dumps(_strict_json(summary))
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays, summary=np.array(text)))


class _Checkpointer:
    """on_step of the library's methods: saves the checkpoint at most every ``every_s`` seconds, and shows
    the progress."""

    def __init__(self, path: Path, every_s: float, bar: tqdm) -> None:
        self.path, self.every_s, self.bar, self.last = path, every_s, bar, time.perf_counter()

    def __call__(self, checkpoint: SMCCheckpoint | MCMCCheckpoint) -> None:
        self.bar.update(1)
        if isinstance(checkpoint, SMCCheckpoint):
            self.bar.set_postfix(beta=f"{checkpoint.beta:.3g}", refresh=False)
        if time.perf_counter() - self.last >= self.every_s:
            _save_state(self.path, *checkpoint.to_arrays())
            self.last = time.perf_counter()


# ---------------------------------------------------------------------------------------------------
# The job.

def _read_topology(path: Path):  # -> openmm.app.Topology
    import openmm.app as app

    try:
        return app.PDBFile(str(path)).topology
    except Exception as err:  # noqa: BLE001 - OpenMM's reader fails in many ways on a broken file
        raise InputError(f"{path}: not a readable PDB file ({type(err).__name__}: {err})") from err


def refine_samples(samples: Path, out: Path, options: RefineOptions, *, checkpoint: Path | None = None,
                   platform: Any = None, record: Callable[[Path], None] | None = None) -> Path:
    """Refine the samples of the sampling folder ``samples`` into ``out`` (see the module docstring;
    resuming a run there with the same record); returns out/refine.json. ``checkpoint`` overrides the path
    the sampling run recorded (checked by SHA-256); ``platform`` is the OpenMM platform of the energies
    (default: the fastest); ``record(out)``, if given, is called once the folder is known to hold this run
    (the CLI writes its resolved options there)."""
    from tbg.chem.energy import EnergyModel
    from tbg.chem.forcefield import default_temperature
    from tbg.flow.runs import export_samples

    source = _read_source(Path(samples))
    topology = _read_topology(source.topology_pdb)
    n_atoms = topology.getNumAtoms()
    x_all = source.arrays["samples"]
    if x_all.shape[1] != 3 * n_atoms:
        raise InputError(f"{source.folder}: samples have {x_all.shape[1]} coordinates, its topology.pdb has "
                         f"{n_atoms} atoms")
    n = len(x_all) if options.particles is None else options.particles
    if n > len(x_all):
        raise InputError(f"{n} particles asked for, but {source.folder} holds {len(x_all)} samples")
    # log q of the flow's own samples from what the sampler stored; broken integrations are left out.
    latents = torch.from_numpy(source.arrays["latents"][:n]).to(torch.float64)
    x = torch.from_numpy(x_all[:n]).to(torch.float64)
    log_q = source.prior.log_prob(latents) - torch.from_numpy(source.arrays["dlogp"][:n]).to(torch.float64)
    usable = torch.isfinite(log_q) & torch.isfinite(x).all(1)
    if int(usable.sum()) < 2:
        raise InputError(f"{source.folder}: fewer than 2 of the first {n} samples have a finite likelihood")
    index = torch.nonzero(usable).flatten()  # the particles' rows in samples.npz
    x, log_q = x[usable], log_q[usable]
    if options.mcmc is not None and len(x) // options.mcmc.n_chains <= options.mcmc.burn_in + 1:
        raise InputError(f"{len(x)} usable samples give {len(x) // options.mcmc.n_chains} MCMC steps per chain for "
                         f"{options.mcmc.n_chains} chains, not more than burn-in + 1 = {options.mcmc.burn_in + 1}")
    temperature = options.temperature or default_temperature(topology)
    defines = {"source": {"samples_sha256": source.sha256,
                          "checkpoint_sha256": source.manifest["defines"].get("checkpoint_sha256"),
                          "molecule": source.manifest["defines"].get("molecule")},
               "temperature": temperature, "particles": n,
               "smc": None if options.smc is None else asdict(options.smc),
               "mcmc": None if options.mcmc is None else asdict(options.mcmc)}
    # Refuse a bad checkpoint before the folder is touched.
    density = _flow_density(source, checkpoint, options, topology) if options.needs_density() else None
    info = {"samples": str(source.folder.resolve()),
            "checkpoint": str(checkpoint) if checkpoint else source.manifest.get("info", {}).get("checkpoint")}
    with ExitStack() as stack:
        stack.enter_context(claimed(out, REFINEMENT_RUN, defines, info=info,
                                    work=(STATE_DIR, *RESULT_FILES.values())))
        if not (out / TOPOLOGY_FILE).is_file():
            write_atomically(out / TOPOLOGY_FILE, lambda tmp: shutil.copyfile(source.topology_pdb, tmp))
        if record is not None:
            record(out)
        energy = stack.enter_context(EnergyModel(topology, temperature=temperature, platform=platform))
        log.info("refining %d flow samples of %s (%d left out: non-finite likelihood) at %.1f K with %s",
                 len(x), source.folder, n - len(x), temperature,
                 " and ".join(method_name(k, c) for k, c in (("smc", options.smc), ("mcmc", options.mcmc)) if c))
        run = _Methods(out, x, log_q, index, energy_model_potential(energy, "scaled"), density,
                       mean_free_projection(n_atoms), options)
        summary: dict[str, Any] = {"source": {**defines["source"], "samples": info["samples"]},
                                   "temperature": temperature, "particles": n, "n_left_out": n - len(x)}
        if options.smc is not None:
            summary["smc"] = run.smc()
        if options.mcmc is not None:
            summary["mcmc"] = run.mcmc()
        for kind in ("smc", "mcmc"):
            if kind in summary:
                export_samples(out / RESULT_FILES[kind], out / TOPOLOGY_FILE, options.trajectory_formats)
        write_json(out / SUMMARY_FILE, _strict_json(summary))
    return out / SUMMARY_FILE


@dataclass
class _Methods:
    """The two methods on the same particles, each resumable and skipped once its result is on disk."""

    out: Path
    x: torch.Tensor
    log_q: torch.Tensor
    index: torch.Tensor
    potential: Any
    density: FlowDensity | None
    project: Callable[[torch.Tensor], torch.Tensor]
    options: RefineOptions

    def _resume(self, kind: str, checkpoint_type: type) -> tuple[Path, Any]:
        state = self.out / STATE_DIR / f"{kind}.npz"
        resume = _load_state(state, checkpoint_type)
        if resume is not None:
            log.info("%s: continuing from %s", kind.upper(), state)
        return state, resume

    def smc(self) -> dict[str, Any]:
        path, cfg = self.out / RESULT_FILES["smc"], self.options.smc
        if path.is_file():
            return _read_result(path)[1]
        state, resume = self._resume("smc", SMCCheckpoint)
        with tqdm(desc="SMC steps", disable=not self.options.progress) as bar:
            result = smc(self.potential, self.x, log_q=self.log_q, density=self.density, config=cfg,
                         project=self.project, resume=resume,
                         on_step=_Checkpointer(state, self.options.checkpoint_every_s, bar))
        summary = {"method": method_name("smc", cfg), "config": asdict(cfg), "n_particles": len(self.x),
                   "ess": result.ess, "log_normalizer": result.log_normalizer,
                   "unique_ancestors": int(result.ancestors.unique().numel()),
                   "acceptance": result.stages[-1].acceptance, "step_size": result.stages[-1].step_size,
                   "stages": result.log_dict(), "costs": result.costs.as_dict()}
        log_w = result.log_w.numpy()
        ancestors = self.index[result.ancestors].numpy()
        _write_result(path, summary, samples=result.x.numpy(), log_weights=log_w, ancestors=ancestors,
                      reduced_energy=result.u.numpy())
        _write_csv(self.out / "smc_log.csv", list(summary["stages"][0]), [list(s.values()) for s in summary["stages"]])
        finite = np.isfinite(log_w)
        w = np.where(finite, np.exp(log_w - log_w[finite].max()), 0.0)
        _write_csv(self.out / "smc_weights.csv", ["frame", "reduced_energy", "log_weight", "weight", "ancestor"],
                   [[i, f"{u:.10g}", f"{lw:.10g}", f"{wi / w.sum():.10g}", int(a)]
                    for i, (u, lw, wi, a) in enumerate(zip(result.u.numpy(), log_w, w, ancestors))])
        state.unlink(missing_ok=True)
        return summary

    def mcmc(self) -> dict[str, Any]:
        path, cfg = self.out / RESULT_FILES["mcmc"], self.options.mcmc
        if path.is_file():
            return _read_result(path)[1]
        state, resume = self._resume("mcmc", MCMCCheckpoint)
        u = self.potential.energy(self.x)  # the proposals' energies (again after a restart: cheap)
        with tqdm(desc="MCMC steps", disable=not self.options.progress) as bar:
            result = independence_metropolis(self.log_q, u, samples=self.x, potential=self.potential,
                                             density=self.density, config=cfg, project=self.project, resume=resume,
                                             on_step=_Checkpointer(state, self.options.checkpoint_every_s, bar))
        chains, length = result.source.shape
        costs = result.costs.as_dict()
        costs["energy_evaluations"] += len(self.x)
        summary = {"method": method_name("mcmc", cfg), "config": asdict(cfg), "n_proposals": len(self.x),
                   "chains": chains, "recorded_steps": length, "acceptance": result.acceptance,
                   "local_acceptance": result.local_acceptance, "n_unique": result.n_unique, "iat": result.iat,
                   "ess": result.ess, "costs": costs}
        states = self.x[result.source] if result.states is None else result.states
        _write_result(path, summary, samples=states.reshape(chains * length, -1).numpy(),
                      chain=np.repeat(np.arange(chains), length), step=np.tile(np.arange(length), chains),
                      source=self.index[result.source.reshape(-1)].numpy(), reduced_energy=result.u.reshape(-1).numpy())
        state.unlink(missing_ok=True)
        return summary


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)

    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------------
# Reading a refinement folder back (the evaluation).

@dataclass
class RefinedSet:
    """One method's refined samples: ``samples`` [n, 3N] in model units (nm x SCALE), ``log_weights`` [n] (None:
    equal weights), the method's own ``ess`` entry (MCMC: autocorrelation), the ``bootstrap_block`` for
    error bars of correlated samples (MCMC: the autocorrelation time, states chain after chain), and what
    the report records about the method (``info``: settings, costs, acceptance...)."""

    name: str
    kind: str
    samples: np.ndarray
    log_weights: np.ndarray | None
    ess: dict[str, Any] | None
    bootstrap_block: int
    info: dict[str, Any]

    def positions_nm(self, n_atoms: int) -> np.ndarray:
        return self.samples.reshape(len(self.samples), n_atoms, 3) / SCALE


def is_refinement(folder: Path) -> bool:
    """Whether ``folder`` holds a `tbg refine` run (its run.json says so)."""
    path = Path(folder) / MANIFEST_FILE
    return path.is_file() and read_json(path, "run manifest").get("kind") == REFINEMENT_RUN


def read_refinement(folder: Path) -> tuple[Path, list[RefinedSet]]:
    """(the source samples.npz, the finished methods' refined sets) of a refinement folder; InputError when
    the source samples changed since, or no method has finished."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_FILE, "run manifest")
    if manifest.get("kind") != REFINEMENT_RUN:
        raise InputError(f"{folder} holds a {manifest.get('kind')} run, not a refinement")
    recorded = Path(manifest.get("info", {}).get("samples", ""))
    if not (recorded / SAMPLES_FILE).is_file():
        raise InputError(f"{folder} refined the samples in {recorded}, which are no longer there; the evaluation "
                         f"needs them (move them back, or refine them again)")
    source = _read_source(recorded)
    if source.sha256 != manifest["defines"]["source"]["samples_sha256"]:
        raise InputError(f"the samples in {source.folder} changed since {folder} refined them; refine them again")
    sets = []
    for kind, file in RESULT_FILES.items():
        if not (folder / file).is_file():
            continue
        arrays, summary = _read_result(folder / file)
        info = {"costs": summary["costs"], "config": summary["config"], "acceptance": summary["acceptance"]}
        if kind == "smc":
            info |= {"unique_ancestors": summary["unique_ancestors"], "log_normalizer": summary["log_normalizer"],
                     "stages": len(summary["stages"])}
            sets.append(RefinedSet(summary["method"], "SMC", arrays["samples"], arrays["log_weights"], None, 1, info))
        else:
            total, ess, iat = len(arrays["samples"]), summary["ess"], summary["iat"]
            info |= {"iat": iat, "n_unique": summary["n_unique"], "local_acceptance": summary["local_acceptance"]}
            entry = None if ess is None or not math.isfinite(ess) else {
                "kind": "autocorrelation", "fraction": ess / total, "effective_samples": ess}
            block = math.ceil(iat) if iat is not None and math.isfinite(iat) else 1
            sets.append(RefinedSet(summary["method"], "MCMC", arrays["samples"], None, entry, block, info))
    if not sets:
        raise InputError(f"{folder} holds no finished refinement yet; rerun `tbg refine` into it")
    return source.folder / SAMPLES_FILE, sets
