"""Shared by the Triton kernel tests (test_triton_*.py), imported after their module-level skip when Triton
is absent: the devices a case runs on, NaN-poisoned buffers, and the ops served by Triton in a block."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import pytest
import torch

from tbg.nn import ops
from tbg.nn import triton as tbg_triton
from tbg.nn.triton import stack

INTERPRETED = stack.interpreted()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="the Triton kernels were compiled for the GPU in this process; the CPU "
                                "cases need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py)")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        INTERPRETED or not torch.cuda.is_available(), reason="needs a GPU and natively compiled Triton kernels")]),
]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the implementation allocates uninitialised starts as NaN (autouse in the modules that
    import it)."""
    def alloc(*shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(stack, "alloc", alloc)


@contextlib.contextmanager
def triton_serving(group: str, device: str) -> Iterator[None]:
    """The ops of ``group`` (tbg.nn.triton.GROUPS) served by the Triton code on ``device`` inside the block."""
    module = importlib.import_module(tbg_triton.GROUPS[group].module)
    if device == "cuda" and all(ops.PYTHON_CUDA_IMPLEMENTATIONS.get(op) is getattr(module, op)
                                for op in tbg_triton.GROUPS[group].ops):
        yield  # TBG_TRITON made them the CUDA kernels already
        return
    with tbg_triton.serving(group, device):
        yield
