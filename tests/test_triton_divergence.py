"""Triton exact divergence / JVP (tbg.nn.triton.divergence) against the C++ CPU kernel and the references.

Where no GPU is visible the kernels run under the Triton interpreter on CPU tensors ("cpu" cases):
tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (the interpreter is chosen
then, and torch._dynamo imports triton). With a GPU (and no TRITON_INTERPRET) the kernels are compiled
and the "cuda" cases run natively (`pytest -k cuda`). Either way a test serves the ops with the Triton
code through a scoped torch.library registration for its device's dispatch key (on CUDA unless
TBG_TRITON already made it the CUDA kernel), so the dispatcher, EGNN.divergence, opcheck and
torch.compile exercise it; the registration is torn down after the test and the C++ kernel serves the
CPU again.

References: the C++ CPU kernel (same dtype), the published brute force (one backward pass per
coordinate) and the trace of torch.func.jacfwd on the fp64 reference model. Tolerances: fp64 1e-10
relative; fp32 1e-5 relative to the largest |div| of the batch, or 3x what the fp32 reference itself
misses when random inputs are ill-conditioned (as tests/test_divergence.py). Every buffer the
implementation allocates is NaN-filled first, so an element it forgets to write shows.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

import tbg
from tbg.nn import dispatch, ops, reference
from tbg.nn import triton as tbg_triton
from tbg.nn.layout import mol_ptr_from_sizes, molecule_index
from conftest import random_egnn
from host_reads import HostReads, cuda_syncs

_KERNELS = "tbg.nn.triton.divergence"

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (an optional dependency of tbg)", allow_module_level=True)
TD = importlib.import_module(_KERNELS)
# Imported after the skip above: these import triton.
from tbg.nn.triton import plan  # noqa: E402
from triton_cases import DEVICES, INTERPRETED, poisoned_buffers, triton_serving  # noqa: E402, F401 (autouse fixture)

F = 5  # feature width of the test models
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _batch(layout: str, sizes: list[int], dtype: torch.dtype):
    """CPU inputs of one layout holding molecules of the given sizes, and their ragged form."""
    n_mol, n_max = len(sizes), max(sizes, default=1)
    kw = dict(dtype=dtype)
    if layout == "ragged":
        ptr = mol_ptr_from_sizes(sizes)
        x, f = torch.randn(int(ptr[-1]), 3, **kw) * 1.5, torch.randn(int(ptr[-1]), F, **kw)
        return dict(x=x, features=f, mol_ptr=ptr), (x, f, ptr)
    if layout == "fixed":
        x, f = torch.randn(n_mol, n_max, 3, **kw) * 1.5, torch.randn(n_max, F, **kw)
        ptr = torch.arange(n_mol + 1) * n_max
        return dict(x=x, features=f), (x.reshape(-1, 3), f.expand(n_mol, -1, -1).reshape(-1, F), ptr)
    mask = torch.zeros(n_mol, n_max + 2, dtype=torch.bool)  # padded: real atoms scattered, junk padding
    for b, n in enumerate(sizes):
        mask[b, torch.randperm(n_max + 2)[:n]] = True
    x, f = torch.randn(n_mol, n_max + 2, 3, **kw) * 1.5, torch.randn(n_mol, n_max + 2, F, **kw)
    return dict(x=x, features=f, node_mask=mask), (x[mask], f[mask], mol_ptr_from_sizes(mask.sum(1)))


def _to(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _references(model: tbg.EGNN, t, x, f, ptr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, div by brute force, div by jacfwd) on the fp64 reference, on CPU."""
    model64 = copy.deepcopy(model).to(torch.float64)
    x, f, t = x.double(), f.double(), t.double()
    with torch.no_grad():
        h0 = model64.embed(t[molecule_index(ptr)].unsqueeze(1), f)
    field = reference.egnn_field(model64, h0, ptr)
    v, div_bf = reference.divergence_bruteforce(field, x, ptr)
    with torch.no_grad():
        _, div_jf = reference.divergence_jacfwd(field, x, ptr)
    return v, div_bf, div_jf


