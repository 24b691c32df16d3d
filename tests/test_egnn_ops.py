"""Fused EGNN ops (torch.ops.tbg.egnn_forward / egnn_backward) against the plain-PyTorch reference.

Tolerances and their reasons: tests/egnn_cases.py (TOL, compare_backends).
"""
from __future__ import annotations

import pytest
import torch

import tbg
from tbg.nn import ops
from tbg.nn.layout import molecule_index
from conftest import DEVICES, random_egnn
from egnn_cases import (TOL, assert_close_scaled, compare_backends, model_for, op_inputs,
                         ragged_inputs)

# ---- forward + backward against the reference, all layouts ---------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_layout(device: str, dtype: torch.dtype) -> None:
    model = model_for(dtype, 5, 32, 3, device)
    x = torch.randn(3, 22, 3, dtype=dtype, device=device) * 2
    f = torch.randn(22, 5, dtype=dtype, device=device)
    compare_backends(model, torch.rand(3, dtype=dtype, device=device), x, f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padded_layout_with_fully_masked_molecule(device: str, dtype: torch.dtype) -> None:
    model = model_for(dtype, 4, 24, 2, device)
    n = 9
    mask = torch.zeros(4, n, device=device)
    mask[0, :9] = 1
    mask[1, [0, 3, 4, 8]] = 1  # real atoms need not come first
    mask[3, :1] = 1  # one real atom; molecule 2 is fully masked
    x = torch.randn(4, n, 3, dtype=dtype, device=device) * 2
    f = torch.randn(4, n, 4, dtype=dtype, device=device)
    compare_backends(model, torch.rand(4, dtype=dtype, device=device), x, f, node_mask=mask)
    v = model(0.5, x, f, node_mask=mask, backend="fused")
    assert (v[mask == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ragged_layout_mixed_sizes(device: str, dtype: torch.dtype) -> None:
    model = model_for(dtype, 4, 48, 3, device)
    t, x, f, ptr = ragged_inputs([5, 1, 9, 0, 2, 7], 4, dtype, device)
    compare_backends(model, t, x, f, mol_ptr=ptr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_atoms", [1, 2, 3, 21, 22, 33, 51, 64])
def test_molecule_sizes(device: str, n_atoms: int) -> None:
    model = random_egnn(3, 16, 2, dtype=torch.float64, device=device)
    t, x, f, ptr = ragged_inputs([n_atoms, max(n_atoms - 1, 1)], 3, torch.float64, device)
    compare_backends(model, t, x, f, mol_ptr=ptr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden", [48, 100, 1, 17])
def test_hidden_sizes(device: str, hidden: int) -> None:
    for dtype in (torch.float64, torch.float32):
        model = model_for(dtype, 3, hidden, 2, device)
        t, x, f, ptr = ragged_inputs([6, 4], 3, dtype, device)
        compare_backends(model, t, x, f, mol_ptr=ptr)


@pytest.mark.parametrize("device", DEVICES)
def test_long_stack_float32(device: str) -> None:
    # Transfer-model depth and width: 9 layers of H = 128.
    model = model_for(torch.float32, 6, 128, 9, device)
    t, x, f, ptr = ragged_inputs([20, 51], 6, torch.float32, device)
    compare_backends(model, t, x, f, mol_ptr=ptr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [0, 1])
def test_small_batches(device: str, batch: int) -> None:
    model = random_egnn(3, 16, 2, dtype=torch.float64, device=device)
    x = torch.randn(batch, 7, 3, dtype=torch.float64, device=device)
    f = torch.randn(7, 3, dtype=torch.float64, device=device)
    t = torch.rand(batch, dtype=torch.float64, device=device)
    if batch:
        compare_backends(model, t, x, f)
        return
    v = model(t, x.requires_grad_(), f, backend="fused")
    assert v.shape == (0, 7, 3)
    v.sum().backward()
    assert x.grad.shape == x.shape
    assert all((p.grad == 0).all() for n, p in model.named_parameters() if not n.startswith("embedding_out"))


# ---- the raw ops -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_states_are_layer_inputs(device: str) -> None:
    model, x, h0, ptr, w = op_inputs([4, 1, 6], 16, 3, torch.float64, device)
    v, hs, xs = torch.ops.tbg.egnn_forward(x, h0, ptr, *w, model.layer_range)
    assert hs.shape == (3, 11, 16) and xs.shape == (3, 11, 3)
    assert torch.equal(hs[0], h0) and torch.equal(xs[0], x)
    assert torch.isfinite(hs).all() and torch.isfinite(xs).all() and torch.isfinite(v).all()
    assert not torch.equal(xs[1], xs[0])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device: str) -> None:
    model, x, h0, ptr, w = op_inputs([3, 1, 2], 3, 2, torch.float64, device)
    args = [x.requires_grad_(), h0.requires_grad_()] + [t.clone().requires_grad_() for t in w]

    def fn(x, h0, *weights):
        return ops.egnn_velocity(x, h0, ptr, weights, model.layer_range)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    model, x, h0, ptr, w = op_inputs([4, 2, 1], 8, 2, torch.float64, device)
    fwd_args = (x.requires_grad_(), h0.requires_grad_(), ptr, *(t.clone().requires_grad_() for t in w),
                model.layer_range)
    torch.library.opcheck(torch.ops.tbg.egnn_forward.default, fwd_args)
    v, hs, xs = torch.ops.tbg.egnn_forward(x.detach(), h0.detach(), ptr, *w, model.layer_range)
    bwd_args = (torch.randn_like(v), x.detach(), h0.detach(), ptr, *w, hs, xs, model.layer_range)
    torch.library.opcheck(torch.ops.tbg.egnn_backward.default, bwd_args)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device: str) -> None:
    model, x, h0, ptr, w = op_inputs([3], 8, 2, torch.float64, device)
    x.requires_grad_()
    v = ops.egnn_velocity(x, h0, ptr, w, model.layer_range)
    (g,) = torch.autograd.grad(v.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        g.sum().backward()


def test_threads_agree() -> None:
    model, x, h0, ptr, w = op_inputs([7, 5, 9, 3, 8], 16, 2, torch.float64, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            v, hs, xs = torch.ops.tbg.egnn_forward(x, h0, ptr, *w, model.layer_range)
            results.append([v, *torch.ops.tbg.egnn_backward(torch.ones_like(v), x, h0, ptr, *w, hs, xs,
                                                            model.layer_range)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- module front and torch.compile -----------------------------------------------------------------

class FusedField(torch.nn.Module):
    """A module whose forward is the fused op on a fixed ragged batch (what an ODE solver calls)."""

    def __init__(self, egnn: tbg.EGNN, features: torch.Tensor, mol_ptr: torch.Tensor) -> None:
        super().__init__()
        self.egnn = egnn
        self.register_buffer("features", features)
        self.register_buffer("mol", molecule_index(mol_ptr))
        self.register_buffer("mol_ptr", mol_ptr)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h0 = self.egnn.embed(t[self.mol].unsqueeze(1), self.features)
        return ops.egnn_velocity(x, h0, self.mol_ptr, self.egnn.stacked_weights(), self.egnn.layer_range)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device: str) -> None:
    model = random_egnn(3, 16, 2, dtype=torch.float32, device=device)
    t, x, f, ptr = ragged_inputs([5, 3, 7], 3, torch.float32, device)
    field = FusedField(model, f, ptr)
    compiled = torch.compile(field, fullgraph=True, backend="aot_eager")
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    v_eager, v_comp = field(t, x1), compiled(t, x2)
    torch.testing.assert_close(v_comp, v_eager, rtol=1e-6, atol=1e-6)
    v_eager.square().sum().backward()
    v_comp.square().sum().backward()
    if device == "cpu":
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    else:
        # The CUDA backward accumulates with atomics, so two identical calls differ in fp32 rounding
        # (8.8e-6 relative measured on an H100): compare at the fp32 kernel tolerance.
        assert_close_scaled(x2.grad, x1.grad, TOL[torch.float32], "x.grad")
    torch.testing.assert_close(v_eager, model(t, x, f, mol_ptr=ptr, backend="reference"), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_backends_share_parameters(device: str) -> None:
    model = random_egnn(3, 16, 2, dtype=torch.float64, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 6, 3, dtype=torch.float64, device=device)
    f = torch.randn(6, 3, dtype=torch.float64, device=device)
    out = {b: model(0.3, x, f, backend=b) for b in ("auto", "fused", "reference")}
    assert model.resolve_backend("auto", device) == "fused"
    assert torch.equal(out["auto"], out["fused"])
    assert_close_scaled(out["fused"], out["reference"], 1e-10, "v")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    dyn = tbg.BoundDynamics(model, f, backend="fused")
    assert_close_scaled(dyn(0.3, x.reshape(2, 18)), out["reference"].reshape(2, 18), 1e-10, "bound")


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(device: str) -> None:
    model, x, h0, ptr, w = op_inputs([4, 3], 8, 2, torch.float64, device)
    fwd = torch.ops.tbg.egnn_forward
    with pytest.raises(RuntimeError, match="weight w2 is Float but x is Double"):
        fwd(x, h0, ptr, *w[:2], w[2].float(), *w[3:], 1.0)
    with pytest.raises(RuntimeError, match="h0 must match x in dtype"):
        fwd(x, h0.float(), ptr, *w, 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        fwd(torch.randn(3, 7, dtype=torch.float64, device=device).T, h0, ptr, *w, 1.0)
    with pytest.raises(RuntimeError, match="must not decrease"):
        fwd(x, h0, torch.tensor([0, 5, 4, 7], device=device), *w, 1.0)
    with pytest.raises(RuntimeError, match="must end at M"):
        fwd(x, h0, torch.tensor([0, 4, 6], device=device), *w, 1.0)
    with pytest.raises(RuntimeError, match="must have shape"):
        fwd(x, h0[:, :5].contiguous(), ptr, *w, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        fwd(x, h0, ptr.int(), *w, 1.0)
    f = torch.randn(7, 3, dtype=torch.float64, device=device)
    bad = torch.randn(1, 7, 3, dtype=torch.float64, device=device)
    bad[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(0.1, bad, f, backend="fused")
    with pytest.raises(TypeError, match="must match x"):
        model(0.1, bad.float(), f, backend="fused")
    if device == "cuda":
        with pytest.raises(RuntimeError, match="mol_ptr is on"):
            fwd(x, h0, ptr.cpu(), *w, 1.0)
        with pytest.raises(RuntimeError, match="is on"):
            fwd(x, h0, ptr, *w[:3], w[3].cpu(), *w[4:], 1.0)
