"""Sampling the flow with exact likelihoods, in resumable chunks, sharded over ranks.

The n requested samples are cut into chunks of at most ``batch_size``; chunk c draws its latents from
its own seed (derived from (seed, c)), so the result does not depend on how many processes ran, in
which order, or how often the run was interrupted. Each finished chunk is written atomically to
``chunks/chunk_XXXXXX.npz``; a restarted run skips the chunks on disk, so nothing is lost or repeated.
Under torchrun rank r computes the chunks c = r mod W; rank 0 then merges all chunks, in order, into
``samples.npz`` with ``latents`` [n, 3N], ``samples`` [n, 3N] (model units) and ``dlogp`` [n]
(absent when ``likelihood="none"``), plus ``prior_energy`` [n] for reweighting. ``prior_scale`` s draws
the latents from N(0, s^2) instead of the trained N(0, 1) (``tbg.flow.prior.MeanFreeGaussian``); their
``prior_energy`` is that of the Gaussian they were drawn from, so the weights stay exact.

The folder is held by one process (group) at a time (``tbg.runfolder``), and its ``run.json`` records what
defines the chunks (``sampling_manifest``: the sampler's settings, the atom count and what the caller adds,
such as the molecule and the checkpoint): a rerun with other settings is refused rather than merging
chunks of two runs. A chunk on disk that cannot be read is set aside (``chunk_XXXXXX.npz.corrupt``) and
sampled again, which gives the same chunk.

``SampleConfig(profile=True)`` times the run by stages (``tbg.flow.profile``: profile.json, trace.json of
one chunk); ``batch_size="auto"`` takes the largest batch that ``tbg.flow.memory.MemoryModel`` fits into
the memory budget.
"""

from __future__ import annotations

import logging
import math
import zipfile
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from tbg.errors import InputError
from tbg.flow import distributed as D
from tbg.flow.memory import MemoryModel, default_memory_budget
from tbg.flow.ode import Dynamics, FlowResult, SolverConfig, decoupled_likelihood, integrate, panel_boundaries
from tbg.flow.prior import MeanFreeGaussian
from tbg.flow.profile import chunk_profile, profile_run, stage
from tbg.runfolder import arrays_sha256, claimed, write_atomically

log = logging.getLogger("tbg")

__all__ = ["LIKELIHOOD_CHECK_TOL", "SAMPLING_RUN", "SampleConfig", "sample", "sample_chunk", "sampling_folder",
           "sampling_manifest", "chunk_seed", "batch_size_for_budget", "resolve_batch_size", "likelihood_error"]

SAMPLING_RUN = "sampling"  # the kind of run in run.json
CHUNK_DIR = "chunks"
SAMPLES_FILE = "samples.npz"
# Tolerance of the joint solve that stands in for the exact likelihood when measuring the sampler's error.
LIKELIHOOD_CHECK_TOL = 1e-6

Likelihood = Literal["joint", "decoupled", "none"]


@dataclass
class SampleConfig:
    """Sampling options. ``likelihood``: "joint" (published augmented ODE), "decoupled" (x path then
    Gauss-Legendre quadrature of div v at ``n_quadrature`` nodes, split into panels at the times
    ``quadrature_panels``: tbg.flow.ode.quadrature_rule) or "none" (samples only, cheapest).
    ``memory_budget_gb`` caps the batch size through ``batch_size_for_budget`` when the dynamics is an
    EGNN-backed one; ``batch_size="auto"`` takes the largest batch that fits it (see
    ``resolve_batch_size``). ``profile``: time the run by stages into profile.json and trace.json
    (``tbg.flow.profile``); a profiled run synchronises the GPU at stage boundaries, so it is a little
    slower than a plain one. ``prior_scale``: standard deviation of the latents (1: the prior the flow was
    trained with); below 1 it trades the flow's over-spread for its under-covered regions, which may or may
    not raise the effective sample size (docs/model.md)."""

    n_samples: int = 1000
    batch_size: int | Literal["auto"] = 500
    likelihood: Likelihood = "joint"
    solver: SolverConfig = field(default_factory=SolverConfig)
    n_quadrature: int = 16
    quadrature_panels: tuple[float, ...] = ()
    prior_scale: float = 1.0
    memory_budget_gb: float | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None  # where latents go; default: the EGNN's device for tbg dynamics, else the CPU
    progress: bool = True
    profile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.solver, dict):
            self.solver = SolverConfig(**self.solver)
        if self.likelihood not in ("joint", "decoupled", "none"):
            raise ValueError(f"likelihood must be 'joint', 'decoupled' or 'none', got {self.likelihood!r}")
        if self.n_samples < 1 or (self.batch_size != "auto" and (not isinstance(self.batch_size, int)
                                                                  or self.batch_size < 1)):
            raise ValueError(f"n_samples must be >= 1 and batch_size >= 1 or 'auto', got {self.n_samples}, "
                             f"{self.batch_size!r}")
        self.quadrature_panels = panel_boundaries(self.quadrature_panels, "quadrature_panels")
        if not (math.isfinite(self.prior_scale) and self.prior_scale > 0):
            raise ValueError(f"prior_scale must be a positive number, got {self.prior_scale}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def prior(self, n_atoms: int) -> MeanFreeGaussian:
        """The Gaussian the latents of a molecule of ``n_atoms`` atoms are drawn from."""
        return MeanFreeGaussian(n_atoms, scale=self.prior_scale)


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent 63-bit seed of chunk ``chunk`` of a run with ``seed``."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def batch_size_for_budget(memory_budget_bytes: float, dyn: Dynamics, n_atoms: int, config: SampleConfig,
                          device: torch.device | str = "cpu") -> int | None:
    """Largest batch whose modelled peak working memory (``tbg.flow.memory.MemoryModel``: solver state and
    the EGNN's field or divergence on ``device``, with ``config``'s likelihood, solver and dtype) fits
    ``memory_budget_bytes``; at least 1. None when ``dyn`` is not EGNN-backed (no model)."""
    model = MemoryModel.for_dynamics(dyn, n_atoms, likelihood=config.likelihood, method=config.solver.method,
                                     n_quadrature=config.n_quadrature, dtype=getattr(torch, config.dtype),
                                     device=torch.device(device))
    return None if model is None else model.largest_batch(memory_budget_bytes)