def _div_atol(model: tbg.EGNN, dtype, t, x, f, ptr, div_ref: torch.Tensor) -> float:
    atol = _tol(dtype) * max(div_ref.abs().max().item() if div_ref.numel() else 0.0, 1.0)
    if dtype == torch.float32 and div_ref.numel():
        # Near-coincident atoms make some random fp32 inputs ill-conditioned: allow 3x what the
        # fp32 reference itself gets wrong, never less than 1e-5 relative.
        model32 = copy.deepcopy(model).to(torch.float32)
        with torch.no_grad():
            h0 = model32.embed(t.float()[molecule_index(ptr)].unsqueeze(1), f.float())
        _, div32 = reference.divergence_bruteforce(reference.egnn_field(model32, h0, ptr), x.float(), ptr)
        atol = max(atol, 3 * (div32.double() - div_ref).abs().max().item())
    return atol


# ---- the exact divergence, every layout -----------------------------------------------------------------
CASES = [  # layout, molecule sizes (N <= 12), tangent_chunk, hidden, layers
    ("ragged", [1, 2, 3, 7], 4, 12, 3),
    ("ragged", [7, 0, 3, 1], None, 16, 2),
    ("ragged", [12], 13, 9, 3),
    ("ragged", [], None, 12, 2),
    ("fixed", [6, 6], 5, 12, 1),
    ("padded", [3, 9, 1], None, 12, 3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout,sizes,chunk,hidden,n_layers", CASES)
def test_divergence_matches_cpp_kernel_and_references(device, dtype, layout, sizes, chunk, hidden, n_layers) -> None:
    model = random_egnn(F, hidden, n_layers, dtype=dtype)
    inputs, (x_r, f_r, ptr) = _batch(layout, sizes, dtype)
    t = torch.rand(len(sizes), dtype=dtype)
    with torch.no_grad():
        v_cpp, div_cpp = model.divergence(t, **inputs, backend="fused", tangent_chunk=chunk)  # C++ kernel
        model_dev = copy.deepcopy(model).to(device)
        with triton_serving("divergence", device):
            v, div = model_dev.divergence(t.to(device), **_to(inputs, device), backend="fused", tangent_chunk=chunk)
    v, div = v.cpu(), div.cpu()
    assert v.shape == inputs["x"].shape and div.shape == (len(sizes),)
    v_ref, div_bf, div_jf = _references(model, t, x_r, f_r, ptr)
    torch.testing.assert_close(div_bf, div_jf, rtol=1e-10, atol=1e-10)
    v_real = v if layout == "ragged" else v[inputs["node_mask"]] if layout == "padded" else v.reshape(-1, 3)
    v_scale = max(v_ref.abs().max().item() if v_ref.numel() else 0.0, 1.0)
    torch.testing.assert_close(v_real.double(), v_ref, rtol=0.0, atol=_tol(dtype) * v_scale)
    atol = _div_atol(model, dtype, t, x_r, f_r, ptr, div_bf)
    torch.testing.assert_close(div.double(), div_bf, rtol=0.0, atol=atol)
    torch.testing.assert_close(div, div_cpp, rtol=0.0, atol=atol)
    torch.testing.assert_close(v, v_cpp, rtol=0.0, atol=_tol(dtype) * v_scale)
    if layout == "padded":
        assert (v[~inputs["node_mask"]] == 0).all()
    for b, n in enumerate(sizes):  # molecules of one atom (or none) do not move
        if n <= 1:
            assert div[b] == 0


# ---- JVPs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_jvp_matches_cpp_kernel_and_reference(device, dtype, n_layers) -> None:
    model = random_egnn(F, 12, n_layers, dtype=dtype)
    _, (x, f, ptr) = _batch("ragged", [2, 7, 1, 0, 4], dtype)
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, dtype=dtype), f)
        weights = model.stacked_weights()
        tangents = torch.randn(3, x.shape[0], 3, dtype=dtype)
        v_cpp, jvp_cpp = ops.egnn_jvp(x, h0, ptr, weights, tangents, model.layer_range)
        v_ref, jvp_ref = reference.field_jvp(reference.egnn_field(model, h0, ptr), x, tangents)
        args = [a.to(device) for a in (x, h0, ptr)]
        dev_weights = tuple(w.to(device) for w in weights)
        with triton_serving("divergence", device):
            v, jvp = ops.egnn_jvp(*args, dev_weights, tangents.to(device), model.layer_range)
            v0, none = ops.egnn_jvp(*args, dev_weights, tangents[:0].to(device), model.layer_range)
    scale = max(jvp_ref.abs().max().item(), 1.0)
    for got in (jvp.cpu(), jvp_cpp):
        torch.testing.assert_close(got, jvp_ref, rtol=0, atol=_tol(dtype) * scale)
    for got in (v.cpu(), v0.cpu(), v_cpp):
        torch.testing.assert_close(got, v_ref, rtol=_tol(dtype), atol=_tol(dtype))
    assert none.shape == (0, x.shape[0], 3)


