"""Shared test helpers."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels (tbg.nn.triton) are tested on CPU tensors under Triton's interpreter,
# which triton selects when it is imported - and other modules import it indirectly (torch._dynamo),
# so the choice is made here, before anything can. Nothing else in the suite runs Triton on the CPU
# (inductor's CPU backend writes C++); the whole suite passes the same with and without the variable.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tbg  # noqa: E402 - after the interpreter choice (TBG_TRITON would import triton here)

CUDA = torch.cuda.is_available() and tbg.has_kernel("egnn_forward", "cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a GPU and tbg CUDA kernels"))]


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Fresh random inputs per test, but reproducible failures.
    torch.manual_seed(0)


def random_egnn(n_features: int, hidden: int, n_layers: int, dtype: torch.dtype = torch.float64,
                device: str = "cpu", scale: float = 1.0) -> tbg.EGNN:
    """An EGNN with every parameter random (the published init makes the coordinate head tiny,
    which would hide coordinate-path bugs)."""
    model = tbg.EGNN(n_features, hidden, n_layers).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale / max(1, p.shape[-1]) ** 0.5)
    return model
