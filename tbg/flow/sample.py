"""Sampling the flow with exact likelihoods, in resumable chunks, sharded over ranks.

The n requested samples are cut into chunks of at most ``batch_size``; chunk c draws its latents from
its own seed (derived from (seed, c)), so the result does not depend on how many processes ran, in
which order, or how often the run was interrupted. Each finished chunk is written atomically to
``chunks/chunk_XXXXXX.npz``; a restarted run skips the chunks on disk, so nothing is lost or repeated.
Under torchrun rank r computes the chunks c = r mod W; rank 0 then merges all chunks, in order, into
``samples.npz`` with ``latents`` [n, 3N], ``samples`` [n, 3N] (model units) and ``dlogp`` [n]
(absent when ``likelihood="none"``), plus ``prior_energy`` [n] for reweighting.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from tbg.flow import distributed as D
from tbg.flow.ode import Dynamics, SolverConfig, decoupled_likelihood, integrate
from tbg.flow.prior import MeanFreeGaussian

log = logging.getLogger("tbg")

__all__ = ["SampleConfig", "sample", "chunk_seed", "batch_size_for_budget"]

Likelihood = Literal["joint", "decoupled", "none"]


@dataclass
class SampleConfig:
    """Sampling options. ``likelihood``: "joint" (published augmented ODE), "decoupled" (x path then
    Gauss-Legendre quadrature of div v at ``n_quadrature`` nodes) or "none" (samples only, cheapest).
    ``memory_budget_gb`` caps the batch size through ``batch_size_for_budget`` when the dynamics is an
    EGNN-backed one."""

    n_samples: int = 1000
    batch_size: int = 500
    likelihood: Likelihood = "joint"
    solver: SolverConfig = field(default_factory=SolverConfig)
    n_quadrature: int = 16
    memory_budget_gb: float | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None  # where latents go; default: the EGNN's device for tbg dynamics, else the CPU
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.solver, dict):
            self.solver = SolverConfig(**self.solver)
        if self.likelihood not in ("joint", "decoupled", "none"):
            raise ValueError(f"likelihood must be 'joint', 'decoupled' or 'none', got {self.likelihood!r}")
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError(f"n_samples and batch_size must be >= 1, got {self.n_samples}, {self.batch_size}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent 63-bit seed of chunk ``chunk`` of a run with ``seed``."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def batch_size_for_budget(memory_budget_bytes: float, n_atoms: int, hidden: int, likelihood: bool,
                          element_bytes: int = 4) -> int:
    """Largest batch whose EGNN activations fit the budget (a heuristic upper bound).

    The field's working set is dominated by edge tensors of N (N - 1) x H values; inference keeps about
    8 of them alive. The exact divergence also carries tangents through those tensors (up to 3N of them,
    chunked by the divergence engine to at most 32), so it needs up to 33 times as much.
    """
    per_edge_set = n_atoms * (n_atoms - 1) * hidden * element_bytes
    factor = 8 * (1 + min(3 * n_atoms, 32)) if likelihood else 8
    return max(1, int(memory_budget_bytes // (per_edge_set * factor)))


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _manifest(cfg: SampleConfig, n_atoms: int, batch_size: int) -> dict:
    keep = asdict(cfg)
    for k in ("progress", "memory_budget_gb", "device"):
        keep.pop(k)
    return {**keep, "batch_size": batch_size, "n_atoms": n_atoms}


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "sampling.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(manifest)):
            raise RuntimeError(f"{out} holds chunks from a different sampling setup ({old}); use another "
                               f"output folder or the same settings ({manifest})")
    elif D.rank() == 0:
        tmp = path.with_name(path.name + ".tmp")  # other ranks may read it meanwhile: never half a file
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


def sample(dyn: Dynamics, n_atoms: int, out_dir: str | Path, config: SampleConfig | None = None) -> Path:
    """Draw ``config.n_samples`` samples of one molecule with ``n_atoms`` atoms from the flow ``dyn``
    (x [B, 3N] -> v; ``dyn.divergence`` for likelihoods) into ``out_dir``; returns the merged .npz path.
    Resumes a previous run in ``out_dir``; shards chunks over ranks under torchrun."""
    cfg = config or SampleConfig()
    D.init_distributed()
    rank, world = D.rank(), D.world_size()
    out = Path(out_dir)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    batch = cfg.batch_size
    egnn = getattr(dyn, "egnn", None)
    if cfg.memory_budget_gb is not None and egnn is not None:
        fit = batch_size_for_budget(cfg.memory_budget_gb * 2**30, n_atoms, egnn.hidden, cfg.likelihood != "none",
                                    torch.finfo(getattr(torch, cfg.dtype)).bits // 8)
        batch = min(batch, fit)
    _check_manifest(out, _manifest(cfg, n_atoms, batch))
    D.barrier()

    prior = MeanFreeGaussian(n_atoms)
    dtype = getattr(torch, cfg.dtype)
    if cfg.device is not None:
        device = torch.device(cfg.device)
    else:
        device = egnn.embedding.weight.device if egnn is not None else torch.device("cpu")
    n_chunks = math.ceil(cfg.n_samples / batch)
    mine = [c for c in range(rank, n_chunks, world) if not (out / "chunks" / f"chunk_{c:06d}.npz").exists()]
    for c in tqdm(mine, disable=not cfg.progress or rank != 0, desc=f"sample (rank {rank}/{world})"):
        size = min(batch, cfg.n_samples - c * batch)
        g = torch.Generator().manual_seed(chunk_seed(cfg.seed, c))
        z = prior.sample(size, generator=g, dtype=dtype).to(device)
        if cfg.likelihood == "decoupled":
            res = decoupled_likelihood(dyn, z, n_nodes=cfg.n_quadrature, solver=cfg.solver)
        else:
            res = integrate(dyn, z, likelihood=cfg.likelihood == "joint", solver=cfg.solver)
        arrays = {"latents": z.cpu().numpy(), "samples": res.x.cpu().numpy(),
                  "nfe": np.array([res.nfe_velocity, res.nfe_divergence])}
        if res.dlogp is not None:
            arrays["dlogp"] = res.dlogp.cpu().numpy()
        _write_npz(out / "chunks" / f"chunk_{c:06d}.npz", **arrays)
    D.barrier()

    merged = out / "samples.npz"
    if rank == 0:
        parts = [np.load(out / "chunks" / f"chunk_{c:06d}.npz") for c in range(n_chunks)]
        keys = ["latents", "samples"] + (["dlogp"] if cfg.likelihood != "none" else [])
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        arrays["prior_energy"] = prior.energy(torch.from_numpy(arrays["latents"])).numpy()
        nfe = np.stack([p["nfe"] for p in parts])
        arrays["nfe_per_chunk"] = nfe
        _write_npz(merged, **arrays)
        log.info("wrote %d samples to %s (mean NFE per chunk: velocity %.1f, divergence %.1f)",
                 len(arrays["samples"]), merged, *nfe.mean(0))
    D.barrier()
    return merged