@pytest.mark.parametrize("device", DEVICES)
def test_hutchinson_through_triton(device) -> None:
    """EGNN.divergence(method="hutchinson") takes egnn_jvp: the same estimate as the C++ kernel's."""
    model = random_egnn(F, 10, 3)
    inputs, _ = _batch("padded", [4, 7, 1], torch.float64)
    t = torch.rand(3, dtype=torch.float64)
    kw = dict(method="hutchinson", n_probes=3, backend="fused")
    with torch.no_grad():
        _, est_cpp = model.divergence(t, **inputs, generator=torch.Generator().manual_seed(3), **kw)
        with triton_serving("divergence", device):
            _, est = model.to(device).divergence(t.to(device), **_to(inputs, device),
                                                 generator=torch.Generator(device).manual_seed(3), **kw)
    if device == "cpu":  # the same probes: the same numbers
        torch.testing.assert_close(est, est_cpp, rtol=1e-10, atol=1e-10)
    else:  # another generator: a finite estimate of the right shape
        assert est.shape == (3,) and torch.isfinite(est).all() and est[2] == 0


# ---- tiles, loops and chunks --------------------------------------------------------------------------
def test_small_tiles_loop_over_senders_and_tangents() -> None:
    """Tiles smaller than the molecules (interpreter only: a GPU needs dot sides >= 16), so every kernel
    loops over several sender tiles and tangent tiles and masks partial ones."""
    if not INTERPRETED:
        pytest.skip("tiles below 16 run under the interpreter only")
    model = random_egnn(F, 20, 3)  # H = 20: padded to 32 channels
    _, (x, f, ptr) = _batch("ragged", [7, 1, 0, 2], torch.float64)
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, dtype=torch.float64), f)
        weights = tuple(w.detach() for w in model.stacked_weights())
        tangents = torch.randn(3, x.shape[0], 3, dtype=torch.float64)
        v_ref, div_ref = torch.ops.tbg.egnn_divergence(x, h0, ptr, *weights, model.layer_range, 21)
        _, jvp_ref = torch.ops.tbg.egnn_jvp(x, h0, ptr, *weights, tangents, model.layer_range)
        with TD.use_blocks(plan.Blocks(tangents=4, first_tangents=4, senders=4)):
            v, div = TD.egnn_divergence(x, h0, ptr, *weights, model.layer_range, 13)
            _, jvp = TD.egnn_jvp(x, h0, ptr, *weights, tangents, model.layer_range)
    for got, ref in ((v, v_ref), (div, div_ref), (jvp, jvp_ref)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-11 * max(ref.abs().max().item(), 1))


def test_gpu_tiles_are_checked() -> None:
    with pytest.raises(ValueError, match="power of two"):
        plan.Blocks(tangents=3).check(native=False)
    with pytest.raises(ValueError, match="senders >= 8"):
        plan.Blocks(senders=4).check(native=True)
    with pytest.raises(ValueError, match="tangents \\* senders >= 16"):
        plan.Blocks(tangents=1, senders=8).check(native=True)
    for blocks in (*(plan.default_blocks(h) for h in (8, 32, 64, 128, 256)), *plan.SWEEP):
        blocks.check(native=True)
    assert [plan.padded_hidden(h) for h in (1, 12, 16, 17, 64, 100)] == [16, 16, 16, 32, 64, 128]


