"""How tbg is put together: ops fully registered by `import tbg`, no import cycle, layers that import only
downward (docs/architecture.md), and one definition of the weight order and the shared constants that the
compiled library agrees with."""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tbg
from tbg.nn import divergence_torch, ops, reference, spec
from conftest import random_egnn
from egnn_cases import op_inputs

PACKAGE = Path(tbg.__file__).parent


# ---- registration at import -----------------------------------------------------------------------
# Run in a fresh interpreter: what `import tbg` alone defines, a direct op call right after it, then
# the same answers again after the module front has run every op.
_FRESH = r'''
import contextlib, io, json, warnings
import torch
import tbg
from tbg.cli import main
from tbg.nn import reference
from tbg.nn.layout import mol_ptr_from_sizes
from torch._subclasses.fake_tensor import FakeTensorMode

OPS = ("egnn_forward", "egnn_backward", "egnn_divergence", "egnn_jvp")

def answers():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["info"])
    keys = {op: [k for k in ("Autograd", "Meta", "CPU", "CUDA")
                 if torch._C._dispatch_has_kernel_for_dispatch_key(f"tbg::{op}", k)] for op in OPS}
    return {"build_info": tbg.build_info(), "info": out.getvalue(), "dispatch_keys": keys,
            "has_kernel": {op: [tbg.has_kernel(op, d) for d in ("cpu", "cuda")] for op in OPS}}

torch.manual_seed(0)
model = tbg.EGNN(3, 8, 2).double()
ptr = mol_ptr_from_sizes([3, 4])
x = torch.randn(7, 3, dtype=torch.float64)
h0 = torch.randn(7, 8, dtype=torch.float64)
weights = [w.detach() for w in model.stacked_weights()]
before = answers()

# A direct call right after import: autograd without PyTorch's "no autograd kernel" fallback ...
with warnings.catch_warnings():
    warnings.simplefilter("error")
    xg = x.clone().requires_grad_()
    v, _, _ = torch.ops.tbg.egnn_forward(xg, h0, ptr, *weights, model.layer_range)
    v.square().sum().backward()
xr = x.clone().requires_grad_()
reference.egnn_velocity(xr, h0, ptr, weights, model.layer_range).square().sum().backward()
grad_error = (xg.grad - xr.grad).abs().max().item()
# ... and fake kernels: every op traces on fake tensors.
with FakeTensorMode() as mode:
    fx, fh, fp = mode.from_tensor(x), mode.from_tensor(h0), mode.from_tensor(ptr)
    fw = [mode.from_tensor(w) for w in weights]
    fv, fhs, fxs = torch.ops.tbg.egnn_forward(fx, fh, fp, *fw, 1.0)
    grads = torch.ops.tbg.egnn_backward(fv, fx, fh, fp, *fw, fhs, fxs, 1.0)
    _, fdiv = torch.ops.tbg.egnn_divergence(fx, fh, fp, *fw, 1.0, 2)
    _, fjvp = torch.ops.tbg.egnn_jvp(fx, fh, fp, *fw, mode.from_tensor(torch.zeros(5, 7, 3, dtype=torch.float64)), 1.0)
fake_shapes = [list(fhs.shape), list(grads[0].shape), len(grads), list(fdiv.shape), list(fjvp.shape)]

# Every op through the module front, then the answers again.
features = torch.randn(7, 3, dtype=torch.float64)
t = torch.rand(2, dtype=torch.float64)
xm = x.clone().requires_grad_()
model(t, xm, features, mol_ptr=ptr, backend="fused").sum().backward()
with torch.no_grad():
    model.divergence(t, x, features, mol_ptr=ptr)
    model.divergence(t, x, features, mol_ptr=ptr, method="hutchinson", n_probes=2)
model.divergence(t, x, features, mol_ptr=ptr)[1].sum().backward()
after = answers()
print(json.dumps({"before": before, "after": after, "grad_error": grad_error, "fake_shapes": fake_shapes}))
'''


