"""Shared cases of the fused-EGNN tests (test_egnn_ops, test_egnn_threads): inputs and the comparison
of the fused ops with the plain-PyTorch reference.

Tolerances: float64 fused vs float64 reference within 1e-10 (relative to each tensor's largest
entry). float32 fused is compared with the float64 reference evaluated on the same float32
values (the exact answer), within 1e-5 of each tensor's largest entry, also for the 9-layer
stack, except for the parameter gradients: those are sums over every edge of the batch
(thousands of terms that largely cancel), so in float32 they are held to 1e-4 of their largest
entry. float32 models use random weights of half the unit scale: at unit scale a deep stack of
random layers is so ill-conditioned that the float32 reference itself misses the exact gradients
by ~1e-3 (measured), which no float32 kernel can be held to.
"""
from __future__ import annotations

import torch

import tbg
from tbg.nn.layout import mol_ptr_from_sizes, molecule_index
from conftest import random_egnn

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """|actual - expected| <= tol * (|expected| + max|expected|), elementwise."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def model_for(dtype: torch.dtype, n_features: int, hidden: int, n_layers: int, device: str) -> tbg.EGNN:
    return random_egnn(n_features, hidden, n_layers, dtype=dtype, device=device,
                       scale=0.5 if dtype == torch.float32 else 1.0)


def field_and_grads(model: tbg.EGNN, backend: str, t: torch.Tensor, x: torch.Tensor, f: torch.Tensor,
                    grad_v: torch.Tensor, **layout) -> list[torch.Tensor]:
    """[v, dL/dx, dL/dfeatures, dL/dparams...] for L = <grad_v, v>."""
    model.zero_grad()
    x = x.detach().requires_grad_()
    f = f.detach().requires_grad_()
    v = model(t, x, f, backend=backend, **layout)
    (v * grad_v).sum().backward()
    # embedding_out is unused by the field: no gradient in either backend.
    return [v.detach(), x.grad, f.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                           for p in model.parameters()]


def compare_backends(model: tbg.EGNN, t: torch.Tensor, x: torch.Tensor, f: torch.Tensor, **layout) -> None:
    dtype = x.dtype
    grad_v = torch.randn_like(x)
    fused = field_and_grads(model, "fused", t, x, f, grad_v, **layout)
    exact = model.to(torch.float64)
    cast = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in layout.items()}
    ref = field_and_grads(exact, "reference", t.double(), x.double(), f.double(), grad_v.double(), **cast)
    model.to(dtype)
    names = ["v", "grad x", "grad features"] + [f"grad {n}" for n, _ in model.named_parameters()]
    for k, (name, a, b) in enumerate(zip(names, fused, ref)):
        assert_close_scaled(a, b, TOL[dtype] if k < 3 or dtype == torch.float64 else 1e-4, name)


def ragged_inputs(sizes: list[int], n_features: int, dtype: torch.dtype, device: str):
    ptr = mol_ptr_from_sizes(sizes, device=device)
    m = int(sum(sizes))
    x = torch.randn(m, 3, dtype=dtype, device=device) * 2
    f = torch.randn(m, n_features, dtype=dtype, device=device)
    t = torch.rand(len(sizes), dtype=dtype, device=device)
    return t, x, f, ptr


def op_inputs(sizes: list[int], hidden: int, n_layers: int, dtype: torch.dtype, device: str):
    model = random_egnn(3, hidden, n_layers, dtype=dtype, device=device)
    t, x, f, ptr = ragged_inputs(sizes, 3, dtype, device)
    h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f).detach()
    weights = tuple(w.detach() for w in model.stacked_weights())
    return model, x, h0, ptr, weights