# ``batch_size="auto"`` leaves each rank at least this many chunks: progress to show and places to resume.
AUTO_MIN_CHUNKS = 4


def resolve_batch_size(dyn: Dynamics, n_atoms: int, config: SampleConfig, device: torch.device,
                       world: int = 1) -> int:
    """The batch size a run uses: ``config.batch_size`` capped by the memory budget's, or for "auto" the
    largest batch the memory model fits into the budget (``memory_budget_gb``, by default
    ``tbg.flow.memory.default_memory_budget``), at most n_samples // (world x AUTO_MIN_CHUNKS).

    "auto" uses the model, not a measurement: throughput does not fall with the batch size on our devices
    (bench/RESULTS.md, "Profiling large-batch sampling (CPU)"), so the largest batch that fits is the
    choice, and the model gives the same answer on every rerun, which keeps the chunks of a resumed run the
    same (a quick timing sweep would not). ``tbg profile`` measures the real curve.
    """
    budget = None if config.memory_budget_gb is None else config.memory_budget_gb * 2**30
    if config.batch_size != "auto":
        fit = None if budget is None else batch_size_for_budget(budget, dyn, n_atoms, config, device)
        return config.batch_size if fit is None else min(config.batch_size, fit)
    fit = batch_size_for_budget(default_memory_budget(device) if budget is None else budget, dyn, n_atoms, config,
                                device)
    if fit is None:
        raise ValueError("batch_size='auto' needs an EGNN-backed dynamics (tbg.nn.BoundDynamics) for its memory "
                         f"model; got {type(dyn).__name__}: give a batch size")
    return max(1, min(fit, config.n_samples // (world * AUTO_MIN_CHUNKS)))


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays))


def _device(dyn: Dynamics, cfg: SampleConfig) -> torch.device:
    """Where the latents go: ``cfg.device``, else the EGNN's device for tbg dynamics, else the CPU."""
    if cfg.device is not None:
        return torch.device(cfg.device)
    egnn = getattr(dyn, "egnn", None)
    return egnn.embedding.weight.device if egnn is not None else torch.device("cpu")


def flow_record(dyn: Dynamics) -> dict[str, str]:
    """For EGNN-backed dynamics the SHA-256 of the network's parameters and of the atom features (what a
    sampling run records of its flow, ``sampling_manifest``); empty for other dynamics."""
    egnn, features = getattr(dyn, "egnn", None), getattr(dyn, "features", None)
    if egnn is None or features is None:
        return {}
    return {"parameters_sha256": arrays_sha256(*(v.detach().cpu() for _, v in sorted(egnn.state_dict().items()))),
            "features_sha256": arrays_sha256(features.detach().cpu())}


