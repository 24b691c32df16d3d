"""Throughput and peak memory of sampling against the batch size on this device (``tbg profile``).

For every likelihood mode and batch size B the sweep samples whole chunks of B (the chunk code of
``tbg.flow.sample``, under a ``tbg.flow.profile.SamplingProfiler``: the same stages, evaluation counts
and memory measurement as ``tbg sample --profile``) until ``min_samples`` samples and ``min_seconds``
seconds are reached (at least one chunk). Warm-up: one chunk at the smallest batch before the first
point (libraries, thread pools, kernels), and before each point one evaluation of each right-hand side
the mode uses at that batch size (allocator growth, first use of a shape); neither is timed. Points run
from the smallest batch up, each with its own memory baseline (freed memory released first).

The result names, per mode, the batch with the highest throughput whose measured peak fits the memory
budget, and what the memory model (``tbg.flow.memory``) would choose for that budget, so the model can
be checked on any device.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tbg.flow.memory import MemoryModel
from tbg.flow.ode import Dynamics, SolverConfig
from tbg.flow.profile import PeakMemory, SamplingProfiler, machine_description
from tbg.flow.sample import Likelihood, SampleConfig, sample_chunk
from tbg.runfolder import exclusive, write_atomically

log = logging.getLogger("tbg")

__all__ = ["SweepConfig", "SweepPoint", "SweepResult", "format_sweep", "plot_sweep", "profile_sampling",
           "sweep_batch_sizes", "write_sweep"]

SWEEP_FILES = {"json": "sweep.json", "csv": "sweep.csv", "plot": "sweep.png"}


@dataclass
class SweepConfig:
    """Batch sizes and likelihood modes to measure, the solver, how long each point runs (at least
    ``min_samples`` samples and ``min_seconds`` seconds, in whole chunks, at least one) and the memory
    budget the best batch must fit (GiB; None: no limit)."""

    batch_sizes: Sequence[int] = (16, 64, 256)
    likelihoods: Sequence[Likelihood] = ("joint", "decoupled")
    solver: SolverConfig = field(default_factory=SolverConfig)
    n_quadrature: int = 16
    min_samples: int = 0
    min_seconds: float = 0.0
    memory_budget_gb: float | None = None
    dtype: str = "float32"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.solver, dict):
            self.solver = SolverConfig(**self.solver)
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if not self.likelihoods:
            raise ValueError("give at least one likelihood mode")
        for mode in self.likelihoods:
            SampleConfig(likelihood=mode)  # validates the name
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"the memory budget must be positive, got {self.memory_budget_gb} GiB")
        if self.min_samples < 0 or self.min_seconds < 0:
            raise ValueError(f"min_samples and min_seconds must be >= 0, got {self.min_samples}, {self.min_seconds}")

    def sample_config(self, likelihood: Likelihood, batch_size: int) -> SampleConfig:
        return SampleConfig(n_samples=batch_size, batch_size=batch_size, likelihood=likelihood, solver=self.solver,
                            n_quadrature=self.n_quadrature, seed=self.seed, dtype=self.dtype, progress=False)


@dataclass
class SweepPoint:
    """One (likelihood, batch size) measurement. Evaluations count one sample through the network once;
    NFE are per chunk (every sample of a chunk needs its chunk's count), median over the point's chunks."""

    likelihood: str
    batch_size: int
    samples: int
    chunks: int
    seconds: float
    samples_per_second: float
    evaluations_per_second: float
    nfe_field: float
    nfe_divergence: float
    peak_memory_bytes: int
    model_peak_bytes: int | None
    stages: dict[str, float]


@dataclass
class SweepResult:
    points: list[SweepPoint]
    device: str
    machine: dict[str, Any]
    memory_source: str
    memory_budget_bytes: float | None
    settings: dict[str, Any]
    best: dict[str, int | None]
    model_choice: dict[str, int | None]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _warm_up(dyn: Dynamics, n_atoms: int, likelihood: str, batch_size: int, dtype: torch.dtype,
             device: torch.device) -> None:
    x = torch.randn(batch_size, 3 * n_atoms, dtype=dtype, device=device)
    t = torch.tensor(0.5, dtype=dtype, device=device)
    with torch.no_grad():
        if likelihood != "joint":
            dyn(t, x)
        if likelihood != "none":
            dyn.divergence(t, x)


def _point(dyn: Dynamics, n_atoms: int, likelihood: Likelihood, batch_size: int, config: SweepConfig,
           device: torch.device, model: MemoryModel | None) -> SweepPoint:
    cfg = config.sample_config(likelihood, batch_size)
    _warm_up(dyn, n_atoms, likelihood, batch_size, getattr(torch, config.dtype), device)
    profiler = SamplingProfiler(device)
    start = time.perf_counter()
    with profiler:
        chunk = 0
        while chunk == 0 or chunk * batch_size < config.min_samples or time.perf_counter() - start < config.min_seconds:
            with profiler.chunk(batch_size):
                sample_chunk(dyn, n_atoms, chunk, batch_size, cfg, device)
            chunk += 1
    summary = profiler.summary()
    sampling = summary["sampling"]
    nfe = [c.nfe for c in profiler.chunks]
    return SweepPoint(
        likelihood=likelihood, batch_size=batch_size, samples=sampling["samples"], chunks=sampling["chunks"],
        seconds=sampling["seconds"], samples_per_second=sampling["samples_per_second"],
        evaluations_per_second=sampling["evaluations_per_second"],
        nfe_field=float(np.median([n.get("field", 0) for n in nfe])),
        nfe_divergence=float(np.median([n.get("divergence", 0) for n in nfe])),
        peak_memory_bytes=summary["memory"]["chunk_peak_bytes"],
        model_peak_bytes=None if model is None else model.peak_bytes(batch_size),
        stages={k: v["seconds"] for k, v in sampling["stages"].items()})


def sweep_batch_sizes(dyn: Dynamics, n_atoms: int, config: SweepConfig, device: torch.device | str) -> SweepResult:
    """Measure sampling throughput and peak memory for every (likelihood, batch size) of ``config`` with
    the flow ``dyn`` of one molecule of ``n_atoms`` on ``device`` (see module docstring)."""
    device = torch.device(device)
    dtype = getattr(torch, config.dtype)
    batch_sizes = sorted(set(config.batch_sizes))
    budget = None if config.memory_budget_gb is None else config.memory_budget_gb * 2**30
    # Warm-up: a whole chunk at the smallest batch, in the first mode.
    sample_chunk(dyn, n_atoms, 0, batch_sizes[0], config.sample_config(config.likelihoods[0], batch_sizes[0]),
                 device)
    points: list[SweepPoint] = []
    best: dict[str, int | None] = {}
    model_choice: dict[str, int | None] = {}
    bar = tqdm(total=len(batch_sizes) * len(config.likelihoods), disable=not config.progress, desc="profile")
    for likelihood in config.likelihoods:
        model = MemoryModel.for_dynamics(dyn, n_atoms, likelihood=likelihood, method=config.solver.method,
                                         n_quadrature=config.n_quadrature, dtype=dtype, device=device)
        for batch_size in batch_sizes:
            point = _point(dyn, n_atoms, likelihood, batch_size, config, device, model)
            points.append(point)
            bar.update()
            log.info("%s likelihood, batch %d: %.4g samples/s, peak %.1f MiB (%d samples in %.1f s)", likelihood,
                     batch_size, point.samples_per_second, point.peak_memory_bytes / 2**20, point.samples,
                     point.seconds)
        fits = [p for p in points if p.likelihood == likelihood
                and (budget is None or p.peak_memory_bytes <= budget)]
        best[likelihood] = max(fits, key=lambda p: p.samples_per_second).batch_size if fits else None
        model_choice[likelihood] = None if model is None or budget is None else model.largest_batch(budget)
    bar.close()
    settings = {"batch_sizes": batch_sizes, "likelihoods": list(config.likelihoods), "solver": asdict(config.solver),
                "n_quadrature": config.n_quadrature, "min_samples": config.min_samples,
                "min_seconds": config.min_seconds, "dtype": config.dtype, "seed": config.seed, "n_atoms": n_atoms,
                "model": None if getattr(dyn, "egnn", None) is None else dyn.egnn.extra_repr(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return SweepResult(points, str(device), machine_description(device), PeakMemory(device).source, budget, settings,
                       best, model_choice)


def format_sweep(result: SweepResult) -> str:
    """The sweep as a plain-text table with the best batch per mode."""
    lines = [f"sampling throughput and peak memory on {result.device} ({result.machine['device']}, "
             f"{result.machine['threads']} threads)",
             f"{'likelihood':<10} {'batch':>6} {'samples/s':>10} {'evals/s':>10} {'NFE v/div':>10} "
             f"{'peak MiB':>9} {'model MiB':>9} {'seconds':>8}"]
    for p in result.points:
        model = "" if p.model_peak_bytes is None else f"{p.model_peak_bytes / 2**20:.1f}"
        lines.append(f"{p.likelihood:<10} {p.batch_size:>6} {p.samples_per_second:>10.4g} "
                     f"{p.evaluations_per_second:>10.4g} {f'{p.nfe_field:g}/{p.nfe_divergence:g}':>10} "
                     f"{p.peak_memory_bytes / 2**20:>9.1f} {model:>9} {p.seconds:>8.2f}")
    budget = "no memory budget" if result.memory_budget_bytes is None else \
        f"memory budget {result.memory_budget_bytes / 2**30:g} GiB"
    for mode, batch in result.best.items():
        model = result.model_choice.get(mode)
        lines.append(f"best batch for {mode} ({budget}): {batch if batch is not None else 'none fits'}"
                     + (f"; the memory model's choice: {model}" if model is not None else ""))
    lines.append(f"memory: {result.memory_source}, peak above the memory held before each point")
    return "\n".join(lines)


def plot_sweep(result: SweepResult, path: Path) -> Path:
    """Throughput (samples/s) and peak memory (MiB) against the batch size (log2 axis), one line per
    likelihood mode; the memory model dashed, the budget dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    speed, memory = fig.subplots(1, 2)
    for mode in dict.fromkeys(p.likelihood for p in result.points):
        rows = [p for p in result.points if p.likelihood == mode]
        b = [p.batch_size for p in rows]
        line, = speed.plot(b, [p.samples_per_second for p in rows], "o-", label=mode)
        memory.plot(b, [p.peak_memory_bytes / 2**20 for p in rows], "o-", color=line.get_color(),
                    label=f"{mode} measured")
        if all(p.model_peak_bytes is not None for p in rows):
            memory.plot(b, [p.model_peak_bytes / 2**20 for p in rows], "--", color=line.get_color(),
                        label=f"{mode} model")
        if result.best.get(mode) is not None:
            best = next(p for p in rows if p.batch_size == result.best[mode])
            speed.plot([best.batch_size], [best.samples_per_second], "*", ms=14, color=line.get_color())
    if result.memory_budget_bytes is not None:
        memory.axhline(result.memory_budget_bytes / 2**20, ls=":", color="k", label="budget")
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (samples per chunk)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    speed.set_ylabel("throughput (samples / s)")
    memory.set_ylabel("peak memory above baseline (MiB)")
    memory.set_yscale("log")
    fig.suptitle(f"sampling on {result.device} ({result.machine['device']}); * = best within budget", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def write_sweep(result: SweepResult, out_dir: Path) -> dict[str, Path]:
    """sweep.json (everything), sweep.csv (one row per point) and sweep.png in ``out_dir`` (each written
    atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / name for k, name in SWEEP_FILES.items()}
    write_atomically(paths["json"],
                     lambda tmp: tmp.write_text(json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n"))
    write_atomically(paths["csv"], lambda tmp: _write_csv(result, tmp))
    write_atomically(paths["plot"], lambda tmp: plot_sweep(result, tmp))
    return paths


def _write_csv(result: SweepResult, path: Path) -> None:
    stage_names = sorted({k for p in result.points for k in p.stages})
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["likelihood", "batch_size", "samples", "chunks", "seconds", "samples_per_second",
                         "evaluations_per_second", "nfe_field", "nfe_divergence", "peak_memory_mib",
                         "model_peak_mib"] + [f"{s}_seconds" for s in stage_names])
        for p in result.points:
            writer.writerow([p.likelihood, p.batch_size, p.samples, p.chunks, f"{p.seconds:.6g}",
                             f"{p.samples_per_second:.6g}", f"{p.evaluations_per_second:.6g}", p.nfe_field,
                             p.nfe_divergence, f"{p.peak_memory_bytes / 2**20:.3f}",
                             "" if p.model_peak_bytes is None else f"{p.model_peak_bytes / 2**20:.3f}"]
                            + [f"{p.stages.get(s, 0.0):.6g}" for s in stage_names])


def profile_sampling(dyn: Dynamics, n_atoms: int, config: SweepConfig, device: torch.device | str,
                     out_dir: Path, *, record: Callable[[Path], None] | None = None
                     ) -> tuple[SweepResult, dict[str, Path]]:
    """``sweep_batch_sizes``, then ``write_sweep`` into ``out_dir``, holding the folder's lock
    (``tbg.runfolder.exclusive``) throughout; ``record(out_dir)``, if given, is called once the lock is
    held (the CLI writes its resolved options there). Logs where the files are."""
    with exclusive(out_dir):
        if record is not None:
            record(out_dir)
        result = sweep_batch_sizes(dyn, n_atoms, config, device)
        paths = write_sweep(result, out_dir)
    log.info("sweep written to %s", ", ".join(str(p) for p in paths.values()))
    return result, paths
