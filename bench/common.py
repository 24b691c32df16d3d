"""Measurement helpers shared by the bench/ scripts: timing with peak memory, the practical matmul
ceiling, and a one-line description of the machine (every result states its hardware).

Scripts run as `python bench/NAME.py` (or `tbg bench NAME`), so this module is importable as `common`.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], Any], device: str | torch.device, repeats: int, warmup: int = 1
            ) -> tuple[float, float, Any]:
    """(median seconds of `repeats` calls, peak extra memory in MiB, last result) of fn().

    Peak memory counts the warm-up too (first-call allocations are real): on CUDA
    torch.cuda.max_memory_allocated above the allocation before the call; on CPU the peak resident
    set size (VmHWM, reset through /proc/self/clear_refs) above the resident size before it. On CPU
    this undercounts buffers that reuse heap pages already resident from earlier work.
    """
    cuda = torch.device(device).type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_bytes("VmRSS")
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    return statistics.median(times), (peak - base) / 2**20, out


def matmul_peak_gflops(device: str | torch.device = "cpu", n: int = 2048, tf32: bool = False) -> float:
    """Practical fp32 ceiling: GFLOP/s of an n^3 torch.mm measured now, TF32 off (or on: the TF32
    tensor-core ceiling on a GPU)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        seconds, _, _ = measure(lambda: torch.mm(a, b), device, 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / seconds / 1e9


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: str | torch.device = "cpu") -> str:
    """The hardware and software a result was measured on, in one line."""
    dev = torch.device(device)
    if dev.type == "cuda":
        hw = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    else:
        hw = f"{cpu_name()}, {os.cpu_count()} cpus visible, {torch.get_num_threads()} torch threads"
    return (f"{hw}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
