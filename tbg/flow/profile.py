"""Profiling sampling runs: where the time goes, how many evaluations each sample needed, peak memory.

``SampleConfig(profile=True)`` (``tbg sample --profile``) runs the sampler under a ``SamplingProfiler``,
which writes ``profile.json`` and ``trace.json`` beside the samples and logs a short table. The
profiler is found through a context variable, so the instrumented code (the ODE right-hand sides in
``tbg.flow.ode``, the chunk loop of ``tbg.flow.sample``, the export in ``tbg.flow.runs``) only says
``with stage("field"): ...``; without an active profiler ``stage`` is a shared no-op context, so a
normal run neither synchronises the GPU nor records anything.

Stages (each a ``torch.profiler.record_function`` range named ``tbg.<stage>``, and an NVTX range on
CUDA, so Perfetto / chrome://tracing and Nsight Systems show them):

* ``prior``: drawing a chunk's latents (and moving them to the device);
* ``solve``: the whole ODE solve of a chunk; inside it ``field`` (evaluations of v alone) and
  ``divergence`` (evaluations of v together with div v); the report's ``solver`` is the rest of the
  solve (the Runge-Kutta combinations, error control, dense output, quadrature sums);
* ``io``: writing chunks, merging them, trajectories and weights for viewers;
* ``energies``: force-field energies of the samples (the weights written by ``tbg sample``);
* ``profiler``: the tracer's overhead in the traced chunk (its time outside the stages) and writing
  trace.json; the traced chunk's stages run slower too, so the throughput leaves that chunk out when
  there are others.

The trace (trace.json) covers one chunk: every stage as a range, and inside the first
``TRACE_DETAILED_EVALUATIONS`` evaluations of each kind the ops (ours, ``tbg::*``, without the CPU ops
they call internally, which ``drop_internal_ops`` removes; GPU kernels on CUDA); later evaluations show
as their stage range only (collection paused inside), so the trace's size and the tracer's memory and
time grow with the batch size but not with the number of evaluations.

Timing on a GPU: kernels run asynchronously, so while profiling every stage boundary calls
``torch.cuda.synchronize()``; that makes the split exact at the cost of a little overlap between
host and device (normal runs never synchronise). Peak memory (``PeakMemory``): on a GPU the CUDA
caching allocator's ``max_memory_allocated`` (tensors) above what was allocated at the start, on the
CPU the resident set's high-water mark (Linux: VmHWM of /proc/self/status, reset through
/proc/self/clear_refs; elsewhere the process-lifetime ``ru_maxrss`` of ``resource.getrusage``) above
the resident set at the start, after returning freed heap pages to the system (glibc
``malloc_trim``), so that memory freed earlier but still resident is not mistaken for headroom.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbg.flow import distributed as D
from tbg.runfolder import temporary_path, write_atomically

log = logging.getLogger("tbg")

__all__ = ["PeakMemory", "SamplingProfiler", "chunk_profile", "format_profile", "machine_description",
           "profile_run", "stage"]

PROFILE_FILE = "profile.json"
TRACE_FILE = "trace.json"
# Stages whose times add up to (at most) the wall time; field and divergence lie inside solve.
TOP_STAGES = ("prior", "solve", "io", "energies")
# Evaluations of each kind traced in full in the traced chunk; later ones appear as their stage range only.
TRACE_DETAILED_EVALUATIONS = 2
EVALUATION_STAGES = ("field", "divergence")


# ---- memory ----------------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _lifetime_peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _release_free_heap() -> None:
    """Return freed heap pages to the system (glibc), so that the next peak counts every page it touches."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name and "libc.so" in name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