def test_ops_fully_registered_by_import_tbg() -> None:
    run = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    before, after = out["before"], out["after"]
    assert before == after
    for op, keys in before["dispatch_keys"].items():
        assert {"Autograd", "Meta", "CPU"} <= set(keys), op
    assert "egnn_divergence" in before["info"] and before["has_kernel"]["egnn_forward"][0]
    assert out["grad_error"] < 1e-10
    assert out["fake_shapes"] == [[2, 7, 8], [7, 3], 15, [2], [5, 7, 3]]


def test_divergence_ops_refuse_to_backpropagate() -> None:
    """Without a gradient formula a backward pass through them raises instead of giving zeros."""
    model, x, h0, ptr, w = op_inputs([3, 2], 8, 2, torch.float64, "cpu")
    x.requires_grad_()
    _, div = torch.ops.tbg.egnn_divergence(x, h0, ptr, *w, model.layer_range, 3)
    with pytest.raises(NotImplementedError, match="EGNN.divergence"):
        div.sum().backward()
    _, jvp = torch.ops.tbg.egnn_jvp(x, h0, ptr, *w, torch.randn(2, 5, 3, dtype=torch.float64), model.layer_range)
    with pytest.raises(NotImplementedError, match="EGNN.divergence"):
        jvp.sum().backward()


def test_python_cuda_ops_are_the_ones_without_a_compiled_cuda_kernel() -> None:
    assert set(ops.PYTHON_CUDA_OPS) <= set(ops.cuda_implementations())
    if tbg.build_info()["cuda"] is None:
        assert set(ops.PYTHON_CUDA_OPS) == set(ops.cuda_implementations())
    assert all(tbg.has_kernel(op, "cuda") for op in ops.PYTHON_CUDA_OPS)


# ---- the import graph ------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, files: dict[str, Path]) -> set[str]:
    """tbg modules that `path` imports anywhere in its body (lazy imports inside functions count)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def imported(base: str, item: str) -> str:
        """`from base import item` imports the module base.item when there is one, else base. A
        package's generated module (tbg._build_config) has no source file and is no tbg module."""
        if f"{base}.{item}" in files or files[base].name != "__init__.py":
            return f"{base}.{item}" if f"{base}.{item}" in files else base
        return f"{base}.{item}" if importlib.util.find_spec(f"{base}.{item}") else base

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            raise AssertionError(f"{name} imports dynamically with __import__")
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [imported(base, alias.name) for alias in node.names] if base in files else []
        else:
            continue
        found |= {t for t in targets if t in files and t != name}
    return found


