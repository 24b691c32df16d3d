"""Exact divergence and Hutchinson: the fused ops vs the plain-PyTorch references.

References (tbg.nn.reference): the published brute force (one backward pass per coordinate) and the
trace of torch.func.jacfwd, both on the ops' reference twin egnn_velocity; JVPs against the twin
egnn_jvp. Implementations under test: the ops through
the dispatcher ("op": the C++ kernel on CPU, on CUDA the torch implementation) and that torch
implementation called directly on CPU ("torch", tbg.nn.divergence_torch), so the CUDA path's
algorithm is checked on every machine. Tolerances: fp64 1e-10 relative; fp32 1e-5
relative to the largest |div| of the batch (fp32 fused vs the fp64 reference, so the bound covers
the kernel's own rounding only).
"""
from __future__ import annotations

import pytest
import torch

import tbg
from tbg.nn import divergence_torch as T
from tbg.nn import ops, reference, spec
from tbg.nn.hutchinson import hutchinson_trace, probes
from tbg.nn.layout import mol_ptr_from_sizes, molecule_index, per_molecule_sum, ragged_edges
from conftest import DEVICES, random_egnn

F = 5  # feature width of the test models


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def _batch(layout: str, sizes: list[int], dtype: torch.dtype, device: str):
    """Inputs of one layout holding molecules of the given sizes, and their ragged form."""
    n_mol, n_max = len(sizes), max(sizes, default=1)
    kw = dict(dtype=dtype, device=device)
    if layout == "ragged":
        ptr = mol_ptr_from_sizes(torch.tensor(sizes, dtype=torch.long), device=device)
        x = torch.randn(int(ptr[-1]), 3, **kw) * 1.5
        f = torch.randn(x.shape[0], F, **kw)
        return dict(x=x, features=f, mol_ptr=ptr), (x, f, ptr)
    if layout == "fixed":
        assert len(set(sizes)) <= 1
        x, f = torch.randn(n_mol, n_max, 3, **kw) * 1.5, torch.randn(n_max, F, **kw)
        ptr = torch.arange(n_mol + 1, device=device) * n_max
        return dict(x=x, features=f), (x.reshape(-1, 3), f.expand(n_mol, -1, -1).reshape(-1, F), ptr)
    # padded: real atoms scattered among the padding (not first), padding holds junk coordinates
    mask = torch.zeros(n_mol, n_max + 2, dtype=torch.bool, device=device)
    for b, n in enumerate(sizes):
        mask[b, torch.randperm(n_max + 2, device=device)[:n]] = True
    x, f = torch.randn(n_mol, n_max + 2, 3, **kw) * 1.5, torch.randn(n_mol, n_max + 2, F, **kw)
    ptr = mol_ptr_from_sizes(mask.sum(1), device=device)
    return dict(x=x, features=f, node_mask=mask), (x[mask], f[mask], ptr)


def _references(model: tbg.EGNN, t: torch.Tensor, x: torch.Tensor, f: torch.Tensor, ptr: torch.Tensor,
                jacfwd: bool = True):
    """(v, div by brute force, div by jacfwd or None) on the fp64 reference (the ops' twin)."""
    model64 = model.to(torch.float64)
    x, f, t = x.double(), f.double(), t.double()
    field = _twin_field(model64, t, f, ptr)
    v, div_bf = reference.divergence_bruteforce(field, x, ptr)
    if not jacfwd:
        return v, div_bf, None
    with torch.no_grad():
        _, div_jf = reference.divergence_jacfwd(field, x, ptr)
    return v, div_bf, div_jf


def _twin_field(model: tbg.EGNN, t: torch.Tensor, f: torch.Tensor, ptr: torch.Tensor):
    """x -> reference.egnn_velocity(x, h0, ...) with the model's embeddings and stacked weights."""
    with torch.no_grad():
        h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f)
        weights = [w.detach() for w in model.stacked_weights()]
    return lambda y: reference.egnn_velocity(y, h0, ptr, weights, model.layer_range)