class PeakMemory:
    """Peak memory of a stretch of work above the memory held when ``start`` was called.

    ``start()`` sets the baseline; ``segment()`` returns the peak since the previous ``segment`` (or
    ``start``), above the baseline and in all, and begins a new segment. ``source`` says what is
    measured (see the module docstring).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.source = "CUDA caching allocator: torch.cuda.max_memory_allocated (tensors)"
        elif _proc_status_bytes("VmHWM") is not None and _reset_rss_peak():
            self.source = "resident set high-water mark (Linux VmHWM, reset per segment)"
        else:
            self.source = "process-lifetime peak resident set (resource.getrusage ru_maxrss)"
        self._resettable = self.cuda or "VmHWM" in self.source
        self.baseline = 0

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        if self._resettable:
            return _proc_status_bytes("VmRSS") or 0
        return _lifetime_peak_rss()

    def _peak_total(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if self._resettable:
            return _proc_status_bytes("VmHWM") or 0
        return _lifetime_peak_rss()

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._resettable:
            _reset_rss_peak()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        else:
            _release_free_heap()
        self._reset_peak()
        self.baseline = self._current()

    def segment(self) -> tuple[int, int]:
        """(peak bytes above the baseline, peak bytes in all) since the last segment; starts the next one."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        total = self._peak_total()
        self._reset_peak()
        return max(0, total - self.baseline), total


# ---- stages and chunks -----------------------------------------------------------------------------
@dataclass
class ChunkRecord:
    """One chunk: samples, wall seconds, seconds per stage, evaluations of the right-hand side (``nfe``:
    calls on the whole chunk, per kind), peak memory."""

    size: int
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    nfe: dict[str, int] = field(default_factory=dict)
    peak_memory_bytes: int = 0
    traced: bool = False