@pytest.mark.parametrize("device", DEVICES)
def test_jvp_chunks_cover_the_probes(device, monkeypatch) -> None:
    """A state budget of two probes splits K = 5 probes into chunks 2, 2, 1: the same JVPs."""
    x, h0, ptr, weights, rng = _op_args("cpu")
    tangents = torch.randn(5, x.shape[0], 3, dtype=x.dtype)
    with torch.no_grad():
        _, jvp_ref = torch.ops.tbg.egnn_jvp(x, h0, ptr, *weights, tangents, rng)
        monkeypatch.setattr(plan, "STATE_BUDGET", 2 * 6 * x.shape[0] * h0.shape[1])
        assert plan.jvp_chunk(x.shape[0], h0.shape[1], 5) == 2
        _, jvp = TD.egnn_jvp(x.to(device), h0.to(device), ptr.to(device), *(w.to(device) for w in weights),
                             tangents.to(device), rng)
    torch.testing.assert_close(jvp.cpu(), jvp_ref, rtol=1e-11, atol=1e-11)


# ---- op contracts -------------------------------------------------------------------------------------
def _op_args(device: str, dtype: torch.dtype = torch.float64):
    model = random_egnn(F, 6, 2, dtype=dtype)
    _, (x, f, ptr) = _batch("ragged", [3, 1, 2], dtype)
    with torch.no_grad():
        h0 = model.embed(torch.rand(x.shape[0], 1, dtype=dtype), f)
        weights = tuple(w.detach().to(device) for w in model.stacked_weights())
    return x.to(device), h0.to(device), ptr.to(device), weights, model.layer_range


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device) -> None:
    x, h0, ptr, weights, rng = _op_args(device)
    tangents = torch.randn(2, x.shape[0], 3, dtype=x.dtype, device=device)
    with triton_serving("divergence", device):
        torch.library.opcheck(torch.ops.tbg.egnn_divergence.default, (x, h0, ptr, *weights, rng, 5))
        torch.library.opcheck(torch.ops.tbg.egnn_jvp.default, (x, h0, ptr, *weights, tangents, rng))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device) -> None:
    """torch.compile(fullgraph) through the op (opaque, its fake kernel) calls the Triton code at run
    time; the implementation function itself is traceable too (kernel launches via wrap_triton)."""
    x, h0, ptr, weights, rng = _op_args(device)
    tangents = torch.randn(2, x.shape[0], 3, dtype=x.dtype, device=device)

    def both(x: torch.Tensor, tangents: torch.Tensor):
        v, div = torch.ops.tbg.egnn_divergence(x, h0, ptr, *weights, rng, 4)
        return v, div, torch.ops.tbg.egnn_jvp(x, h0, ptr, *weights, tangents, rng)[1]

    torch._dynamo.reset()
    with torch.no_grad(), triton_serving("divergence", device):
        eager = both(x, tangents)
        compiled = torch.compile(both, fullgraph=True, backend="aot_eager")(x, tangents)
        # Dynamo records wrap_triton launches of compiled kernels; it cannot trace the interpreter.
        traced = None if INTERPRETED else torch.compile(TD.egnn_jvp, backend="aot_eager")(
            x, h0, ptr, *weights, tangents, rng)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if traced is not None:
        torch.testing.assert_close(traced[1], eager[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(device) -> None:
    x, h0, ptr, weights, rng = _op_args(device)
    with pytest.raises(RuntimeError, match="tangent_chunk"):
        TD.egnn_divergence(x, h0, ptr, *weights, rng, 0)
    with pytest.raises(RuntimeError, match="tangents"):
        TD.egnn_jvp(x, h0, ptr, *weights, torch.randn(2, x.shape[0] + 1, 3, dtype=x.dtype, device=device), rng)
    with pytest.raises(RuntimeError, match="tangents"):
        TD.egnn_jvp(x, h0, ptr, *weights, torch.randn(2, x.shape[0], 3, device=device), rng)
    with pytest.raises(RuntimeError, match="NaN"):
        TD.egnn_divergence(x.clone().fill_(float("nan")), h0, ptr, *weights, rng, 3)
    bad_tangents = torch.zeros(1, x.shape[0], 3, dtype=x.dtype, device=device)
    bad_tangents[0, 2, 1] = float("inf")
    with pytest.raises(RuntimeError, match="NaN"):
        TD.egnn_jvp(x, h0, ptr, *weights, bad_tangents, rng)
    with pytest.raises(RuntimeError, match="w2"):
        TD.egnn_divergence(x, h0, ptr, *weights[:2], weights[2][:, :-1], *weights[3:], rng, 3)
    with pytest.raises(RuntimeError, match="mol_ptr"):
        TD.egnn_divergence(x, h0, ptr.flip(0), *weights, rng, 3)
    with pytest.raises(RuntimeError, match="mol_ptr"):
        TD.egnn_divergence(x, h0, ptr.int(), *weights, rng, 3)
    with pytest.raises(RuntimeError, match="h0"):
        TD.egnn_divergence(x, h0.float(), ptr, *weights, rng, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_one_host_read_per_call(device) -> None:
    """A call reads device values on the host once: _host_view copies mol_ptr and the finiteness flags
    in one .cpu() and works on that copy; nothing else reads (no .item(), nonzero, repeat_interleave
    ... in the layer / chunk loops), and every tensor made names its device. On CUDA torch's sync
    debug mode counts the synchronisations as well."""
    x, h0, ptr, weights, rng = _op_args(device)
    tangents = torch.randn(3, x.shape[0], 3, dtype=x.dtype, device=device)
    for call in (lambda: TD.egnn_divergence(x, h0, ptr, *weights, rng, 2),
                 lambda: TD.egnn_jvp(x, h0, ptr, *weights, tangents, rng)):
        with HostReads(allowed_in=("_host_view", _KERNELS)) as mode:
            call()
        # (check_mol_ptr's own .cpu() on the host copy copies nothing.)
        assert mode.allowed.count(f"{_KERNELS}.cpu") == 1 and mode.reads == [] and mode.missing_device == []
        if device == "cuda":
            syncs = cuda_syncs(call)
            assert len(syncs) == 1, syncs


def test_dot_precision_follows_torch_switch() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert TD.dot_precision(torch.float32, cuda) == "tf32"
        assert TD.dot_precision(torch.float64, cuda) == "ieee"
        assert TD.dot_precision(torch.float32, cpu) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert TD.dot_precision(torch.float32, cuda) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# ---- the opt-in switch, tbg info, Triton optional --------------------------------------------------------
def test_switch_selects_the_requested_groups(monkeypatch, caplog) -> None:
    monkeypatch.delenv(tbg_triton.ENV, raising=False)
    assert tbg_triton.cuda_implementations() == {}
    monkeypatch.setenv(tbg_triton.ENV, " divergence, bogus ,divergence")
    with caplog.at_level(logging.WARNING, logger="tbg"):
        assert tbg_triton.requested() == ("divergence",)
    assert "'bogus' is not a group" in caplog.text
    assert tbg_triton.cuda_implementations() == {"egnn_divergence": TD.egnn_divergence, "egnn_jvp": TD.egnn_jvp}
    # ... and tbg.nn.ops takes them over the torch implementation.
    assert ops.cuda_implementations()["egnn_jvp"] is TD.egnn_jvp
    monkeypatch.setattr(tbg_triton, "triton_status", lambda: "triton is not installed")
    with caplog.at_level(logging.WARNING, logger="tbg"):
        assert tbg_triton.cuda_implementations() == {}
    assert "is ignored: triton is not installed" in caplog.text


def test_info_names_the_implementation_and_its_gpu_verification(monkeypatch) -> None:
    rows = {(r.op, r.device): r for r in dispatch.implementations()}
    assert rows[("egnn_divergence", "cpu")].name == dispatch.CPP
    cuda = rows[("egnn_divergence", "cuda")]
    assert cuda.name == dispatch.TORCH_OPS and cuda.gpu_verified is None
    monkeypatch.setattr(ops, "PYTHON_CUDA_IMPLEMENTATIONS", {"egnn_divergence": TD.egnn_divergence,
                                                             "egnn_jvp": TD.egnn_jvp})
    monkeypatch.setenv(tbg_triton.ENV, "divergence")
    text = dict(dispatch.describe())
    assert "cuda" in text["egnn_jvp"] and "Triton, not yet verified on a GPU" in text["egnn_jvp"]
    assert text["egnn_divergence"].startswith("cpu: C++ CPU kernel")
    assert text[tbg_triton.ENV].startswith("divergence")
    if tbg.has_kernel("egnn_forward", "cuda"):
        assert "verified on NVIDIA H100" in text["egnn_forward"]


def test_switch_installs_triton_at_import(tmp_path) -> None:
    """TBG_TRITON=divergence at `import tbg`: tbg.nn.ops installs the Triton functions as the CUDA
    kernels of both ops, and tbg info says so."""
    code = (
        "import tbg\n"
        "from tbg.nn import dispatch, ops\n"
        "from tbg.nn.triton import divergence as TD\n"
        "assert ops.PYTHON_CUDA_IMPLEMENTATIONS == {'egnn_divergence': TD.egnn_divergence, 'egnn_jvp': TD.egnn_jvp}\n"
        "assert tbg.has_kernel('egnn_divergence', 'cuda')\n"
        "print(dict(dispatch.describe())['egnn_jvp'])\n"
    )
    env = {**os.environ, tbg_triton.ENV: "divergence"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "cuda" in out.stdout and "Triton, not yet verified on a GPU" in out.stdout


def test_tbg_works_without_triton(tmp_path) -> None:
    """Triton stays optional: with it unimportable, tbg imports, computes the divergence on CPU, and
    TBG_TRITON=divergence falls back to the torch CUDA implementation with a warning."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # any `import triton` now fails
        "import torch, tbg\n"
        "from tbg.nn import dispatch, ops\n"
        "m = tbg.EGNN(3, 8, 2)\n"
        "with torch.no_grad():\n"
        "    v, div = m.divergence(0.5, torch.randn(2, 4, 3), torch.randn(4, 3))\n"
        "assert div.shape == (2,) and torch.isfinite(div).all()\n"
        "assert ops.PYTHON_CUDA_IMPLEMENTATIONS['egnn_divergence'].__module__ == 'tbg.nn.divergence_torch'\n"
        "print(dict(dispatch.describe())['TBG_TRITON'])\n"
    )
    env = {**os.environ, tbg_triton.ENV: "divergence"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "TBG_TRITON=divergence is ignored: triton is not installed" in out.stderr
    assert "triton is not installed" in out.stdout


def test_cost_model_counts() -> None:
    """The FLOP model on a case small enough to count by hand: one 3-atom molecule, H = 16, L = 3."""
    n, e, h = 3, 6, 16
    c = plan.cost([n], h, 3)
    primal = 4 * 3 * (e + n) * h * h + 6 * 2 * n * h * h
    rows = 4 * e * h * h + 2 * 9 * e * h + 4 * 9 * e * h * h + 4 * (n - 1) * 9 * h * h
    node = 9 * n * h * h * (8 * 2 + 2)
    assert c.useful_flops == primal + rows + node
    assert c.executed_flops > c.useful_flops and c.state_bytes > c.compulsory_bytes > 0
    jvp = plan.cost([n, 1], h, 3, n_probes=2)
    assert jvp.useful_flops < plan.cost([n, 1], h, 3, n_probes=4).useful_flops
    assert plan.cost([], h, 3).useful_flops == 0