IMPLS = ["op", "torch"]


def _torch_divergence(model: tbg.EGNN, t: torch.Tensor, x_r: torch.Tensor, f_r: torch.Tensor, ptr: torch.Tensor,
                        chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f_r)
    chunk = chunk or T.default_tangent_chunk(ptr, model.hidden)
    return T.egnn_divergence(x_r, h0, ptr, *model.stacked_weights(), model.layer_range, chunk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout,sizes,chunk", [
    ("ragged", [1, 2, 3, 7], 1), ("ragged", [7, 3, 2], 5), ("ragged", [2, 3], None),
    ("ragged", [4, 0, 3], 2), ("ragged", [], None), ("fixed", [7, 7], 4), ("fixed", [22], 66),
    ("fixed", [1], None), ("padded", [3, 7, 2, 1], 2), ("padded", [9], 7), ("padded", [5], None),
])
def test_exact_divergence_matches_bruteforce_and_jacfwd(device, impl, dtype, layout, sizes, chunk) -> None:
    model = random_egnn(F, 12, 3, dtype=dtype, device=device)
    inputs, (x_r, f_r, ptr) = _batch(layout, sizes, dtype, device)
    t = torch.rand(len(sizes), dtype=dtype, device=device)
    with torch.no_grad():
        if impl == "op":
            v, div = model.divergence(t, **inputs, backend="fused", tangent_chunk=chunk)
            assert v.shape == inputs["x"].shape
            v_real = v if layout == "ragged" else v[inputs["node_mask"]] if layout == "padded" else v.reshape(-1, 3)
        else:
            v_real, div = _torch_divergence(model, t, x_r, f_r, ptr, chunk)
    assert div.shape == (len(sizes),)
    # The two references are compared once per case (in the fp64 run).
    v_ref, div_bf, div_jf = _references(model, t, x_r, f_r, ptr, jacfwd=dtype == torch.float64)
    v_scale = max(v_ref.abs().max().item() if v_ref.numel() else 0.0, 1.0)
    torch.testing.assert_close(v_real.double(), v_ref, rtol=0.0, atol=_tol(dtype)["rtol"] * v_scale)
    if div_jf is not None:
        torch.testing.assert_close(div_bf, div_jf, rtol=1e-10, atol=1e-10)
    scale = div_bf.abs().max().item() if div_bf.numel() else 1.0
    atol = _tol(dtype)["rtol"] * max(scale, 1.0)
    if dtype == torch.float32 and div_bf.numel():
        # Near-coincident atoms make some random fp32 inputs ill-conditioned: then allow what the
        # fp32 reference itself gets wrong (x3), never less than 1e-5 relative.
        _, div_bf32 = reference.divergence_bruteforce(_twin_field(model.to(dtype), t, f_r, ptr), x_r, ptr)
        atol = max(atol, 3 * (div_bf32.double() - div_bf).abs().max().item())
    torch.testing.assert_close(div.double(), div_bf, rtol=0.0, atol=atol)
    if layout == "padded" and impl == "op":
        assert (v[~inputs["node_mask"]] == 0).all()
    for b, n in enumerate(sizes):  # molecules of one atom do not move
        if n == 1:
            assert div[b] == 0