class SamplingProfiler:
    """Records stage times, evaluation counts and peak memory of a sampling run on ``device``.

    Activate it with ``with profiler:``; code then reports through ``stage`` and ``chunk_profile``.
    ``trace_path``: where the torch.profiler trace of the chunk marked ``trace=True`` goes (None: no trace).
    """

    def __init__(self, device: torch.device | str, trace_path: Path | None = None) -> None:
        self.device = torch.device(device)
        self.trace_path = trace_path
        self.traced_chunk: int | None = None
        self.trace_events: tuple[int, int] | None = None  # (kept, dropped) by drop_internal_ops
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.chunks: list[ChunkRecord] = []
        self.memory = PeakMemory(self.device)
        # Peaks over everything but the traced chunk (the profiler's own buffers would count there).
        self.peak_bytes = self.peak_total_bytes = self.traced_peak_bytes = 0
        self.wall = 0.0
        self._start = 0.0
        self._token: Any = None
        self._activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._active_tracer: torch.profiler.profile | None = None  # during the traced chunk
        self._traced_calls: Counter[str] = Counter()

    def __enter__(self) -> SamplingProfiler:
        if _ACTIVE.get() is not None:
            raise RuntimeError("a SamplingProfiler is already active in this context")
        self._token = _ACTIVE.set(self)
        self.memory.start()
        self.peak_bytes = self.peak_total_bytes = self.traced_peak_bytes = 0
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.wall += time.perf_counter() - self._start
        self._record_peak(traced=False)
        _ACTIVE.reset(self._token)

    def _record_peak(self, traced: bool) -> int:
        peak, total = self.memory.segment()
        if traced:
            self.traced_peak_bytes = max(self.traced_peak_bytes, peak)
        else:
            self.peak_bytes, self.peak_total_bytes = max(self.peak_bytes, peak), max(self.peak_total_bytes, total)
        return peak

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        label = f"tbg.{name}"
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(label), _nvtx(label, self.device):
            detailed = self._trace_inside(name)
            try:
                yield
                self._sync()
            finally:
                if not detailed:
                    self._collect(True)
        self.seconds[name] += time.perf_counter() - start
        if name in EVALUATION_STAGES:
            self.calls[name] += 1

    def _trace_inside(self, name: str) -> bool:
        """Whether the tracer records what runs inside this stage: everything but the evaluations of a kind
        after its first ``TRACE_DETAILED_EVALUATIONS`` in the traced chunk; those keep only their stage range
        (collection paused inside), so the trace's size and the tracer's cost do not grow with the NFE."""
        if self._active_tracer is None or name not in EVALUATION_STAGES:
            return True
        self._traced_calls[name] += 1
        if self._traced_calls[name] <= TRACE_DETAILED_EVALUATIONS:
            return True
        self._collect(False)
        return False

    def _collect(self, enabled: bool) -> None:
        assert self._active_tracer is not None
        with _native_stderr_silenced():  # torch logs a (here irrelevant) GPU-track warning on every toggle
            self._active_tracer.toggle_collection_dynamic(enabled, self._activities)

    @contextlib.contextmanager
    def chunk(self, size: int, trace: bool = False) -> Iterator[ChunkRecord]:
        record = ChunkRecord(size)
        seconds, calls = self.seconds.copy(), self.calls.copy()
        record.traced = trace and self.trace_path is not None and self.traced_chunk is None
        self._record_peak(traced=False)  # what came before the chunk is not the chunk's
        self._sync()
        start = time.perf_counter()
        tracer = self._new_tracer() if record.traced else None
        if tracer is not None:
            with self._kineto_notes_silenced():
                tracer.start()
            self._active_tracer, self._traced_calls = tracer, Counter()
        try:
            with torch.profiler.record_function(f"tbg.chunk[{size}]"):
                yield record
                self._sync()
        finally:
            if tracer is not None:
                self._active_tracer = None
                with self._kineto_notes_silenced():
                    tracer.stop()
        record.seconds = time.perf_counter() - start
        record.stages = {k: v - seconds[k] for k, v in self.seconds.items() if v - seconds[k] > 0}
        record.nfe = {k: v - calls[k] for k, v in self.calls.items() if v > calls[k]}
        record.peak_memory_bytes = self._record_peak(record.traced)
        if record.traced:
            self.traced_chunk = len(self.chunks)
            # The tracer's overhead: the traced chunk's time outside its stages.
            self.seconds["profiler"] += record.seconds - sum(record.stages.get(k, 0.0) for k in TOP_STAGES)
            self._export_trace(tracer)
        self.chunks.append(record)

    def _kineto_notes_silenced(self) -> contextlib.AbstractContextManager[None]:
        """On the CPU, the tracer's start and stop print notes from its GPU side to stderr (USDT lines, a
        failed GPU count); silence them there. On a GPU they may matter and are kept."""
        return _native_stderr_silenced() if self.device.type == "cpu" else contextlib.nullcontext()

    def _new_tracer(self) -> torch.profiler.profile:
        activities = self._activities
        try:  # torch >= 2.11: skip building Python event objects (GBs for a large chunk); only the export is used
            config = torch._C._profiler._ExperimentalConfig(trace_only=True)
        except (AttributeError, TypeError):
            config = None
        return torch.profiler.profile(activities=activities, experimental_config=config)

    def _export_trace(self, tracer: torch.profiler.profile) -> None:
        """Write the trace without the internal ATen calls of our fused ops; the time it takes is the
        stage "profiler" (not the chunk's)."""
        start = time.perf_counter()
        assert self.trace_path is not None
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        raw = temporary_path(self.trace_path.with_suffix(".raw.json"))
        counts: list[tuple[int, int]] = []
        try:
            tracer.export_chrome_trace(str(raw))
            write_atomically(self.trace_path, lambda tmp: counts.append(drop_internal_ops(raw, tmp)))
        finally:
            raw.unlink(missing_ok=True)
        self.trace_events = counts[0]
        self.seconds["profiler"] += time.perf_counter() - start

    # ---- the report ------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The profile as a JSON-ready dict (the content of profile.json)."""
        timed = [c for c in self.chunks if not c.traced] or self.chunks
        run_stages = stage_breakdown(self.seconds, self.wall)
        sampled = sum(c.size for c in timed)
        chunk_seconds = sum(c.seconds for c in timed)
        chunk_stages: Counter[str] = Counter()
        for c in timed:
            chunk_stages.update(c.stages)
        evaluations = sample_evaluations(timed)
        return {
            "device": str(self.device),
            "machine": machine_description(self.device),
            "timing": ("wall clock (time.perf_counter); on CUDA every stage boundary synchronises the device "
                       "while profiling (never in normal runs)"),
            "run": {"wall_seconds": self.wall, "stages": run_stages,
                    "samples": sum(c.size for c in self.chunks), "chunks": len(self.chunks)},
            "sampling": {
                "note": ("over the chunks without the trace (the profiler slows the traced chunk), unless it "
                         "was the only one"),
                "chunks": len(timed), "samples": sampled, "seconds": chunk_seconds,
                "samples_per_second": sampled / chunk_seconds if chunk_seconds > 0 else None,
                "evaluations": dict(evaluations),
                "evaluations_per_second": (sum(evaluations.values()) / chunk_seconds
                                           if chunk_seconds > 0 else None),
                "evaluations_note": ("one evaluation = one sample through the network once: v alone (field) or "
                                     "v with its exact divergence (divergence); per second of chunk wall time"),
                "stages": stage_breakdown(chunk_stages, chunk_seconds),
            },
            "nfe_per_sample": nfe_distribution(self.chunks),
            "memory": {
                "source": self.memory.source, "baseline_bytes": self.memory.baseline,
                "chunk_peak_bytes": max((c.peak_memory_bytes for c in timed), default=0),
                "run_peak_bytes": self.peak_bytes, "run_peak_total_bytes": self.peak_total_bytes,
                "traced_chunk_peak_bytes": self.traced_peak_bytes,
                "note": ("above the memory held when profiling started (model, libraries): chunk_peak_bytes over the "
                         "chunks of the throughput (what a batch needs), run_peak_bytes over the whole run but the "
                         "traced chunk (with merging, the export, and libraries loaded on the way); "
                         "run_peak_total_bytes includes the start")},
            "trace": ({"path": self.trace_path.name, "chunk": self.traced_chunk, "events": self.trace_events[0],
                       "internal_op_events_dropped": self.trace_events[1]}
                      if self.traced_chunk is not None and self.trace_path and self.trace_events else None),
            "chunks": [{"size": c.size, "seconds": c.seconds, "stages": c.stages, "nfe": c.nfe,
                        "peak_memory_bytes": c.peak_memory_bytes, "traced": c.traced} for c in self.chunks],
        }


