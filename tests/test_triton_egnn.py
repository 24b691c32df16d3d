"""Triton EGNN forward / backward (tbg.nn.triton.egnn) against the C++ CPU kernel and the reference.

Where no GPU is visible the kernels run under the Triton interpreter on CPU tensors ("cpu" cases; tests/
conftest.py sets TRITON_INTERPRET=1 before anything imports triton). With a GPU (and no TRITON_INTERPRET)
they are compiled and the "cuda" cases run natively (`pytest -k cuda`). Tests that go through
torch.ops.tbg register the Triton code for their device's dispatch key inside the test
(tbg.nn.triton.serving: a scoped torch.library registration, torn down after; on CUDA unless TBG_TRITON=egnn
made it the CUDA kernel already), so the dispatcher, the autograd formula of tbg.nn.ops, opcheck and the
EGNN module exercise it; afterwards the C++ kernel serves the CPU again.

References: the C++ CPU kernel (same dtype: v, h_states, x_states and the 15 gradients) and the plain-
PyTorch reference twin tbg.nn.reference.egnn_velocity in float64 with autograd, evaluated on the same
values. Tolerances as tests/egnn_cases.py: relative to each tensor's largest entry, float64 1e-10, float32
1e-5 (v, x and h0 gradients) and 1e-4 (weight gradients: sums over every edge of the batch); float32
models use random weights of half the unit scale. Every buffer the implementation allocates
uninitialised is NaN-filled first, so an element it forgets to write shows.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import tbg
from tbg.nn import dispatch, ops, reference, spec
from tbg.nn import triton as tbg_triton
from tbg.nn.layout import molecule_index
from conftest import random_egnn
from egnn_cases import TOL, assert_close_scaled, compare_backends, ragged_inputs
from host_reads import HostReads, cuda_syncs

_KERNELS = "tbg.nn.triton.egnn"

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (an optional dependency of tbg)", allow_module_level=True)
TE = importlib.import_module(_KERNELS)
# Imported after the skip above: these import triton.
from tbg.nn.triton import plan, stack  # noqa: E402
from triton_cases import DEVICES, INTERPRETED, poisoned_buffers, triton_serving  # noqa: E402, F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
NAMES = ("x", "h0", *spec.WEIGHT_NAMES)


def _inputs(sizes: list[int], hidden: int, n_layers: int, dtype: torch.dtype, n_features: int = 4):
    """CPU op inputs: x, h0, mol_ptr, the 13 stacked weights, coords_range and a grad_v."""
    model = random_egnn(n_features, hidden, n_layers, dtype=dtype, scale=0.5 if dtype == torch.float32 else 1.0)
    t, x, f, ptr = ragged_inputs(sizes, n_features, dtype, "cpu")
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, dtype=dtype), f)
    weights = tuple(w.detach() for w in model.stacked_weights())
    return x, h0, ptr, weights, model.layer_range, torch.randn_like(x)


def _to(device: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


def _reference_grads(x, h0, ptr, weights, rng, grad_v) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """v and the 15 gradients of <grad_v, v> by the float64 reference with autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (x, h0, *weights)]
    v = reference.egnn_velocity(leaves[0], leaves[1], ptr, leaves[2:], rng)
    grads = torch.autograd.grad(v, leaves, grad_v.double(), allow_unused=True)
    return v.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]


def _tolerance(dtype: torch.dtype, name: str) -> float:
    return TOL[dtype] if dtype == torch.float64 or name in ("v", "x", "h0") else 1e-4