def test_published_padded_bruteforce_equals_ragged() -> None:
    """The published estimator loops over all 3N padded coordinates; padding contributes nothing."""
    model = random_egnn(F, 10, 2)
    inputs, (x_r, f_r, ptr) = _batch("padded", [4, 6], torch.float64, "cpu")
    t = torch.rand(2, dtype=torch.float64)
    mask = inputs["node_mask"].reshape(-1, 1).double()
    n_pad = inputs["x"].shape[1]
    flat_ptr = torch.arange(3) * n_pad
    flat_f = inputs["features"].reshape(-1, F)
    h0 = model.embed(t.repeat_interleave(n_pad).unsqueeze(1), flat_f).detach()
    row, col = ragged_edges(flat_ptr)
    edge_mask = mask[row] * mask[col]

    def padded_field(x: torch.Tensor) -> torch.Tensor:
        dx = reference.egnn_displacement(model, h0, x, row, col, edge_mask, mask)
        return reference.remove_mean(dx, flat_ptr, mask)

    _, div_pad = reference.divergence_bruteforce(padded_field, inputs["x"].reshape(-1, 3), flat_ptr)
    _, div_bf, _ = _references(model, t, x_r, f_r, ptr)
    torch.testing.assert_close(div_pad, div_bf, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_jvp_reference_and_module_reference_backend(device) -> None:
    model = random_egnn(F, 8, 2, device=device)
    inputs, (x_r, f_r, ptr) = _batch("ragged", [3, 5, 1], torch.float64, device)
    t = torch.rand(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        _, div = model.divergence(t, **inputs, backend="reference")
    _, div_bf, _ = _references(model, t, x_r, f_r, ptr)
    torch.testing.assert_close(div, div_bf, rtol=1e-10, atol=1e-10)


def test_reference_twins_are_the_module_reference() -> None:
    """reference.egnn_velocity / egnn_divergence / egnn_jvp (the ops' signatures, stacked weights) and
    the module's reference path (per-layer parameters) are one definition."""
    model = random_egnn(F, 8, 3)
    _, (x, f, ptr) = _batch("ragged", [4, 1, 5], torch.float64, "cpu")
    t = torch.rand(3, dtype=torch.float64)
    with torch.no_grad():
        h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f)
        weights, rng = model.stacked_weights(), model.layer_range
        v = reference.egnn_velocity(x, h0, ptr, weights, rng)
        torch.testing.assert_close(v, model(t, x, f, mol_ptr=ptr, backend="reference"), rtol=1e-12, atol=1e-12)
        v_div, div = reference.egnn_divergence(x, h0, ptr, weights, rng, tangent_chunk=4)
        v_mod, div_mod = model.divergence(t, x, f, mol_ptr=ptr, backend="reference")
        tangents = torch.randn(3, x.shape[0], 3, dtype=torch.float64)
        _, jvp = reference.egnn_jvp(x, h0, ptr, weights, tangents, rng)
        _, jvp_mod = reference.field_jvp(reference.egnn_field(model, h0, ptr), x, tangents)
    torch.testing.assert_close(v_div, v, rtol=0, atol=0)
    torch.testing.assert_close(div, div_mod, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp, jvp_mod, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="13 stacked weight"):
        reference.egnn_velocity(x, h0, ptr, weights[:-1], rng)


# ---- the structure the kernels rely on -----------------------------------------------------------------
def test_structure_claims() -> None:
    """(i) h0 carries no x tangent, (ii) layer-1 distances of edges not incident to a do not move
    with x_a, (iii) mean removal keeps the trace and J_v = P J_v P, (iv) h after the last layer is unused."""
    model = random_egnn(F, 8, 3)
    n = 6
    ptr = torch.tensor([0, n])
    x, f, t = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, F, dtype=torch.float64), torch.rand(1).double()
    # (i): the module as a function of x (embedding inside) has the Jacobian of the field with h0 fixed.
    h0 = model.embed(t.expand(n).unsqueeze(1), f).detach()
    field = reference.egnn_field(model, h0, ptr)
    j_module = torch.func.jacfwd(lambda y: model(t, y, f, mol_ptr=ptr, backend="reference"))(x)
    torch.testing.assert_close(j_module, torch.func.jacfwd(field)(x), rtol=1e-12, atol=1e-12)
    # (ii)
    row, col = ragged_edges(ptr)
    jr = torch.func.jacfwd(lambda y: (y[row] - y[col]).pow(2).sum(-1))(x)  # [E, n, 3]
    incident = (row.unsqueeze(1) == torch.arange(n)) | (col.unsqueeze(1) == torch.arange(n))
    assert (jr.abs().sum(-1)[~incident] == 0).all() and (jr.abs().sum(-1)[incident] > 0).all()
    # (iii)
    disp = lambda y: reference.egnn_displacement(model, h0, y, row, col)  # noqa: E731
    jd = torch.func.jacfwd(disp)(x).reshape(3 * n, 3 * n)
    jv = torch.func.jacfwd(field)(x).reshape(3 * n, 3 * n)
    assert not torch.allclose(jd, jv)
    torch.testing.assert_close(jd.trace(), jv.trace(), rtol=1e-12, atol=1e-12)
    p = torch.eye(3 * n, dtype=torch.float64) - torch.eye(3, dtype=torch.float64).repeat(n, n) / n
    torch.testing.assert_close(p @ jv @ p, jv, rtol=1e-12, atol=1e-12)
    # (iv)
    v = field(x)
    with torch.no_grad():
        for prm in model.layers[-1].node_mlp.parameters():
            prm.normal_()
    torch.testing.assert_close(field(x), v, rtol=0, atol=0)