def sample_evaluations(chunks: list[ChunkRecord]) -> dict[str, int]:
    """Evaluations counted per sample (a call on a chunk of B samples counts B), per kind."""
    total: Counter[str] = Counter()
    for c in chunks:
        total.update({k: n * c.size for k, n in c.nfe.items()})
    return dict(total)


def stage_breakdown(seconds: Counter[str] | dict[str, float], wall: float) -> dict[str, dict[str, float]]:
    """Seconds and share of ``wall`` per reported stage: field, divergence, solver (the rest of solve),
    prior, io, energies, profiler (the tracer's overhead), other (wall minus all of them). Stages nest only
    as field and divergence inside solve, so every entry is >= 0 and they add up to ``wall``."""
    get = lambda name: float(seconds.get(name, 0.0))  # noqa: E731
    parts = {"field": get("field"), "divergence": get("divergence"),
             "solver": get("solve") - get("field") - get("divergence"), "prior": get("prior"), "io": get("io"),
             "energies": get("energies"), "profiler": get("profiler")}
    parts["other"] = wall - sum(parts.values())
    return {k: {"seconds": v, "share": v / wall if wall > 0 else 0.0} for k, v in parts.items()}


def nfe_distribution(chunks: list[ChunkRecord], bins: int = 10) -> dict[str, Any]:
    """Evaluations per sample over the samples of ``chunks``: min/median/max and a histogram per kind.

    The solvers step a whole chunk together (an adaptive solver controls the error of the batch as a
    whole), so every sample of a chunk needed its chunk's count; the spread is between chunks.
    """
    out: dict[str, Any] = {"note": ("evaluations each sample went through: the count of its chunk (a chunk is "
                                    "integrated as one batch with shared steps); distribution over samples")}
    sizes = np.array([c.size for c in chunks], dtype=np.int64)
    for kind in EVALUATION_STAGES + ("total",):
        per_chunk = np.array([sum(c.nfe.values()) if kind == "total" else c.nfe.get(kind, 0) for c in chunks],
                             dtype=np.int64)
        if per_chunk.size == 0 or not per_chunk.any():
            continue
        per_sample = np.repeat(per_chunk, sizes)
        counts, edges = np.histogram(per_sample, bins=min(bins, int(np.ptp(per_sample)) + 1))
        out[kind] = {"min": int(per_sample.min()), "median": float(np.median(per_sample)),
                     "max": int(per_sample.max()), "mean": float(per_sample.mean()),
                     "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}
    return out


# ---- trace filtering -------------------------------------------------------------------------------
def _trace_items(path: Path, block: int = 1 << 22) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Stream a Chrome trace: ("text before the events", None), then (event JSON, event) for each entry of
    traceEvents, then ("text after them", None), without holding the file in memory."""
    decoder = json.JSONDecoder()
    with path.open() as fh:
        buf = fh.read(block)
        pos = buf.index("[", buf.index('"traceEvents"')) + 1
        yield buf[:pos], None
        while True:
            while True:  # skip separators, reading on as needed
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf):
                    break
                more = fh.read(block)
                if not more:
                    raise ValueError(f"{path}: the trace ends inside traceEvents")
                buf, pos = more, 0
            if buf[pos] == "]":
                yield buf[pos:] + fh.read(), None
                return
            while True:
                try:
                    event, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    more = fh.read(block)
                    if not more:
                        raise
                    buf, pos = buf[pos:] + more, 0
            yield buf[pos:end], event
            pos = end


def drop_internal_ops(raw: Path, out: Path) -> tuple[int, int]:
    """Copy the Chrome trace ``raw`` to ``out`` without the CPU op events that run inside one of our ops
    (``tbg::*``), on any thread: the ATen calls the C++ kernels make internally (the CPU divergence kernel
    makes ~2000 per molecule and evaluation, which would make a trace of a real chunk hundreds of MB).
    Our ops, the stage ranges, everything outside our ops and all GPU events stay. Kineto writes events
    in order of start time, so one pass suffices. Returns (events kept, events dropped)."""
    kept = dropped = 0
    span_end = -math.inf
    with out.open("w") as fh:
        for text, event in _trace_items(raw):
            if event is None:  # the text before the events, then the text after them
                fh.write(text if fh.tell() == 0 else "\n" + text)
                continue
            name, ts = str(event.get("name", "")), event.get("ts")
            if event.get("ph") == "X" and ts is not None:
                if name.startswith("tbg::"):
                    span_end = max(span_end, float(ts) + float(event.get("dur", 0)))
                elif event.get("cat") == "cpu_op" and float(ts) + float(event.get("dur", 0)) <= span_end:
                    dropped += 1
                    continue
            fh.write(("\n" if kept == 0 else ",\n") + text)
            kept += 1
    return kept, dropped


def machine_description(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on: device name, CPU, threads, torch, load average."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    info: dict[str, Any] = {"device": name, "cpu": _cpu_name(), "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version()}
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_profile(profile: dict[str, Any]) -> str:
    """A short plain-text table of a profile (``SamplingProfiler.summary()`` / profile.json)."""
    run, sampling, nfe, mem = profile["run"], profile["sampling"], profile["nfe_per_sample"], profile["memory"]
    lines = [f"sampling profile on {profile['device']} ({profile['machine']['device']}): {run['samples']} samples "
             f"in {run['chunks']} chunks, {run['wall_seconds']:.2f} s",
             f"{'stage':<11} {'seconds':>9} {'share':>7}  {'evaluations':>12} {'per second':>11}"]
    for name, row in run["stages"].items():
        n_eval = sum(c["nfe"].get(name, 0) * c["size"] for c in profile["chunks"])
        rate = f"{n_eval / row['seconds']:.4g}" if n_eval and row["seconds"] > 0 else ""
        lines.append(f"{name:<11} {row['seconds']:>9.3f} {row['share']:>6.1%}  {n_eval or '':>12} {rate:>11}")
    if sampling["samples_per_second"] is not None:
        lines.append(f"throughput: {sampling['samples_per_second']:.4g} samples/s, "
                     f"{sampling['evaluations_per_second']:.4g} evaluations/s ({sampling['chunks']} chunk(s) "
                     f"{'without' if profile['trace'] and sampling['chunks'] < run['chunks'] else 'incl.'} the trace)")
    for kind in ("field", "divergence"):
        if kind in nfe:
            d = nfe[kind]
            lines.append(f"{kind} evaluations per sample (its chunk's): min {d['min']}, median {d['median']:g}, "
                         f"max {d['max']}")
    lines.append(f"peak memory of a chunk: {_mib(mem['chunk_peak_bytes'])} above the start; of the whole run "
                 f"{_mib(mem['run_peak_bytes'])} ({_mib(mem['run_peak_total_bytes'])} in all); {mem['source']}")
    if profile["trace"]:
        lines.append(f"trace of chunk {profile['trace']['chunk']}: {profile['trace']['path']} "
                     "(Perfetto, chrome://tracing)")
    return "\n".join(lines)


# ---- the active profiler ---------------------------------------------------------------------------
_ACTIVE: ContextVar[SamplingProfiler | None] = ContextVar("tbg_sampling_profiler", default=None)
_NO_OP = contextlib.nullcontext()


def active_profiler() -> SamplingProfiler | None:
    return _ACTIVE.get()


def stage(name: str) -> contextlib.AbstractContextManager[None]:
    """Time the enclosed work as stage ``name`` of the active profiler (a no-op without one)."""
    profiler = _ACTIVE.get()
    return _NO_OP if profiler is None else profiler.stage(name)


def chunk_profile(size: int, trace: bool = False) -> contextlib.AbstractContextManager[ChunkRecord | None]:
    """Record the enclosed work as one chunk of ``size`` samples (traced when ``trace`` and no chunk has
    been yet); a no-op without an active profiler."""
    profiler = _ACTIVE.get()
    return _NO_OP if profiler is None else profiler.chunk(size, trace)


@contextlib.contextmanager
def profile_run(out_dir: Path, device: torch.device | str, enabled: bool = True) -> Iterator[SamplingProfiler | None]:
    """Profile the enclosed sampling run into ``out_dir`` (profile.json, trace.json; under torchrun every rank
    profiles its own work into profile_rank{r}.json, trace_rank{r}.json) and log the table. Joins a profiler
    that is already active (whoever started it writes the files); does nothing unless ``enabled``."""
    if not enabled:
        yield None
        return
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    D.init_distributed()
    suffix = "" if D.world_size() == 1 else f"_rank{D.rank()}"
    stem, ext = TRACE_FILE.rsplit(".", 1)
    profiler = SamplingProfiler(device, trace_path=out_dir / f"{stem}{suffix}.{ext}")
    with profiler:
        yield profiler
    summary = profiler.summary()
    stem, ext = PROFILE_FILE.rsplit(".", 1)
    path = out_dir / f"{stem}{suffix}.{ext}"
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n"))
    log.info("%s\nprofile: %s", format_profile(summary), path)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Discard what native code writes to the process's stderr (file descriptor 2) in the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _nvtx(label: str, device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(label)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