# ---- forward and backward against the C++ kernel and the reference -------------------------------------
CASES = [  # molecule sizes (N <= 12), hidden, layers
    ([3, 1, 2], 12, 3),
    ([5, 0, 1], 16, 2),   # an empty and a 1-atom molecule inside the batch
    ([7], 9, 3),          # batch 1, odd H
    ([11, 3], 20, 1),     # H = 20 padded to 32 channels, one layer (no node update at all)
    ([12, 0, 9], 12, 2),
    ([], 8, 2),           # batch 0
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes,hidden,n_layers", CASES)
def test_forward_backward_match_cpp_kernel_and_reference(device, dtype, sizes, hidden, n_layers) -> None:
    x, h0, ptr, weights, rng, grad_v = _inputs(sizes, hidden, n_layers, dtype)
    with torch.no_grad():
        v_cpp, hs_cpp, xs_cpp = torch.ops.tbg.egnn_forward(x, h0, ptr, *weights, rng)  # C++ kernel
        grads_cpp = torch.ops.tbg.egnn_backward(grad_v, x, h0, ptr, *weights, hs_cpp, xs_cpp, rng)
        args = _to(device, x, h0, ptr, *weights)
        with triton_serving("egnn", device):
            v, hs, xs = (t.cpu() for t in torch.ops.tbg.egnn_forward(*args, rng))
            grads = [g.cpu() for g in torch.ops.tbg.egnn_backward(grad_v.to(device), *args, hs.to(device),
                                                                   xs.to(device), rng)]
    v_ref, grads_ref = _reference_grads(x, h0, ptr, weights, rng, grad_v)
    assert hs.shape == (n_layers, x.shape[0], hidden) and xs.shape == (n_layers, x.shape[0], 3)
    assert torch.equal(hs[0], h0) and torch.equal(xs[0], x)  # the inputs of every layer
    for name, got, cpp in (("v", v, v_cpp), ("h_states", hs, hs_cpp), ("x_states", xs, xs_cpp)):
        assert_close_scaled(got, cpp, TOL[dtype], f"{name} vs C++")
    assert_close_scaled(v, v_ref, TOL[dtype], "v vs reference")
    assert len(grads) == len(NAMES)
    for name, got, cpp, ref in zip(NAMES, grads, grads_cpp, grads_ref):
        assert got.shape == cpp.shape and got.dtype == dtype, name
        assert_close_scaled(got, cpp, _tolerance(dtype, name), f"grad {name} vs C++")
        assert_close_scaled(got, ref, _tolerance(dtype, name), f"grad {name} vs reference")
    for b, n in enumerate(sizes):  # molecules of one atom (or none) do not move
        if n == 1:
            assert (v[ptr[b]] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_tiles_splits_and_programs_give_the_same_result(device) -> None:
    """Tiles smaller than the molecules (the receiver and sender loops), several splits per molecule
    (the sender sums of a molecule in several slices) and fewer programs than work items (a program walks
    several items, its weight-gradient slot sums them) all agree; a given configuration gives the same
    bits on every call (no atomics)."""
    x, h0, ptr, weights, rng, grad_v = _inputs([7, 1, 0, 5], 12, 2, torch.float64)
    args = _to(device, x, h0, ptr, *weights)

    def run() -> list[torch.Tensor]:
        v, hs, xs = TE.egnn_forward(*args, rng)
        return [v, hs, xs, *TE.egnn_backward(grad_v.to(device), *args, hs, xs, rng)]

    with torch.no_grad():
        expected = run()
        variants = [plan.EdgeTiles(receivers=2, senders=4, splits=3, programs=4),
                    plan.EdgeTiles(receivers=4, senders=2, splits=2, programs=1)]
        if not INTERPRETED:  # a GPU needs >= 16 edge rows per tile
            variants = [plan.EdgeTiles(receivers=4, senders=4, splits=3, programs=4),
                        plan.EdgeTiles(receivers=16, senders=16, splits=8, programs=1)]
        for k, tiles in enumerate(variants):
            with stack.use_tiles(tiles):
                got = run()
                again = run() if k == 0 else got
            for name, a, b, c in zip(("v", "h_states", "x_states", *NAMES), got, again, expected):
                assert torch.equal(a, b), f"{tiles}: {name} differs between two calls"
                assert_close_scaled(a, c, 1e-12, f"{tiles}: {name}")


# ---- through the registered op: autograd, gradcheck, opcheck, the module ------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device) -> None:
    """Finite differences through torch.ops.tbg.egnn_forward and its autograd formula (egnn_backward):
    x, h0 and all 13 weights (fast mode: one random direction per input)."""
    x, h0, ptr, weights, rng, _ = _inputs([3, 1, 2], 3, 2, torch.float64)
    leaves = [t.to(device).requires_grad_() for t in (x, h0, *weights)]
    ptr = ptr.to(device)

    def velocity(x, h0, *weights):
        return ops.egnn_velocity(x, h0, ptr, weights, rng)

    with triton_serving("egnn", device):
        assert torch.autograd.gradcheck(velocity, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device) -> None:
    x, h0, ptr, weights, rng, grad_v = _inputs([3, 2, 1], 4, 2, torch.float64)
    x, h0, ptr, grad_v, *weights = _to(device, x, h0, ptr, grad_v, *weights)
    with triton_serving("egnn", device):
        forward_args = (x.requires_grad_(), h0.requires_grad_(), ptr, *(w.clone().requires_grad_() for w in weights),
                        rng)
        torch.library.opcheck(torch.ops.tbg.egnn_forward.default, forward_args)
        with torch.no_grad():
            _, hs, xs = torch.ops.tbg.egnn_forward(x, h0, ptr, *weights, rng)
        torch.library.opcheck(torch.ops.tbg.egnn_backward.default,
                              (grad_v, x.detach(), h0.detach(), ptr, *weights, hs, xs, rng))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_gradients_match_reference(device, dtype) -> None:
    """EGNN(backend="fused") with the Triton ops: the field and the gradients of every parameter, the
    coordinates and the atom features (embedding included) against backend="reference"."""
    model = random_egnn(3, 16, 2, dtype=dtype, device=device, scale=0.5 if dtype == torch.float32 else 1.0)
    t, x, f, ptr = ragged_inputs([6, 1, 4], 3, dtype, device)
    with triton_serving("egnn", device):
        compare_backends(model, t, x, f, mol_ptr=ptr)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device) -> None:
    """torch.compile(fullgraph) through the op (opaque, its fake kernels) gives the eager result, to the
    bit: the Triton backward has no atomics."""
    model = random_egnn(3, 16, 2, dtype=torch.float32, device=device)
    t, x, f, ptr = ragged_inputs([5, 3, 7], 3, torch.float32, device)
    t_atoms = t[molecule_index(ptr)].unsqueeze(1)

    def loss(x: torch.Tensor) -> torch.Tensor:
        h0 = model.embed(t_atoms, f)
        return ops.egnn_velocity(x, h0, ptr, model.stacked_weights(), model.layer_range).square().sum()

    torch._dynamo.reset()
    with triton_serving("egnn", device):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss(x1).backward()
        torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=False)(x2).backward()
    assert torch.equal(x1.grad, x2.grad)