# ---- Hutchinson -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased(device, probe) -> None:
    model = random_egnn(F, 10, 3, device=device)
    inputs, (x_r, f_r, ptr) = _batch("ragged", [4, 7, 1], torch.float64, device)
    t = torch.rand(3, dtype=torch.float64, device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        _, exact = model.divergence(t, **inputs)
        h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f_r)
        eps = probes(1000, x_r, probe, gen)
        _, jvp = ops.egnn_jvp(x_r, h0, ptr, model.stacked_weights(), eps, model.layer_range)
        per_probe = torch.zeros(eps.shape[0], 3, dtype=eps.dtype, device=device).index_add_(
            1, molecule_index(ptr), (eps * jvp).sum(2))  # [K, B]
        mean, se = per_probe.mean(0), per_probe.std(0) / per_probe.shape[0] ** 0.5
        assert ((mean - exact).abs() <= 4 * se + 1e-12).all(), (mean, exact, se)
        assert (se[:2] > 0).all()  # a real estimator, not the exact trace in disguise
        # The module front gives the mean of its probes: the same numbers from the same generator.
        _, est = model.divergence(t, **inputs, method="hutchinson", n_probes=50, probe=probe,
                                  generator=torch.Generator(device=device).manual_seed(2))
        eps = probes(50, x_r, probe, torch.Generator(device=device).manual_seed(2))
        _, jvp = reference.field_jvp(reference.egnn_field(model, h0, ptr), x_r, eps)
        torch.testing.assert_close(est, per_molecule_sum((eps * jvp).sum((0, 2)), ptr) / 50, rtol=1e-10, atol=1e-10)


