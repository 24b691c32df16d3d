"""tbg.nn.ExactDivergenceEstimator, bgflow's estimator convention on tbg's engine, against the brute
force on stand-ins of the published dynamics (tests/published_dynamics.py; neither bgflow nor the
published code is needed).

Tolerances: float64 within 1e-10 of the largest |entry|; float32 (fused kernels) against the float64
brute force on the same values within 1e-5 of it (the kernels' own tolerance, tests/egnn_cases.py).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchdiffeq

import tbg
from tbg.nn.published import ExactDivergenceEstimator, bruteforce_divergence
from published_dynamics import EGNN_dynamics_AD2_cat, EGNN_dynamics_transferable_MD, NetDynamicsWrapper

F, HIDDEN, LAYERS = 5, 16, 3


def _randomise(module: torch.nn.Module, scale: float = 1.0) -> torch.nn.Module:
    """Every parameter random (the published init makes the coordinate head tiny)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale / max(1, p.shape[-1]) ** 0.5)
    return module


def _ala_like(scale: float = 1.0, **options) -> EGNN_dynamics_AD2_cat:
    classes = torch.tensor([0, 1, 1, 1, 2, 3, 4])  # 7 atoms, shared classes as the methyl hydrogens
    return _randomise(EGNN_dynamics_AD2_cat(7, torch.nn.functional.one_hot(classes, F), HIDDEN, LAYERS, **options),
                      scale).double()


def _transferable(n_atoms: int = 6, n_max: int = 9) -> NetDynamicsWrapper:
    net = _randomise(EGNN_dynamics_transferable_MD(n_max, F, HIDDEN, LAYERS)).double()
    return NetDynamicsWrapper(net, n_atoms, n_max, torch.randn(n_atoms, F))


def _latent(dynamics: torch.nn.Module, n_batch: int, n_real: int, dtype=torch.float64) -> torch.Tensor:
    """Samples [B, 3 N] with the padding (atoms n_real...) zero, as the published scripts pad latents."""
    net = getattr(dynamics, "net_dynamics", dynamics)
    xs = torch.zeros(n_batch, 3 * net._n_particles, dtype=dtype)
    xs[:, :3 * n_real] = torch.randn(n_batch, 3 * n_real, dtype=dtype) * 1.5
    return xs


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=0, atol=tol * scale)