# ---- input checks, host synchronisation --------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(device) -> None:
    x, h0, ptr, weights, rng, grad_v = _inputs([4, 3], 8, 2, torch.float64)
    x, h0, ptr, grad_v, *weights = _to(device, x, h0, ptr, grad_v, *weights)
    with pytest.raises(RuntimeError, match="weight w2"):
        TE.egnn_forward(x, h0, ptr, *weights[:2], weights[2][:, :-1], *weights[3:], rng)
    with pytest.raises(RuntimeError, match="h0"):
        TE.egnn_forward(x, h0.float(), ptr, *weights, rng)
    with pytest.raises(RuntimeError, match="mol_ptr"):
        TE.egnn_forward(x, h0, ptr.int(), *weights, rng)
    with torch.no_grad():
        _, hs, xs = TE.egnn_forward(x, h0, ptr, *weights, rng)
    with pytest.raises(RuntimeError, match="h_states"):
        TE.egnn_backward(grad_v, x, h0, ptr, *weights, hs[1:], xs, rng)
    with pytest.raises(RuntimeError, match="grad_v"):
        TE.egnn_backward(grad_v.float(), x, h0, ptr, *weights, hs, xs, rng)
    if device == "cpu":  # on a GPU a bad mol_ptr is a device-side assertion (it would end the process)
        for bad in (torch.tensor([0, 5, 4, 7]), torch.tensor([0, 4, 6]), torch.tensor([1, 4, 7])):
            with pytest.raises(RuntimeError, match="mol_ptr must start at 0, never decrease and end at M = 7"):
                TE.egnn_forward(x, h0, bad, *weights, rng)
            with pytest.raises(RuntimeError, match="mol_ptr must start at 0"):
                TE.egnn_backward(grad_v, x, h0, bad, *weights, hs, xs, rng)


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_synchronisation(device) -> None:
    """Neither op reads a device value on the host: grids and buffers follow from shapes, loop bounds
    from mol_ptr on the device, and mol_ptr is checked on the device; every tensor made names its device.
    On CUDA torch's sync debug mode counts the synchronisations as well."""
    x, h0, ptr, weights, rng, grad_v = _inputs([3, 1, 2], 6, 2, torch.float64)
    x, h0, ptr, grad_v, *weights = _to(device, x, h0, ptr, grad_v, *weights)
    with torch.no_grad():
        _, hs, xs = TE.egnn_forward(x, h0, ptr, *weights, rng)
    for call in (lambda: TE.egnn_forward(x, h0, ptr, *weights, rng),
                 lambda: TE.egnn_backward(grad_v, x, h0, ptr, *weights, hs, xs, rng)):
        with HostReads() as mode:
            call()
        assert mode.reads == [] and mode.missing_device == []
        if device == "cuda":
            assert cuda_syncs(call) == []