def test_mean_free_probes_change_nothing() -> None:
    """J_v = P J_v P makes eps^T J_v eps = (P eps)^T J_v (P eps): mean-free probes are pointless."""
    model = random_egnn(F, 8, 2)
    inputs, (x_r, f_r, ptr) = _batch("ragged", [5, 3], torch.float64, "cpu")
    t = torch.rand(2, dtype=torch.float64)
    h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f_r).detach()
    eps = probes(20, x_r, "gaussian")
    centred = torch.stack([reference.remove_mean(e, ptr) for e in eps])
    jvp_fn = lambda e: ops.egnn_jvp(x_r, h0, ptr, model.stacked_weights(), e, model.layer_range)  # noqa: E731
    with torch.no_grad():
        _, a = hutchinson_trace(jvp_fn, eps, ptr)
        _, b = hutchinson_trace(jvp_fn, centred, ptr)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _jvp_impl(impl: str):
    if impl == "op":
        return ops.egnn_jvp
    return lambda x, h0, ptr, weights, tangents, rng: T.egnn_jvp(x, h0, ptr, *weights, tangents, rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_jvp_matches_reference(device, impl, dtype, n_layers) -> None:
    model = random_egnn(F, 12, n_layers, dtype=dtype, device=device)
    _, (x, f, ptr) = _batch("ragged", [2, 7, 1, 0, 4], dtype, device)
    t = torch.rand(5, dtype=dtype, device=device)
    jvp_of = _jvp_impl(impl)
    with torch.no_grad():
        h0 = model.embed(t[molecule_index(ptr)].unsqueeze(1), f)
        tangents = torch.randn(5, x.shape[0], 3, dtype=dtype, device=device)
        v, jvp = jvp_of(x, h0, ptr, model.stacked_weights(), tangents, model.layer_range)
        v_ref, jvp_ref = reference.egnn_jvp(x, h0, ptr, model.stacked_weights(), tangents, model.layer_range)
        torch.testing.assert_close(v, v_ref, **_tol(dtype))
        scale = max(jvp_ref.abs().max().item(), 1.0)
        torch.testing.assert_close(jvp, jvp_ref, rtol=0, atol=_tol(dtype)["rtol"] * scale)
        v0, none = jvp_of(x, h0, ptr, model.stacked_weights(), tangents[:0], model.layer_range)
        assert none.shape == (0, x.shape[0], 3)
        torch.testing.assert_close(v0, v_ref, **_tol(dtype))


def test_torch_impl_groups_and_chunks(monkeypatch) -> None:
    """A budget of a few molecules splits the batch into groups and the tangents into many chunks;
    the result is the CPU kernel's."""
    model = random_egnn(F, 8, 3)
    _, (x, f, ptr) = _batch("ragged", [5, 2, 6, 1, 3, 4], torch.float64, "cpu")
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, dtype=torch.float64), f)
        weights = model.stacked_weights()
        v_ref, div_ref = ops.egnn_divergence(x, h0, ptr, weights, model.layer_range, 4)
        tangents = torch.randn(7, x.shape[0], 3, dtype=torch.float64)
        _, jvp_ref = ops.egnn_jvp(x, h0, ptr, weights, tangents, model.layer_range)
        monkeypatch.setattr(spec, "TORCH_TANGENT_BUDGET", 2 * 30 * 8)  # 2 tangents x one 6-atom molecule x H
        assert T._groups([5, 2, 6, 1, 3, 4], 2 * 8) == [[3, 1, 4, 5], [0], [2]]  # by size, 480 per group
        v, div = T.egnn_divergence(x, h0, ptr, *weights, model.layer_range, 2)
        _, jvp = T.egnn_jvp(x, h0, ptr, *weights, tangents, model.layer_range)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, div_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp, jvp_ref, rtol=1e-12, atol=1e-12)


class _FactoryDevices(torch.overrides.TorchFunctionMode):
    """Records tensor factories called without an explicit device (they would land on the CPU
    next to CUDA inputs)."""

    FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
                 torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace}

    def __init__(self) -> None:
        super().__init__()
        self.missing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            self.missing.append(func.__name__)
        return func(*args, **kwargs)


def test_torch_impl_is_device_generic() -> None:
    """What can go wrong on a GPU in torch-ops code is a tensor made on the wrong device: every
    factory in the torch implementation names its device. It is also the registered CUDA implementation."""
    x, h0, ptr, weights, rng = _op_args("cpu")
    tangents = torch.randn(3, x.shape[0], 3, dtype=x.dtype)
    with _FactoryDevices() as mode:
        T.egnn_divergence(x, h0, ptr, *weights, rng, 2)
        T.egnn_jvp(x, h0, ptr, *weights, tangents, rng)
    assert mode.missing == []
    with _FactoryDevices() as mode:
        torch.arange(3)
    assert mode.missing == ["arange"]  # the check itself works
    assert tbg.has_kernel("egnn_divergence", "cuda") and tbg.has_kernel("egnn_jvp", "cuda")