def _import_graph() -> dict[str, set[str]]:
    """Every tbg module -> the tbg modules it imports."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, files) for name, path in files.items()}
    assert graph["tbg.nn.egnn"] >= {"tbg.nn.ops", "tbg.nn.reference"}  # the parse sees imports at all
    return graph


def test_import_graph_is_acyclic() -> None:
    graph = _import_graph()
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, stack + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# The layers of docs/architecture.md, lowest first; the shared modules sit below all of them and the package
# front (tbg/__init__.py, which imports tbg.nn) on the nn layer.
LAYERS = ("shared", "chem", "nn", "flow", "evaluate", "cli")
SHARED = ("tbg.errors", "tbg.runfolder", "tbg._library")


def _layer(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module == "tbg":
        return "nn"
    if module == "tbg.__main__":
        return "cli"
    layer = module.split(".")[1]
    assert layer in LAYERS, f"{module} belongs to no layer of docs/architecture.md"
    return layer


def test_layers_import_only_downward() -> None:
    """chem -> nn -> flow -> evaluate -> cli: a module imports only from its own layer or lower ones."""
    graph = _import_graph()
    upward = [f"{name} -> {dep}" for name, deps in sorted(graph.items()) for dep in sorted(deps)
              if LAYERS.index(_layer(dep)) > LAYERS.index(_layer(name))]
    assert not upward, "imports from a higher layer: " + ", ".join(upward)
    assert "tbg.chem.data" in graph["tbg.flow.train"]  # downward imports exist, and pass


# ---- one definition of the weight order and the constants, and the C++ side agrees ------------------
def test_stacked_weights_follow_the_spec() -> None:
    assert reference.LayerWeights._fields == spec.WEIGHT_NAMES  # unstack_weights fills it by name
    model = random_egnn(3, 8, 4)
    weights = model.stacked_weights()
    assert tuple(tuple(w.shape) for w in weights) == spec.weight_shapes(4, 8)
    for w, entry in zip(weights, spec.STACKED_WEIGHTS):
        parameter = model.gcl_2.get_parameter(entry.parameter)
        assert torch.equal(w[2], parameter[0] if entry.first_row else parameter)


@pytest.mark.parametrize("implementation", ["egnn_forward", "egnn_divergence", "torch"])
def test_cpp_checks_name_the_weights_in_spec_order(implementation: str) -> None:
    """The argument checks name weight k and its expected shape: those of spec.STACKED_WEIGHTS[k]."""
    n_layers, hidden = 3, 6
    model, x, h0, ptr, weights = op_inputs([3, 2], hidden, n_layers, torch.float64, "cpu")
    call = {"egnn_forward": lambda w: torch.ops.tbg.egnn_forward(x, h0, ptr, *w, 1.0),
            "egnn_divergence": lambda w: torch.ops.tbg.egnn_divergence(x, h0, ptr, *w, 1.0, 2),
            "torch": lambda w: divergence_torch.egnn_divergence(x, h0, ptr, *w, 1.0, 2)}[implementation]
    call(weights)  # the right shapes pass
    for k, (name, shape) in enumerate(zip(spec.WEIGHT_NAMES, spec.weight_shapes(n_layers, hidden))):
        if k == 0:
            continue  # w1 fixes L: its own check reports the layout [L, H, 2H + 2]
        wrong = list(weights)
        wrong[k] = torch.zeros(*shape[:-1], shape[-1] + 1, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=rf"weight {name} must have shape \[{', '.join(map(str, shape))}\] "
                                               rf"for L = {n_layers}, H = {hidden}"):
            call(wrong)
    with pytest.raises(RuntimeError, match=r"w1 must have shape \[L, H, 2H \+ 2\]"):
        call([weights[0][0], *weights[1:]])


def test_cpp_constants_are_the_spec() -> None:
    library = ctypes.CDLL(tbg.build_info()["library"])
    assert ctypes.c_double.in_dll(library, "tbg_edge_eps").value == spec.EDGE_EPS
    assert ctypes.c_int64.in_dll(library, "tbg_cpu_tangent_budget").value == spec.CPU_TANGENT_BUDGET


def test_edge_eps_where_it_matters(monkeypatch) -> None:
    """Coincident atoms (r = 0): the edge direction's derivative is 1 / (sqrt(eps) + 1), so the
    divergence and the gradient see eps. The kernels agree with the reference at spec.EDGE_EPS to
    1e-10 and disagree with a reference at 100 x EDGE_EPS (the check can fail)."""
    model, x, h0, ptr, w = op_inputs([4, 3], 8, 2, torch.float64, "cpu")
    x = x.clone()
    x[1], x[5] = x[0], x[4]

    def results(fused: bool) -> list[torch.Tensor]:
        xg = x.clone().requires_grad_()
        velocity = ops.egnn_velocity if fused else reference.egnn_velocity
        velocity(xg, h0, ptr, w, model.layer_range).square().sum().backward()
        divergence = ops.egnn_divergence if fused else reference.egnn_divergence
        with torch.no_grad():
            return [xg.grad, divergence(x, h0, ptr, w, model.layer_range)[1]]

    kernels, ref = results(True), results(False)
    for a, b in zip(kernels, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(reference, "EDGE_EPS", 100 * spec.EDGE_EPS)
    assert all((a - b).abs().max() > 1e-6 * b.abs().max() for a, b in zip(kernels, results(False)))