# ---- tiles, cost model -----------------------------------------------------------------------------------
def test_edge_tiles_are_checked() -> None:
    with pytest.raises(ValueError, match="power of two"):
        plan.EdgeTiles(receivers=3).check(native=False)
    with pytest.raises(ValueError, match=">= 1"):
        plan.EdgeTiles(programs=0).check(native=False)
    with pytest.raises(ValueError, match="receivers \\* senders >= 16"):
        plan.EdgeTiles(receivers=2, senders=4).check(native=True)
    for tiles in (*(plan.default_edge_tiles(h) for h in (8, 32, 64, 128, 256)), *plan.EDGE_SWEEP):
        tiles.check(native=True)
    # Splits give about two forward programs per SM, programs of the backward at most four per SM.
    tiles = plan.EdgeTiles()
    assert plan.work_split(1, tiles, 132) == (8, 8)
    assert plan.work_split(100, tiles, 132) == (4, 400)
    assert plan.work_split(400, tiles, 132) == (1, 400)
    assert plan.work_split(1000, tiles, 132) == (1, 528)
    assert plan.work_split(3, tiles, None) == (1, 2)
    assert plan.work_split(3, plan.EdgeTiles(splits=2, programs=5), None) == (2, 5)


def test_cost_model_counts() -> None:
    """The FLOP model on a case small enough to count by hand: one 3-atom molecule, H = 16, L = 2, tiles
    of 4 x 2 (the 3 receivers pad to 4, the senders to 4: 16 edge rows)."""
    n, e, h, L = 3, 6, 16, 2
    tiles = plan.EdgeTiles(receivers=4, senders=2)
    assert plan.edge_rows(n, tiles) == 16
    forward = L * (4 * e + 4 * n) * h * h + 6 * (L - 1) * n * h * h
    backward = L * (8 * e + 8 * n) * h * h + 12 * (L - 1) * n * h * h
    c = plan.egnn_cost([n], h, L, tiles=tiles)
    assert c.useful_flops == forward + backward
    assert c.executed_flops == (L * (4 * 16 + 4 * n) * h * h + 6 * (L - 1) * n * h * h
                                + L * (12 * 16 + 12 * n) * h * h + (L - 1) * (2 * 16 + 16 * n) * h * h)
    assert plan.egnn_cost([n], h, L, tiles=tiles, backward=False).useful_flops == forward
    assert c.state_bytes > 0 and c.compulsory_bytes > 0
    assert plan.egnn_cost([], h, L).useful_flops == 0