def _estimate(estimator, dynamics, t, xs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine path warns about nothing
        return estimator(dynamics, t, xs)


@pytest.mark.parametrize("case", ["single", "padded"])
def test_matches_bruteforce_float64(case: str) -> None:
    dynamics = _ala_like() if case == "single" else _transferable()
    n_real = 7 if case == "single" else 6
    xs, t = _latent(dynamics, 4, n_real), torch.tensor(0.37, dtype=torch.float64)
    estimator = ExactDivergenceEstimator()
    with torch.no_grad():
        dxs, minus_div = _estimate(estimator, dynamics, t, xs)
    assert estimator.uses_engine(dynamics)
    assert dxs.shape == xs.shape and minus_div.shape == (4, 1)
    v_bf, div_bf = bruteforce_divergence(dynamics, t, xs)
    _assert_close(dxs, v_bf, 1e-10)
    _assert_close(-minus_div[:, 0], div_bf, 1e-10)
    assert not dxs.requires_grad and not minus_div.requires_grad
    if case == "padded":
        assert (dxs[:, 3 * n_real:] == 0).all()
    with torch.no_grad():
        empty_dxs, empty_div = _estimate(estimator, dynamics, t, xs[:0])
    assert empty_dxs.shape == (0, xs.shape[1]) and empty_div.shape == (0, 1)


def test_empty_first_batch_decides_nothing() -> None:
    dynamics, estimator = _ala_like(), ExactDivergenceEstimator()
    with torch.no_grad():
        dxs, minus_div = _estimate(estimator, dynamics, torch.tensor(0.1), torch.zeros(0, 21, dtype=torch.float64))
    assert dxs.shape == (0, 21) and minus_div.shape == (0, 1) and not estimator.uses_engine(dynamics)
    with torch.no_grad():
        _estimate(estimator, dynamics, torch.tensor(0.1), _latent(dynamics, 2, 7))
    assert estimator.uses_engine(dynamics)


def test_float32_uses_the_kernels_within_their_tolerance(monkeypatch) -> None:
    calls = []
    original = tbg.nn.ops.egnn_divergence
    monkeypatch.setattr(tbg.nn.ops, "egnn_divergence", lambda *a, **k: calls.append(1) or original(*a, **k))
    dynamics = _ala_like(scale=0.5)  # float32 models at half scale, as tests/egnn_cases.py explains
    dynamics32 = copy.deepcopy(dynamics).float()
    xs = _latent(dynamics, 3, 7, torch.float32)
    with torch.no_grad():
        dxs, minus_div = _estimate(ExactDivergenceEstimator(), dynamics32, torch.tensor(0.8), xs)
    assert calls  # the fused divergence op ran
    v_bf, div_bf = bruteforce_divergence(dynamics, torch.tensor(0.8, dtype=torch.float64), xs.double())
    _assert_close(dxs, v_bf, 1e-5)
    _assert_close(-minus_div[:, 0], div_bf, 1e-5)


def test_shares_the_published_parameters_and_adds_no_state() -> None:
    dynamics = _ala_like()
    holder = torch.nn.Module()  # where bgflow's BlackBoxDynamics keeps its estimator
    holder.dynamics = dynamics
    holder.estimator = torch.nn.Module()
    keys = set(holder.state_dict())
    holder.estimator = estimator = ExactDivergenceEstimator()
    assert set(holder.state_dict()) == keys
    xs, t = _latent(dynamics, 2, 7), torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        estimator(dynamics, t, xs)
        dynamics.egnn.gcl_1.edge_mlp[2].weight.mul_(1.5)  # e.g. a checkpoint loaded into the flow afterwards
        _, minus_div = estimator(dynamics, t, xs)
    _assert_close(-minus_div[:, 0], bruteforce_divergence(dynamics, t, xs)[1], 1e-10)


class _Modified(EGNN_dynamics_AD2_cat):
    """Published layout, other field: the first-call check must notice."""

    def forward(self, t, xs):
        return super().forward(t, xs) + 0.1 * xs


def _custom_edges() -> EGNN_dynamics_AD2_cat:
    dynamics = _ala_like()
    dynamics.edges = [dynamics.edges[0][2:], dynamics.edges[1][2:]]  # a bond graph, not the complete graph
    return dynamics


@pytest.mark.parametrize("make, reason", [
    (_custom_edges, "complete graph"),
    (lambda: _ala_like(attention=False), "network options"),
    (lambda: _randomise(_Modified(7, torch.eye(7)[:, :F], HIDDEN, LAYERS)).double(), "differs from the dynamics"),
    (lambda: (lambda t, xs: -xs), "neither"),
])
def test_falls_back_to_bruteforce_with_a_warning(make, reason: str) -> None:
    dynamics = make()
    xs, t = torch.randn(3, 21, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    estimator = ExactDivergenceEstimator()
    with pytest.warns(UserWarning, match=reason):
        dxs, minus_div = estimator(dynamics, t, xs)
    assert not estimator.uses_engine(dynamics)
    v_bf, div_bf = bruteforce_divergence(dynamics, t, xs)
    _assert_close(dxs, v_bf, 1e-12)
    _assert_close(-minus_div[:, 0], div_bf, 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per dynamics object
        estimator(dynamics, t, xs)


@pytest.mark.parametrize("case", ["single", "padded"])
def test_gradients_as_the_adjoint_method_needs(case: str) -> None:
    """With autograd recording, (dxs, -div) are differentiable w.r.t. xs and the parameters, and their
    gradients are those of the brute force with create_graph."""
    dynamics = _ala_like() if case == "single" else _transferable()
    xs = _latent(dynamics, 3, 7 if case == "single" else 6)
    t = torch.tensor(0.6, dtype=torch.float64)
    weights = torch.randn_like(xs), torch.randn(3, 1, dtype=torch.float64)
    params = [dynamics.egnn.embedding.weight if case == "single" else dynamics.net_dynamics.egnn.embedding.weight,
              (dynamics.egnn if case == "single" else dynamics.net_dynamics.egnn).gcl_0.coord_mlp[0].bias]

    def grads(estimate) -> list[torch.Tensor]:
        x = xs.clone().requires_grad_()
        dxs, minus_div = estimate(x)
        return torch.autograd.grad((dxs * weights[0]).sum() + (minus_div * weights[1]).sum(), [x, *params])

    estimator = ExactDivergenceEstimator()
    ours = grads(lambda x: estimator(dynamics, t, x))
    assert estimator.uses_engine(dynamics)

    def bruteforce(x):
        v, div = bruteforce_divergence(dynamics, t, x)
        return v, -div[:, None]

    for a, b in zip(ours, grads(bruteforce)):
        _assert_close(a, b, 1e-9)


def test_ode_likelihood_as_in_a_published_sampling_run() -> None:
    """dlogp of a fixed-step ODE solve with bgflow's state layout (xs, logp): estimator swapped in."""
    dynamics = _transferable()

    def density_dynamics(estimator):
        def rhs(t, state):
            dxs, minus_div = estimator(dynamics, t, state[0])
            return dxs, minus_div
        return rhs

    class Bruteforce(torch.nn.Module):
        def forward(self, dyn, t, xs):
            v, div = bruteforce_divergence(dyn, t, xs)
            return v, -div[:, None]

    xs = _latent(dynamics, 2, 6)
    state = (xs, torch.zeros(2, 1, dtype=torch.float64))
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        ours = torchdiffeq.odeint(density_dynamics(ExactDivergenceEstimator()), state, ts, method="rk4",
                                  options={"step_size": 0.5})
        ref = torchdiffeq.odeint(density_dynamics(Bruteforce()), state, ts, method="rk4", options={"step_size": 0.5})
    for a, b in zip(ours, ref):
        _assert_close(a[-1], b[-1], 1e-10)
