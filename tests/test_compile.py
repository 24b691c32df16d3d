"""torch.compile with the default (inductor) backend and fullgraph=True over what an ODE solver and a
training loop call: the fused field, its gradient and the exact divergence (and a Hutchinson JVP), on
the CPU. The ops' fake kernels and autograd registration (tbg.nn.ops) are what make this work: no
graph breaks (torch._dynamo.explain), one graph per function, and the compiled results equal eager
ones to float32 rounding. Tiny model: inductor compile time dominates.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from tbg.nn import ops
from tbg.nn.hutchinson import probes
from tbg.nn.layout import molecule_index
from conftest import random_egnn
from egnn_cases import ragged_inputs


class _Case(torch.nn.Module):
    """A fixed ragged batch and its EGNN: the field and the divergence as plain functions of (t, x)."""

    def __init__(self) -> None:
        super().__init__()
        self.egnn = random_egnn(3, 8, 2, dtype=torch.float32, scale=0.5)
        self.t, self.x, self.features, self.mol_ptr = ragged_inputs([4, 1, 3], 3, torch.float32, "cpu")
        self.mol = molecule_index(self.mol_ptr)
        self.eps = probes(2, self.x, generator=torch.Generator().manual_seed(3))

    def h0(self, t: torch.Tensor) -> torch.Tensor:
        return self.egnn.embed(t[self.mol].unsqueeze(1), self.features)

    def field(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ops.egnn_velocity(x, self.h0(t), self.mol_ptr, self.egnn.stacked_weights(), self.egnn.layer_range)

    def divergence(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # An explicit tangent_chunk: the default is computed from mol_ptr's values (data-dependent).
        return ops.egnn_divergence(x, self.h0(t), self.mol_ptr, self.egnn.stacked_weights(), self.egnn.layer_range,
                                   tangent_chunk=5)[1]

    def hutchinson_jvp(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ops.egnn_jvp(x, self.h0(t), self.mol_ptr, self.egnn.stacked_weights(), self.eps,
                            self.egnn.layer_range)[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_one_graph(fn, *args) -> None:
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inductor_fullgraph_field_gradient_divergence() -> None:
    case = _Case()
    t, x = case.t, case.x
    _assert_one_graph(case.field, t, x)
    field = torch.compile(case.field, fullgraph=True)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    v_eager, v_compiled = case.field(t, x_eager), field(t, x_compiled)
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-5, atol=1e-6)
    # The gradient: AOTAutograd traces the op's registered backward (tbg::egnn_backward).
    grad_v = torch.randn_like(v_eager)
    (v_eager * grad_v).sum().backward()
    (v_compiled * grad_v).sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-6)
    emb = case.egnn.embedding.weight
    assert emb.grad is not None and torch.isfinite(emb.grad).all()

    with torch.no_grad():
        for fn in (case.divergence, case.hutchinson_jvp):
            _assert_one_graph(fn, t, x)
            torch.testing.assert_close(torch.compile(fn, fullgraph=True)(t, x), fn(t, x), rtol=1e-5, atol=1e-6)
