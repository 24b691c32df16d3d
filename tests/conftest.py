"""Shared test helpers."""
from __future__ import annotations

import pytest
import torch

import tbg

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
