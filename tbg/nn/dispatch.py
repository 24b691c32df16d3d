"""Which implementation serves each torch.ops.tbg operator on each device, and whether it has run on
GPU hardware (what ``tbg info`` prints).

Implementations: the C++ CPU kernels (csrc/), the CUDA kernels in .cu files, and the Python
implementations tbg.nn.ops installs for CUDA: the torch-ops code of the divergence
(tbg.nn.divergence_torch), where no compiled kernel exists, or, opt-in by TBG_TRITON, the Triton kernels
(tbg.nn.triton; TBG_TRITON=egnn in place of the .cu kernels).
``GPU_VERIFIED`` records, by hand after each GPU run, which of them have passed their CUDA checks on a
GPU; an implementation missing from it has not (the protocol: docs/gpu.md).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from tbg import _library
from tbg.nn import divergence_torch, ops
from tbg.nn import triton as triton_impl

CPP = "C++ CPU kernel"
CU = ".cu kernel"
TORCH_OPS = "batched torch ops"
TRITON = "Triton"
# Module of a Python CUDA implementation -> its name here.
PYTHON_IMPLEMENTATIONS = {divergence_torch.__name__: TORCH_OPS,
                          **{group.module: TRITON for group in triton_impl.GROUPS.values()}}

# (implementation, op) -> GPU and date of the run that passed its CUDA checks (see bench/RESULTS.md).
GPU_VERIFIED: dict[tuple[str, str], str] = {
    (CU, "egnn_forward"): "NVIDIA H100 80GB HBM3, 2026-11-22",
    (CU, "egnn_backward"): "NVIDIA H100 80GB HBM3, 2026-11-22",
}


class Implementation(NamedTuple):
    op: str
    device: str                # "cpu" or "cuda"
    name: str | None           # None: the op has no kernel for the device in this build
    gpu_verified: str | None   # cuda only: the GPU run that verified it, None if none has


def implementations() -> list[Implementation]:
    """Every registered tbg op on cpu and cuda, with the implementation the dispatcher takes."""
    rows = []
    for op in _library.build_info()["ops"]:
        rows.append(Implementation(op, "cpu", CPP if _library.has_kernel(op, "cpu") else None, None))
        python = ops.PYTHON_CUDA_IMPLEMENTATIONS.get(op)
        if python is not None:
            name = PYTHON_IMPLEMENTATIONS.get(python.__module__, python.__module__)
        else:
            name = CU if _library.has_kernel(op, "cuda") else None
        rows.append(Implementation(op, "cuda", name, GPU_VERIFIED.get((name, op)) if name else None))
    return rows


def describe() -> list[tuple[str, str]]:
    """(label, text) rows for ``tbg info``: one per op, then the Triton switch."""
    cuda_note = "" if torch.cuda.is_available() else " (no GPU visible)"
    rows = []
    by_op: dict[str, dict[str, Implementation]] = {}
    for impl in implementations():
        by_op.setdefault(impl.op, {})[impl.device] = impl
    for op, impl in by_op.items():
        cuda = impl["cuda"]
        if cuda.name is None:
            cuda_text = "none (built without CUDA)"
        else:
            verified = f"verified on {cuda.gpu_verified}" if cuda.gpu_verified else "not yet verified on a GPU"
            cuda_text = f"{cuda.name}, {verified}"
        rows.append((f"{op}", f"cpu: {impl['cpu'].name or 'none'} | cuda{cuda_note}: {cuda_text}"))
    switch = os.environ.get(triton_impl.ENV, "")
    version = triton_impl.triton_version()
    triton_text = f"triton {version}" if version else triton_impl.triton_status()
    rows.append((triton_impl.ENV, f"{switch or 'unset'} (groups: {', '.join(triton_impl.GROUPS)}; {triton_text})"))
    return rows