# ---- gradients of the divergence --------------------------------------------------------------------------
class _Divergence(torch.nn.Module):
    """div of an EGNN as a module, so torch.func.functional_call can swap its parameters."""

    def __init__(self, egnn: tbg.EGNN, backend: str) -> None:
        super().__init__()
        self.egnn, self.backend = egnn, backend

    def forward(self, t, x, f, ptr):
        return self.egnn.divergence(t, x, f, mol_ptr=ptr, backend=self.backend)[1]


def _spy(monkeypatch, module, name: str) -> list:
    """Records the calls of module.name (still calling it)."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_divergence_gradient_wrt_parameters(backend, monkeypatch) -> None:
    """Grad mode on + parameters requiring grad selects a differentiable path: with backend='auto'
    the torch implementation, with 'reference' the reference."""
    calls = _spy(monkeypatch, T, "divergence")
    model = random_egnn(F, 4, 2)
    wrapper = _Divergence(model, backend)
    _, (x, f, ptr) = _batch("ragged", [3, 2], torch.float64, "cpu")
    t = torch.rand(2, dtype=torch.float64)
    names = ["gcl_0.edge_mlp.2.weight", "gcl_1.coord_mlp.0.bias", "embedding.weight", "gcl_0.edge_mlp.0.weight"]
    base = {k: p.detach() for k, p in model.named_parameters()}

    def state(values) -> dict:
        return {**base, **dict(zip(names, values))}

    values = tuple(base[k].clone().requires_grad_(True) for k in names)

    def div_of(*head: torch.Tensor) -> torch.Tensor:
        chosen = head + values[len(head):]
        return torch.func.functional_call(wrapper, {f"egnn.{k}": v for k, v in state(chosen).items()},
                                          (t, x, f, ptr))

    assert torch.autograd.gradcheck(div_of, values[:2], eps=1e-6, atol=1e-7, fast_mode=True)
    # ... and matches double backward through the published brute force.
    div = div_of(*values)
    grads = torch.autograd.grad(div.sum(), values)

    def field(y: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, state(values), (t, y, f), {"mol_ptr": ptr, "backend": "reference"})

    _, div_bf = reference.divergence_bruteforce(field, x, ptr, create_graph=True)
    torch.testing.assert_close(div, div_bf, rtol=1e-10, atol=1e-10)
    for g, g_bf in zip(grads, torch.autograd.grad(div_bf.sum(), values)):
        torch.testing.assert_close(g, g_bf, rtol=1e-9, atol=1e-10)
    assert bool(calls) == (backend == "auto")


def test_hutchinson_gradient_torch_impl_matches_reference(monkeypatch) -> None:
    """Gradients of a Hutchinson estimate w.r.t. parameters and x: the torch implementation (auto) and the
    reference path agree (fp64, same probes), on a ragged batch with a one-atom molecule."""
    calls = _spy(monkeypatch, T, "jvp")
    model = random_egnn(F, 8, 3)
    _, (x, f, ptr) = _batch("ragged", [4, 1, 6], torch.float64, "cpu")
    t = torch.rand(3, dtype=torch.float64)
    results = {}
    for backend in ("auto", "reference"):
        model.zero_grad()
        xg = x.clone().requires_grad_(True)
        _, div = model.divergence(t, xg, f, mol_ptr=ptr, method="hutchinson", n_probes=3, backend=backend,
                                  generator=torch.Generator().manual_seed(5))
        (div * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
        # (The reference never touches the last layer's node MLP; the stacked weights do, with zero grad.)
        results[backend] = (div.detach(), xg.grad,
                            [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()])
    (d_a, gx_a, gp_a), (d_r, gx_r, gp_r) = results["auto"], results["reference"]
    assert calls and sum(bool(g.abs().max() > 0) for g in gp_r) > 30
    torch.testing.assert_close(d_a, d_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_a, gx_r, rtol=1e-9, atol=1e-10)
    for a, r in zip(gp_a, gp_r):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


# ---- op contracts -------------------------------------------------------------------------------------------
def _op_args(device: str, dtype: torch.dtype = torch.float64):
    model = random_egnn(F, 6, 2, dtype=dtype, device=device)
    _, (x, f, ptr) = _batch("ragged", [3, 1, 4], dtype, device)
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, dtype=dtype, device=device), f)
        weights = tuple(w.detach() for w in model.stacked_weights())
    return x, h0, ptr, weights, model.layer_range


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device) -> None:
    x, h0, ptr, weights, rng = _op_args(device)
    torch.library.opcheck(torch.ops.tbg.egnn_divergence.default, (x, h0, ptr, *weights, rng, 3))
    tangents = torch.randn(4, x.shape[0], 3, dtype=x.dtype, device=device)
    torch.library.opcheck(torch.ops.tbg.egnn_jvp.default, (x, h0, ptr, *weights, tangents, rng))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise(device, impl) -> None:
    x, h0, ptr, weights, rng = _op_args(device)
    divergence, jvp = ((torch.ops.tbg.egnn_divergence, torch.ops.tbg.egnn_jvp) if impl == "op"
                       else (T.egnn_divergence, T.egnn_jvp))
    with pytest.raises(RuntimeError, match="tangent_chunk"):
        divergence(x, h0, ptr, *weights, rng, 0)
    with pytest.raises(RuntimeError, match="tangents"):
        jvp(x, h0, ptr, *weights, torch.randn(2, x.shape[0] + 1, 3, dtype=x.dtype, device=device), rng)
    with pytest.raises(RuntimeError, match="tangents"):
        jvp(x, h0, ptr, *weights, torch.randn(2, x.shape[0], 3, device=device), rng)
    with pytest.raises(RuntimeError, match="NaN"):
        divergence(x.clone().fill_(float("nan")), h0, ptr, *weights, rng, 3)
    with pytest.raises(RuntimeError, match="w2"):
        divergence(x, h0, ptr, *weights[:2], weights[2][:, :-1], *weights[3:], rng, 3)
    with pytest.raises(RuntimeError, match="mol_ptr"):
        divergence(x, h0, ptr.flip(0), *weights, rng, 3)
    if impl == "torch":
        return
    with pytest.raises(RuntimeError, match="autograd"):
        ops.egnn_divergence(x, h0.requires_grad_(True), ptr, weights, rng)
    model = random_egnn(F, 6, 2, device=device)
    x3, f3 = torch.randn(2, 4, 3, dtype=torch.float64, device=device), torch.randn(4, F, dtype=torch.float64,
                                                                                    device=device)
    for bad, match in [(dict(method="trace"), "method"), (dict(method="hutchinson", probe="uniform"), "probe"),
                       (dict(method="hutchinson", n_probes=0), "n_probes"), (dict(tangent_chunk=0), "tangent_chunk")]:
        with pytest.raises(ValueError, match=match), torch.no_grad():
            model.divergence(0.5, x3, f3, **bad)


def test_bound_dynamics_divergence_shapes() -> None:
    model = random_egnn(F, 6, 2)
    f = torch.randn(4, F, dtype=torch.float64)
    dyn = tbg.BoundDynamics(model, f)
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        v, div = dyn.divergence(torch.tensor(0.3, dtype=torch.float64), x)
        torch.testing.assert_close(v, dyn(0.3, x), rtol=1e-10, atol=1e-10)
        _, div_ref = dyn.divergence(0.3, x, backend="reference")
    assert v.shape == x.shape and div.shape == (3,)
    torch.testing.assert_close(div, div_ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        v0, div0 = dyn.divergence(0.3, x[:0])
    assert v0.shape == (0, 12) and div0.shape == (0,)