# ---- the opt-in switch, tbg info ----------------------------------------------------------------------------
def test_serving_is_scoped() -> None:
    """Inside tbg.nn.triton.serving the CPU key runs the Triton code, afterwards the C++ kernel again
    (told apart by their messages for a decreasing mol_ptr)."""
    x, h0, _, weights, rng, _ = _inputs([4, 3], 8, 1, torch.float64)
    bad = torch.tensor([0, 5, 4, 7])
    with tbg_triton.serving("egnn", "cpu"):
        with pytest.raises(RuntimeError, match="never decrease and end at M"):
            torch.ops.tbg.egnn_forward(x, h0, bad, *weights, rng)
    with pytest.raises(RuntimeError, match=r"mol_ptr\[2\] = 4 < mol_ptr\[1\] = 5"):
        torch.ops.tbg.egnn_forward(x, h0, bad, *weights, rng)


def test_info_rows(monkeypatch) -> None:
    """tbg info names the implementation of egnn_forward / egnn_backward on CUDA: the .cu kernel (verified
    on the GPU run recorded in dispatch.GPU_VERIFIED) or, with TBG_TRITON=egnn, Triton, not verified."""
    rows = {(r.op, r.device): r for r in dispatch.implementations()}
    assert rows[("egnn_forward", "cpu")].name == dispatch.CPP
    default = rows[("egnn_forward", "cuda")]
    if tbg.has_kernel("egnn_forward", "cuda") and default.name == dispatch.CU:
        assert default.gpu_verified is not None
    monkeypatch.setattr(ops, "PYTHON_CUDA_IMPLEMENTATIONS", {"egnn_forward": TE.egnn_forward,
                                                             "egnn_backward": TE.egnn_backward})
    monkeypatch.setenv(tbg_triton.ENV, "egnn")
    text = dict(dispatch.describe())
    for op in ("egnn_forward", "egnn_backward"):
        assert text[op].startswith("cpu: C++ CPU kernel") and "Triton, not yet verified on a GPU" in text[op]
    assert text[tbg_triton.ENV].startswith("egnn (groups: divergence, egnn;")


def test_switch_installs_triton_at_import(tmp_path) -> None:
    """TBG_TRITON=egnn at `import tbg`: tbg.nn.ops installs the Triton functions as the CUDA kernels of
    egnn_forward / egnn_backward (in place of the .cu kernels in a CUDA build), and tbg info says so."""
    code = (
        "import tbg\n"
        "from tbg.nn import dispatch, ops\n"
        "from tbg.nn.triton import egnn as TE\n"
        "assert ops.PYTHON_CUDA_IMPLEMENTATIONS['egnn_forward'] is TE.egnn_forward\n"
        "assert ops.PYTHON_CUDA_IMPLEMENTATIONS['egnn_backward'] is TE.egnn_backward\n"
        "assert 'egnn_divergence' not in ops.PYTHON_CUDA_IMPLEMENTATIONS or "
        "ops.PYTHON_CUDA_IMPLEMENTATIONS['egnn_divergence'].__module__ == 'tbg.nn.divergence_torch'\n"
        "assert tbg.has_kernel('egnn_forward', 'cuda')\n"
        "print(dict(dispatch.describe())['egnn_backward'])\n"
    )
    env = {**os.environ, tbg_triton.ENV: "egnn"}
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "cuda" in out.stdout and "Triton, not yet verified on a GPU" in out.stdout


# ---- TF32 on a GPU -------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="TF32 is a GPU mode")
def test_tf32_within_its_rounding() -> None:
    """With PyTorch's TF32 switch on, the edge dots use TF32 tensor cores (10-bit mantissa inputs): the
    field and the gradients stay within 1e-2 of the exact ones on a 3-layer stack."""
    x, h0, ptr, weights, rng, grad_v = _inputs([9, 12, 5], 64, 3, torch.float32)
    v_ref, grads_ref = _reference_grads(x, h0, ptr, weights, rng, grad_v)
    args = _to("cuda", x, h0, ptr, *weights)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            v, hs, xs = TE.egnn_forward(*args, rng)
            grads = TE.egnn_backward(grad_v.cuda(), *args, hs, xs, rng)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert_close_scaled(v.cpu(), v_ref, 1e-2, "v (TF32)")
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert_close_scaled(got.cpu(), ref, 1e-2, f"grad {name} (TF32)")