def sampling_manifest(dyn: Dynamics, n_atoms: int, config: SampleConfig,
                      identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What defines the chunks of a sampling run (recorded in its run.json): ``identity`` (what the caller
    knows of the flow and the molecule, e.g. their hashes), for EGNN-backed dynamics the SHA-256 of the
    network's parameters and of the atom features, the settings that change the samples and the chunk size.
    Not the device, progress bars, profiling or memory budget (beyond the chunk size it sets)."""
    keep = asdict(config)
    for k in ("progress", "memory_budget_gb", "device", "profile"):
        keep.pop(k)
    flow = {"flow": record} if (record := flow_record(dyn)) else {}
    # Options at their defaults are left out: the records of runs made before the options existed.
    keep["solver"] = config.solver.record()
    if not config.quadrature_panels:
        keep.pop("quadrature_panels")
    if config.prior_scale == 1.0:
        keep.pop("prior_scale")
    return {**(identity or {}), **flow, **keep, "n_atoms": n_atoms,
            "batch_size": resolve_batch_size(dyn, n_atoms, config, _device(dyn, config), D.world_size())}


def sampling_folder(out: Path, manifest: dict[str, Any], *,
                    info: dict[str, Any] | None = None) -> AbstractContextManager[Path]:
    """Hold ``out`` for the sampling run ``manifest`` (``tbg.runfolder.claimed``): refused when it holds
    another run, or chunks or samples without a manifest."""
    return claimed(out, SAMPLING_RUN, manifest, info=info, work=(CHUNK_DIR, SAMPLES_FILE))


def _chunk_path(out: Path, c: int) -> Path:
    return out / CHUNK_DIR / f"chunk_{c:06d}.npz"


def _chunk_sizes(cfg: SampleConfig, batch: int) -> list[int]:
    return [min(batch, cfg.n_samples - start) for start in range(0, cfg.n_samples, batch)]


def _read_chunk(path: Path, size: int, n_atoms: int, likelihood: bool) -> dict[str, np.ndarray]:
    """The arrays of a chunk file, checked; InputError naming the file when it is unreadable or malformed."""
    expected = {"latents": (size, 3 * n_atoms), "samples": (size, 3 * n_atoms), "nfe": (2,),
                 **({"dlogp": (size,)} if likelihood else {})}
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in expected}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: unreadable sample chunk ({type(err).__name__}: {err})") from err
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    if shapes != expected:
        raise InputError(f"{path}: sample chunk with arrays of shapes {shapes}, expected {expected}")
    return arrays


def _set_aside_broken_chunks(out: Path, sizes: list[int], n_atoms: int, likelihood: bool) -> None:
    """Rename the chunks on disk that cannot be read to chunk_XXXXXX.npz.corrupt, so that they are sampled
    again (identically: each chunk has its own seed)."""
    for c, size in enumerate(sizes):
        path = _chunk_path(out, c)
        if path.exists():
            try:
                _read_chunk(path, size, n_atoms, likelihood)
            except InputError as err:
                aside = path.with_name(path.name + ".corrupt")
                path.replace(aside)
                log.warning("%s; set aside as %s, sampling it again", err, aside.name)


def sample_chunk(dyn: Dynamics, n_atoms: int, chunk: int, size: int, config: SampleConfig,
                 device: torch.device) -> tuple[torch.Tensor, FlowResult]:
    """Latents z [size, 3N] of chunk ``chunk`` (its own seed) and their flow with ``config``'s likelihood;
    timed as the stages "prior" and "solve" when a profiler is active."""
    with stage("prior"):
        g = torch.Generator().manual_seed(chunk_seed(config.seed, chunk))
        z = config.prior(n_atoms).sample(size, generator=g, dtype=getattr(torch, config.dtype)).to(device)
    with stage("solve"):
        if config.likelihood == "decoupled":
            return z, decoupled_likelihood(dyn, z, n_nodes=config.n_quadrature, solver=config.solver,
                                           panels=config.quadrature_panels)
        return z, integrate(dyn, z, likelihood=config.likelihood == "joint", solver=config.solver)


def sample(dyn: Dynamics, n_atoms: int, out_dir: str | Path, config: SampleConfig | None = None, *,
           identity: dict[str, Any] | None = None) -> Path:
    """Draw ``config.n_samples`` samples of one molecule with ``n_atoms`` atoms from the flow ``dyn``
    (x [B, 3N] -> v; ``dyn.divergence`` for likelihoods) into ``out_dir``; returns the merged .npz path.
    Resumes a previous run in ``out_dir`` (refusing one with another ``sampling_manifest``; ``identity`` is
    part of it); shards chunks over ranks under torchrun."""
    cfg = config or SampleConfig()
    D.init_distributed()
    out = Path(out_dir)
    manifest = sampling_manifest(dyn, n_atoms, cfg, identity)
    with ExitStack() as stack:
        D.enter_on_rank0(stack, lambda: sampling_folder(out, manifest))
        if D.rank() == 0:
            _set_aside_broken_chunks(out, _chunk_sizes(cfg, manifest["batch_size"]), n_atoms,
                                     cfg.likelihood != "none")
        return _sample_chunks(dyn, n_atoms, out, cfg, manifest["batch_size"])


def _sample_chunks(dyn: Dynamics, n_atoms: int, out: Path, cfg: SampleConfig, batch: int) -> Path:
    """The chunks not on disk yet (this rank's share), then (rank 0) samples.npz from all of them."""
    rank, world = D.rank(), D.world_size()
    (out / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    D.barrier()

    device = _device(dyn, cfg)
    if cfg.batch_size == "auto" or batch != cfg.batch_size:
        log.info("batch size %d (memory model, %s)", batch,
                 f"budget {cfg.memory_budget_gb:g} GiB" if cfg.memory_budget_gb else "default budget")
    n_chunks = math.ceil(cfg.n_samples / batch)
    mine = [c for c in range(rank, n_chunks, world) if not _chunk_path(out, c).exists()]
    # Traced: the last full chunk after the first (which pays for warm-up); last, so that the tracer's
    # leftovers touch no other chunk's measurement.
    full = [i for i, c in enumerate(mine) if i > 0 and (c + 1) * batch <= cfg.n_samples]
    traced = full[-1] if full else len(mine) - 1
    with profile_run(out, device, cfg.profile):
        for i, c in enumerate(tqdm(mine, disable=not cfg.progress or rank != 0, desc=f"sample (rank {rank}/{world})")):
            size = min(batch, cfg.n_samples - c * batch)
            with chunk_profile(size, trace=i == traced):
                z, res = sample_chunk(dyn, n_atoms, c, size, cfg, device)
                with stage("io"):
                    arrays = {"latents": z.cpu().numpy(), "samples": res.x.cpu().numpy(),
                              "nfe": np.array([res.nfe_velocity, res.nfe_divergence])}
                    if res.dlogp is not None:
                        arrays["dlogp"] = res.dlogp.cpu().numpy()
                    _write_npz(_chunk_path(out, c), **arrays)
        D.barrier()

        merged = out / SAMPLES_FILE
        if rank == 0:
            with stage("io"):
                _merge_chunks(out, merged, _chunk_sizes(cfg, batch), cfg.prior(n_atoms), cfg.likelihood != "none")
        D.barrier()
    return merged


def _merge_chunks(out: Path, merged: Path, sizes: list[int], prior: MeanFreeGaussian, likelihood: bool) -> None:
    parts = [_read_chunk(_chunk_path(out, c), size, prior.n_atoms, likelihood) for c, size in enumerate(sizes)]
    keys = ["latents", "samples"] + (["dlogp"] if likelihood else [])
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    arrays["prior_energy"] = prior.energy(torch.from_numpy(arrays["latents"])).numpy()
    nfe = np.stack([p["nfe"] for p in parts])
    arrays["nfe_per_chunk"] = nfe
    _write_npz(merged, **arrays)
    log.info("wrote %d samples to %s (mean NFE per chunk: velocity %.1f, divergence %.1f)",
             len(arrays["samples"]), merged, *nfe.mean(0))


def likelihood_error(dyn: Dynamics, latents: torch.Tensor, dlogp: torch.Tensor, *,
                     tol: float = LIKELIHOOD_CHECK_TOL, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """How far the sampler's ``dlogp`` [n] of the samples drawn from ``latents`` [n, 3N] lies from a tight
    joint solve (dopri5 on (x, dlogp), atol = rtol = ``tol``, exact divergence), which stands in for the
    truth: n, tol, mean |error| with its standard error over the samples (None for one), max |error|, in
    nats. An error of e nats in a log-weight scales that sample's importance weight by exp(e)."""
    if latents.dim() != 2 or dlogp.shape != latents.shape[:1] or len(latents) == 0:
        raise ValueError(f"need latents [n, 3N] and dlogp [n] with n >= 1, got {tuple(latents.shape)} and "
                         f"{tuple(dlogp.shape)}")
    solver = SolverConfig(method="dopri5", atol=tol, rtol=tol)
    truth = [integrate(dyn, z, likelihood=True, solver=solver).dlogp
             for z in tqdm(latents.split(batch_size), disable=not progress, desc="likelihood check")]
    err = (dlogp.double().cpu() - torch.cat(truth).double().cpu()).abs()
    stderr = err.std().item() / math.sqrt(len(err)) if len(err) > 1 else None
    return {"n": len(err), "tol": tol, "mean": err.mean().item(), "stderr": stderr, "max": err.max().item()}
