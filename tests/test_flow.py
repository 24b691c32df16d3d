"""Unit tests of tbg.flow: prior, ODE likelihoods, reweighting, the flow-matching loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import tbg
from tbg.errors import InputError
from tbg.flow import (
    MeanFreeGaussian,
    SolverConfig,
    clip_log_weights,
    decoupled_likelihood,
    flow_matching_loss,
    integrate,
    kish_ess,
    log_importance_weights,
    log_prob_ragged,
    normalized_weights,
    pareto_k,
    prior_energy_ragged,
    sample_ragged,
    weighted_mean,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tbg.flow import EnergyTrainConfig
from tbg.nn.layout import mol_ptr_from_sizes

TIGHT = SolverConfig(atol=1e-9, rtol=1e-9)


# ---- prior ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_prior_normalised_on_mean_free_subspace(scale: float) -> None:
    # 2 atoms: the mean-free subspace of R^6 is 3-dimensional; integrate exp(log q0) over an
    # orthonormal parametrisation of it on a grid.
    prior = MeanFreeGaussian(2, scale=scale)
    basis = torch.linalg.qr(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1],
                                          [-1, 0, 0], [0, -1, 0], [0, 0, -1]], dtype=torch.float64))[0]
    g = torch.linspace(-7, 7, 121, dtype=torch.float64)
    y = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    z = y @ basis.T
    assert_close(prior.center(z), z)  # the parametrisation stays on the subspace
    total = prior.log_prob(z).exp().sum() * (g[1] - g[0]) ** 3
    assert abs(float(total) - 1.0) < 1e-6
    assert prior.subspace_dim == 3


def test_prior_samples_and_ragged_agree() -> None:
    prior = MeanFreeGaussian(5)
    z = prior.sample(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(z.reshape(-1, 5, 3).mean(1), torch.zeros(4000, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    # E|z|^2 = (N-1)*3 on the subspace
    assert abs(float(z.pow(2).sum(1).mean()) - 12.0) < 4 * math.sqrt(2 * 12 / 4000) * 1.5
    sizes = [2, 5, 3]
    ptr = mol_ptr_from_sizes(sizes)
    zr = sample_ragged(ptr, dtype=torch.float64)
    parts = torch.split(zr, sizes)
    for b, part in enumerate(parts):
        assert_close(part.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
        p = MeanFreeGaussian(sizes[b])
        assert_close(log_prob_ragged(zr, ptr)[b], p.log_prob(part.reshape(1, -1))[0])
        assert_close(prior_energy_ragged(zr, ptr)[b], p.energy(part.reshape(1, -1))[0])
    with pytest.raises(ValueError, match="at least 2 atoms"):
        MeanFreeGaussian(1)
    with pytest.raises(ValueError, match=r"\[B, 15\]"):
        prior.log_prob(torch.zeros(3, 14))


def test_scaled_prior_is_the_standard_one_stretched() -> None:
    standard, scaled = MeanFreeGaussian(5), MeanFreeGaussian(5, scale=0.8)
    z = scaled.sample(4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert abs(float(z.pow(2).sum(1).mean()) / 0.8 ** 2 - 12.0) < 4 * math.sqrt(2 * 12 / 4000) * 1.5
    # Same seed: the scaled latents are the standard ones times the scale.
    z1 = standard.sample(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close(scaled.sample(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 0.8 * z1)
    # Change of variables z = 0.8 y: log q_s(z) = log q_1(z / 0.8) - 12 log 0.8; energy = -log q up to one constant.
    assert_close(scaled.log_prob(z[:5]), standard.log_prob(z[:5] / 0.8) - 12 * math.log(0.8))
    assert_close(scaled.energy(z[:5]) - standard.energy(z[:5]), standard.log_prob(z[:5]) - scaled.log_prob(z[:5]))
    assert_close(standard.energy(z[:5]), 0.5 * z[:5].pow(2).sum(1))  # the published convention at scale 1
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="scale must be a positive number"):
            MeanFreeGaussian(5, scale=bad)


# ---- ODE -----------------------------------------------------------------------------------------
class TimeLinear:
    """v = t A x: x(1) = exp(A / 2) z and dlogp = tr(A) / 2."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t * x @ self.a.T

    def divergence(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(t, x), (t * torch.trace(self.a)).expand(x.shape[0])


@pytest.mark.parametrize("mode", ["joint", "decoupled", "rk4", "autograd"])
def test_linear_field_log_likelihood(mode: str) -> None:
    d = 5
    a = torch.randn(d, d, dtype=torch.float64) * 0.7
    field = TimeLinear(a)
    z = torch.randn(64, d, dtype=torch.float64)
    if mode == "joint":
        res = integrate(field, z, solver=TIGHT)
    elif mode == "decoupled":
        res = decoupled_likelihood(field, z, n_nodes=4, solver=TIGHT)
    elif mode == "rk4":
        res = integrate(field, z, solver=SolverConfig(method="rk4", n_steps=50))
    else:  # no divergence method: the brute-force autograd trace
        res = integrate(lambda t, x: field(t, x), z, solver=TIGHT)
    m = torch.linalg.matrix_exp(a / 2)
    assert_close(res.x, z @ m.T, atol=1e-6, rtol=1e-6)
    # log q(x) = log N(z; 0, I) - dlogp must be the density of x = M z, N(0, M M^T)
    logq = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64),
                                                  torch.eye(d, dtype=torch.float64))
    logq_x = logq.log_prob(z) - res.dlogp
    exact = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), m @ m.T).log_prob(res.x)
    assert_close(logq_x, exact, atol=1e-5, rtol=0)
    assert res.nfe_divergence > 0


def _egnn_dynamics(n_atoms: int = 4) -> tbg.nn.BoundDynamics:
    egnn = tbg.EGNN(3, hidden=8, n_layers=2).double()
    with torch.no_grad():  # non-trivial coordinate heads (the published init makes them ~1e-3)
        for layer in egnn.layers:
            layer.coord_mlp[2].weight.normal_(0, 0.3)
    return tbg.nn.BoundDynamics(egnn, torch.randn(n_atoms, 3, dtype=torch.float64))


def test_forward_then_reverse_returns_latent_and_negated_logdet() -> None:
    dyn = _egnn_dynamics()
    z = MeanFreeGaussian(4).sample(6, dtype=torch.float64)
    fwd = integrate(dyn, z, solver=TIGHT)
    back = integrate(dyn, fwd.x, t0=1.0, t1=0.0, solver=TIGHT)
    assert fwd.dlogp.abs().min() > 1e-3  # a non-trivial flow
    assert_close(back.x, z, atol=1e-6, rtol=0)
    assert_close(back.dlogp, -fwd.dlogp, atol=1e-6, rtol=0)


def test_decoupled_matches_joint_on_egnn() -> None:
    dyn = _egnn_dynamics()
    z = MeanFreeGaussian(4).sample(6, dtype=torch.float64)
    joint = integrate(dyn, z, solver=TIGHT)
    dec = decoupled_likelihood(dyn, z, n_nodes=12, solver=TIGHT)
    assert_close(dec.x, joint.x, atol=1e-7, rtol=0)
    assert_close(dec.dlogp, joint.dlogp, atol=1e-6, rtol=0)
    assert dec.nfe_divergence == 12 and joint.nfe_velocity == 0 and dec.nfe_velocity > 0
    few = decoupled_likelihood(dyn, z, n_nodes=1, solver=TIGHT)  # a 1-point rule is visibly worse
    assert (few.dlogp - joint.dlogp).abs().max() > (dec.dlogp - joint.dlogp).abs().max()


def test_sampling_without_likelihood_is_cheaper() -> None:
    field = TimeLinear(torch.randn(4, 4, dtype=torch.float64))
    z = torch.randn(8, 4, dtype=torch.float64)
    plain = integrate(field, z, likelihood=False, solver=TIGHT)
    joint = integrate(field, z, solver=TIGHT)
    assert plain.dlogp is None and plain.nfe_divergence == 0 and plain.nfe_velocity > 0
    assert_close(plain.x, joint.x, atol=1e-7, rtol=0)



def test_likelihood_error_against_a_known_divergence() -> None:
    """The sampler's dlogp is compared with a tight joint solve: on a linear field, whose dlogp is exact
    (tr(A) / 2), the reported errors are the offsets put into dlogp."""
    from tbg.flow.sample import likelihood_error

    a = torch.randn(5, 5, dtype=torch.float64) * 0.7
    field, z = TimeLinear(a), torch.randn(11, 5, dtype=torch.float64)
    offsets = torch.linspace(-0.3, 0.3, 11, dtype=torch.float64)
    err = likelihood_error(field, z, torch.trace(a) / 2 + offsets, batch_size=4, progress=False)
    assert err["n"] == 11 and err["tol"] == 1e-6
    assert err["mean"] == pytest.approx(offsets.abs().mean().item(), abs=1e-5)
    assert err["max"] == pytest.approx(0.3, abs=1e-5)
    assert err["stderr"] == pytest.approx(offsets.abs().std().item() / math.sqrt(11), rel=1e-3)
    one = likelihood_error(field, z[:1], (torch.trace(a) / 2).reshape(1), progress=False)
    assert one["mean"] < 1e-5 and one["stderr"] is None
    for latents, dlogp in ((z, torch.zeros(3)), (z[:0], torch.zeros(0)), (z[0], torch.zeros(1))):
        with pytest.raises(ValueError, match="need latents"):
            likelihood_error(field, latents, dlogp, progress=False)

def test_solver_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown ODE method"):
        SolverConfig(method="rk45")
    with pytest.raises(ValueError, match="NaN"):
        integrate(TimeLinear(torch.eye(2)), torch.tensor([[math.nan, 0.0]]))


# ---- reweighting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [0.3, 0.5, 0.8])
def test_pareto_k_recovers_the_tail_shape(shape: float) -> None:
    # w = U^-shape is Pareto-tailed: its excess over a high threshold is generalised Pareto with this shape.
    g = torch.Generator().manual_seed(4)
    fits = [pareto_k(-shape * torch.log(torch.rand(20000, generator=g, dtype=torch.float64))) for _ in range(10)]
    assert abs(sum(fits) / len(fits) - shape) < 0.06  # the spread of one fit is ~0.07 here


def test_pareto_k_light_bounded_and_degenerate_tails() -> None:
    g = torch.Generator().manual_seed(5)
    assert pareto_k(torch.log(torch.rand(20000, generator=g, dtype=torch.float64))) < -0.5  # uniform: k = -1
    light = 0.1 * torch.randn(4000, generator=g, dtype=torch.float64)
    assert abs(pareto_k(light)) < 0.15
    heavy = 9 * torch.randn(2000, generator=g, dtype=torch.float64)  # log-weights as spread as a poor flow's
    assert pareto_k(heavy) > 1.0
    # A constant shift of every log-weight, zero weights (-inf) and the order of the samples change nothing.
    shuffled = torch.cat([heavy.flip(0) + 123.0, torch.full((50,), -math.inf, dtype=torch.float64)])
    assert pareto_k(shuffled) == pytest.approx(pareto_k(heavy), abs=1e-12)
    assert pareto_k(torch.zeros(24)) is None  # fewer than 5 tail weights
    assert pareto_k(torch.zeros(100)) is None  # a tail of equal weights
    with pytest.raises(ValueError, match="NaN"):
        pareto_k(torch.tensor([0.0, math.nan]))


def test_kish_ess_known_answers() -> None:
    assert kish_ess(torch.zeros(10)) == pytest.approx(1.0)
    assert kish_ess(torch.tensor([3.0, -math.inf, -math.inf, -math.inf])) == pytest.approx(0.25)
    # weights 1 (n1 times) and c (n2 times): (n1 + c n2)^2 / (n (n1 + c^2 n2))
    n1, n2, c = 30, 10, 5.0
    offset = 1e4  # must stay stable
    lw = torch.cat([torch.zeros(n1, dtype=torch.float64), torch.full((n2,), math.log(c), dtype=torch.float64)]) + offset
    assert kish_ess(lw) == pytest.approx((n1 + c * n2) ** 2 / ((n1 + n2) * (n1 + c * c * n2)), rel=1e-12)
    assert_close(normalized_weights(lw).sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="no sample"):
        kish_ess(torch.full((3,), -math.inf))


def test_log_importance_weights_and_clipping() -> None:
    u = torch.tensor([1.0, math.inf, math.nan, 2.0])
    lw = log_importance_weights(u, torch.tensor([0.5, 0.5, 0.5, 1.0]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert_close(lw, torch.tensor([-0.4, -math.inf, -math.inf, -0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape mismatch"):
        log_importance_weights(u, torch.zeros(3), torch.zeros(4))
    clipped = clip_log_weights(torch.tensor([0.0, 1.0, 2.0, 100.0, -math.inf]), quantile=0.5)
    assert_close(clipped, torch.tensor([0.0, 1.0, 1.5, 1.5, -math.inf], dtype=torch.float64))


def test_reweighting_recovers_known_expectation() -> None:
    # samples from q = N(0, 1), target p = N(1, 0.8^2) known up to a constant: E_p[x] = 1, E_p[x^2] = 1.64
    gen = torch.Generator().manual_seed(3)
    estimates, errors = [], []
    for _ in range(40):
        x = torch.randn(4000, generator=gen, dtype=torch.float64)
        u = 0.5 * ((x - 1) / 0.8) ** 2
        lw = log_importance_weights(u, 0.5 * x**2, torch.zeros_like(x))  # log p - log q + const
        mu, se = weighted_mean(torch.stack([x, x**2], 1), lw)
        estimates.append(mu)
        errors.append(se)
    est, err = torch.stack(estimates), torch.stack(errors)
    assert_close(est.mean(0), torch.tensor([1.0, 1.64], dtype=torch.float64), atol=0.02, rtol=0)
    # the delta-method error bar matches the spread of the estimator over independent replicates
    ratio = err.mean(0) / est.std(0)
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio
    mu, se = weighted_mean(x, lw)  # scalar form returns floats
    assert isinstance(mu, float) and isinstance(se, float)


# ---- flow-matching loss --------------------------------------------------------------------------
def test_flow_matching_loss_per_molecule_normalisation() -> None:
    egnn = tbg.EGNN(2, hidden=8, n_layers=2).double()
    sizes = [3, 6]
    ptr = mol_ptr_from_sizes(sizes)
    x = torch.randn(9, 3, dtype=torch.float64)
    feats = torch.randn(9, 2, dtype=torch.float64)

    class Batch:
        pass

    batch = Batch()
    batch.x, batch.features, batch.mol_ptr = x, feats, ptr
    loss = flow_matching_loss(egnn, batch, sigma=0.01, generator=torch.Generator().manual_seed(5))
    # recompute with the same draws, molecule by molecule in the fixed layout
    g = torch.Generator().manual_seed(5)
    x0 = sample_ragged(ptr, generator=g, dtype=torch.float64)
    noise = sample_ragged(ptr, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    for b, (lo, hi) in enumerate(zip(ptr[:-1], ptr[1:])):
        x1 = x[lo:hi] - x[lo:hi].mean(0)
        xt = (1 - t[b]) * x0[lo:hi] + t[b] * x1 + 0.01 * noise[lo:hi]
        v = egnn(t[b:b + 1], xt[None], feats[lo:hi])[0]
        expected = (v - (x1 - x0[lo:hi])).pow(2).sum() / (3 * sizes[b])
        assert_close(loss[b], expected)


# ---- training by energy ----------------------------------------------------------------------------
def test_train_by_energy_reverse_kl_and_importance_resume(tmp_path) -> None:
    from tbg.flow import EnergyTrainConfig, train_by_energy

    torch.manual_seed(0)
    egnn = tbg.EGNN(1, hidden=8, n_layers=2)
    feats = torch.ones(3, 1)

    def wide_gaussian(x: torch.Tensor) -> torch.Tensor:  # target: the prior scaled by 3
        return 0.5 * MeanFreeGaussian(3).center(x).pow(2).sum(1) / 9

    solver = SolverConfig(method="euler", n_steps=1)  # cheapest differentiable flow: x = z + v(0, z)
    cfg = EnergyTrainConfig(n_steps=16, batch_size=32, lr=3e-3, divergence="exact", solver=solver, checkpoint_every=8,
                            progress=False)
    rows = train_by_energy(egnn, feats, wide_gaussian, tmp_path / "rkl", cfg)
    losses = [r["loss"] for r in rows]
    # the untrained flow is ~identity, KL(q0 || wide) per dof = (1/9 - 1 + ln 9) / 2; training lowers it
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    assert (tmp_path / "rkl" / "model.pt").exists()

    cfg = EnergyTrainConfig(objective="importance", n_steps=2, batch_size=16, solver=solver,
                            sample_solver=SolverConfig(method="rk4", n_steps=1), checkpoint_every=1, progress=False)
    first = train_by_energy(tbg.EGNN(1, hidden=8, n_layers=2), feats, wide_gaussian, tmp_path / "iw", cfg)
    assert len(first) == 2 and all(0 < r["ess"] <= 1 for r in first)
    cfg.n_steps = 3  # a second call continues from step 2
    more = train_by_energy(tbg.EGNN(1, hidden=8, n_layers=2), feats, wide_gaussian, tmp_path / "iw", cfg)
    assert [r["step"] for r in more] == [3]
    with pytest.raises(InputError, match="not an energy-training checkpoint"):
        torch.save(torch.load(tmp_path / "iw" / "model.pt", weights_only=True),
                   tmp_path / "iw" / "checkpoints" / "step_99999999.pt")
        train_by_energy(egnn, feats, wide_gaussian, tmp_path / "iw", cfg)


def test_train_by_energy_micro_batches_give_the_whole_batch_step(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A step in micro-batches is the step of the whole batch: reverse KL against a hand-written step on the
    same latents (drawn part by part), the importance objective against the same run without micro-batches.
    Plain SGD stands in for Adam, whose first step (+-lr per weight) would hide the gradient."""
    import copy

    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))

    from tbg.flow import EnergyTrainConfig, train_by_energy

    torch.manual_seed(0)
    start = tbg.EGNN(1, hidden=8, n_layers=2)
    with torch.no_grad():  # a field far from zero, so that the step is not trivial
        for layer in start.layers:
            layer.coord_mlp[2].weight.normal_(0, 0.3)
    feats, prior = torch.ones(3, 1), MeanFreeGaussian(3)

    def wide_gaussian(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * prior.center(x).pow(2).sum(1) / 9

    solver = SolverConfig(method="rk4", n_steps=2, panels=(0.3,))
    cfg = EnergyTrainConfig(n_steps=1, batch_size=6, micro_batch_size=2, lr=1e-2, grad_clip=0.5, divergence="exact",
                            solver=solver, progress=False)
    model = copy.deepcopy(start)
    (row,) = train_by_energy(model, feats, wide_gaussian, tmp_path / "micro", cfg)

    ref = copy.deepcopy(start)
    gen = torch.Generator().manual_seed(cfg.seed)
    z = torch.cat([prior.sample(2, generator=gen) for _ in range(3)])
    res = integrate(tbg.nn.BoundDynamics(ref, feats, divergence_options={"method": "exact"}), z, solver=solver,
                    differentiable=True)
    loss = (wide_gaussian(res.x) - res.dlogp).mean()
    optimizer = torch.optim.SGD(ref.parameters(), lr=cfg.lr)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
    optimizer.step()
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    moved = [not torch.equal(a, b) for a, b in zip(start.parameters(), ref.parameters())]
    assert any(moved)
    for got, want in zip(model.parameters(), ref.parameters()):
        assert_close(got, want, atol=1e-6, rtol=1e-5)

    steps = {}
    for micro in (None, 3):
        iw = EnergyTrainConfig(objective="importance", n_steps=1, batch_size=6, micro_batch_size=micro, lr=1e-2,
                               divergence="exact", solver=solver, sample_solver=SolverConfig(method="rk4", n_steps=2),
                               progress=False)
        steps[micro] = copy.deepcopy(start)
        train_by_energy(steps[micro], feats, wide_gaussian, tmp_path / f"iw{micro}", iw)
    for got, want in zip(steps[3].parameters(), steps[None].parameters()):
        assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="micro_batch_size must divide"):
        EnergyTrainConfig(batch_size=6, micro_batch_size=4)


def _frames_problem() -> tuple[tbg.EGNN, torch.Tensor, MeanFreeGaussian, torch.Tensor]:
    """A small EGNN for 3 atoms and 37 mean-free frames drawn from the prior x 3: the untrained flow (~identity,
    its density the prior) is 3 x too narrow for them."""
    torch.manual_seed(0)
    prior = MeanFreeGaussian(3)
    data = prior.center(3 * torch.randn(37, 9, generator=torch.Generator().manual_seed(1)))
    return tbg.EGNN(1, hidden=8, n_layers=2), torch.ones(3, 1), prior, data


def _hand_written_frames_step(model: tbg.EGNN, feats: torch.Tensor, prior: MeanFreeGaussian, data: torch.Tensor,
                              cfg: EnergyTrainConfig,
                              frame_weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of an objective on frames, written out: the frames train_by_energy draws for cfg, log q by the
    differentiated exact back solve, loss -sum(w * log q) with w = frame_weights(x, log q without gradient),
    then clipping and plain SGD (standing in for Adam). Returns the loss, the frames and their weights."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)]
    back = integrate(tbg.nn.BoundDynamics(model, feats, divergence_options={"method": "exact"}), x, t0=1.0, t1=0.0,
                     solver=cfg.solver, differentiable=True)
    log_q = prior.log_prob(back.x) + back.dlogp
    weights = frame_weights(x, log_q.detach())
    loss = -(weights * log_q).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    torch.optim.SGD(model.parameters(), lr=cfg.lr).step()
    return loss.detach(), x, weights


def test_train_by_energy_max_likelihood_of_data(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The max_likelihood objective: a step is -mean log q of frames drawn uniformly from the data (checked
    against a hand-written step, plain SGD standing in for Adam), micro-batches give the same step, training
    raises the likelihood of the data, and the data are required by it and refused by the others."""
    import copy

    from tbg.flow import EnergyTrainConfig, train_by_energy

    start, feats, prior, data = _frames_problem()

    def no_energy(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("max_likelihood must not evaluate the energy")

    solver = SolverConfig(method="rk4", n_steps=2, panels=(0.3,))
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))
        steps = {}
        for micro in (None, 2):
            cfg = EnergyTrainConfig(objective="max_likelihood", n_steps=1, batch_size=6, micro_batch_size=micro,
                                    lr=1e-2, divergence="exact", solver=solver, progress=False)
            steps[micro] = copy.deepcopy(start)
            (row,) = train_by_energy(steps[micro], feats, no_energy, tmp_path / f"ml{micro}", cfg, data=data)
            assert math.isnan(row["mean_energy"]) and math.isnan(row["ess"])
        ref = copy.deepcopy(start)
        loss, _, _ = _hand_written_frames_step(ref, feats, prior, data, cfg,
                                               lambda x, log_q: torch.full_like(log_q, 1 / len(log_q)))
        assert row["loss"] == pytest.approx(float(loss), rel=1e-5)
        for micro in (None, 2):
            for got, want in zip(steps[micro].parameters(), ref.parameters()):
                assert_close(got, want, atol=1e-6, rtol=1e-5)

    # The untrained flow is ~identity: its density is the prior, 3 x too narrow for the data; training widens it.
    cfg = EnergyTrainConfig(objective="max_likelihood", n_steps=16, batch_size=32, lr=3e-3, divergence="exact",
                            solver=SolverConfig(method="euler", n_steps=1), progress=False)
    losses = [r["loss"] for r in train_by_energy(copy.deepcopy(start), feats, no_energy, tmp_path / "fit", cfg,
                                                 data=data)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    with pytest.raises(ValueError, match="needs data"):
        train_by_energy(copy.deepcopy(start), feats, no_energy, tmp_path / "none", cfg)
    with pytest.raises(ValueError, match="the reverse_kl objective takes no data"):
        train_by_energy(copy.deepcopy(start), feats, no_energy, tmp_path / "none",
                        EnergyTrainConfig(n_steps=1, progress=False), data=data)
    with pytest.raises(ValueError, match=r"data must be \[M >= 1, 9\]"):
        train_by_energy(copy.deepcopy(start), feats, no_energy, tmp_path / "none", cfg, data=data[:, :6])
    assert not (tmp_path / "none").exists()


def test_train_by_energy_scores_held_out_frames(tmp_path) -> None:  # noqa: ANN001
    """validation_log.csv holds, at the start and at every checkpoint, the held-out frames' mean -log q by an
    exact back solve of the weights of that step (checked by hand); scoring them changes no step of the
    training, a resumed run continues the log, and frames of another molecule are refused."""
    import copy
    import csv

    from tbg.flow import EnergyTrainConfig, train_by_energy

    start, feats, prior, data = _frames_problem()
    train, held_out = data[:30], data[30:]
    cfg = EnergyTrainConfig(objective="max_likelihood", n_steps=3, batch_size=4, micro_batch_size=2, lr=3e-3,
                            solver=SolverConfig(method="rk4", n_steps=2), checkpoint_every=2, progress=False)
    plain, scored = copy.deepcopy(start), copy.deepcopy(start)
    rows = train_by_energy(plain, feats, None, tmp_path / "plain", cfg, data=train)
    assert train_by_energy(scored, feats, None, tmp_path / "scored", cfg, data=train, validation=held_out) == rows
    for got, want in zip(scored.parameters(), plain.parameters()):
        assert torch.equal(got, want)
    assert not (tmp_path / "plain" / "validation_log.csv").exists()

    def by_hand(model: tbg.EGNN) -> list[float]:
        back = integrate(tbg.nn.BoundDynamics(model, feats, divergence_options={"method": "exact"}), held_out,
                         t0=1.0, t1=0.0, solver=cfg.solver)
        nll = -(prior.log_prob(back.x) + back.dlogp)
        return [float(nll.mean()), float(nll.std() / math.sqrt(len(nll)))]

    def log_rows(folder: Path) -> list[dict[str, str]]:
        with (folder / "validation_log.csv").open() as fh:
            return list(csv.DictReader(fh))

    logged = log_rows(tmp_path / "scored")
    assert [(int(r["step"]), int(r["frames"])) for r in logged] == [(0, 7), (2, 7), (3, 7)]
    assert [float(logged[0]["nll"]), float(logged[0]["nll_stderr"])] == pytest.approx(by_hand(start), rel=1e-5)
    assert [float(logged[-1]["nll"]), float(logged[-1]["nll_stderr"])] == pytest.approx(by_hand(scored), rel=1e-5)

    resumed = copy.deepcopy(start)
    more = replace(cfg, n_steps=4)
    train_by_energy(resumed, feats, None, tmp_path / "scored", more, data=train, validation=held_out)
    assert [int(r["step"]) for r in log_rows(tmp_path / "scored")] == [0, 2, 3, 4]
    with pytest.raises(ValueError, match=r"validation must be \[M >= 1, 9\]"):
        train_by_energy(copy.deepcopy(start), feats, None, tmp_path / "none", cfg, data=train,
                        validation=held_out[:, :6])


def test_train_by_energy_renyi_weights_the_frames_the_flow_covers_worst(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The renyi objective: a step is maximum likelihood of frames drawn uniformly from the data, each weighted
    by (p/q)^(alpha - 1) from the energy and an undifferentiated exact back solve, self-normalised over the
    batch (checked against a hand-written step, plain SGD standing in for Adam); micro-batches give the same
    step; training makes the frames' weights more even; the order must exceed 1."""
    import copy

    from tbg.flow import EnergyTrainConfig, train_by_energy

    start, feats, prior, data = _frames_problem()

    def wide_gaussian(x: torch.Tensor) -> torch.Tensor:  # the density the data were drawn from
        return 0.5 * prior.center(x).pow(2).sum(1) / 9

    solver = SolverConfig(method="rk4", n_steps=2, panels=(0.3,))
    order = 1.7
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))
        steps = {}
        for micro in (None, 2):
            cfg = EnergyTrainConfig(objective="renyi", renyi_order=order, n_steps=1, batch_size=6,
                                    micro_batch_size=micro, lr=1e-2, divergence="exact", solver=solver, progress=False)
            steps[micro] = copy.deepcopy(start)
            (row,) = train_by_energy(steps[micro], feats, wide_gaussian, tmp_path / f"r{micro}", cfg, data=data)
        ref = copy.deepcopy(start)
        loss, x, weights = _hand_written_frames_step(
            ref, feats, prior, data, cfg, lambda x, log_q: torch.softmax((order - 1) * (-wide_gaussian(x) - log_q), 0))
        assert weights.max() > 2 / 6  # the step is not plain maximum likelihood
        assert row["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert row["mean_energy"] == pytest.approx(float(wide_gaussian(x).mean()), rel=1e-6)
        assert row["ess"] == pytest.approx(float(weights.sum() ** 2 / (6 * weights.pow(2).sum())), rel=1e-5)
        for micro in (None, 2):
            for got, want in zip(steps[micro].parameters(), ref.parameters()):
                assert_close(got, want, atol=1e-6, rtol=1e-5)

    # The untrained flow is ~identity, 3 x too narrow: the frames far out carry the weight until it widens.
    cfg = EnergyTrainConfig(objective="renyi", n_steps=16, batch_size=32, lr=3e-3, divergence="exact",
                            solver=SolverConfig(method="euler", n_steps=1), progress=False)
    ess = [r["ess"] for r in train_by_energy(copy.deepcopy(start), feats, wide_gaussian, tmp_path / "fit", cfg,
                                             data=data)]
    assert np.mean(ess[-4:]) > np.mean(ess[:4]) + 0.1, ess
    with pytest.raises(ValueError, match="the renyi objective needs data"):
        train_by_energy(copy.deepcopy(start), feats, wide_gaussian, tmp_path / "none", cfg)
    for bad in (1.0, 0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="renyi_order must be a number above 1"):
            EnergyTrainConfig(objective="renyi", renyi_order=bad)


def test_batch_budget_and_checkpoint_guard(tmp_path) -> None:
    from tbg.flow import SampleConfig, TrainConfig, batch_size_for_budget, train

    # The memory model behind it is tested against measured runs in tests/test_profile.py.
    dyn = tbg.nn.BoundDynamics(tbg.EGNN(51, 128, 2), torch.eye(51))
    assert batch_size_for_budget(1.0, dyn, 51, SampleConfig()) == 1  # never zero
    assert batch_size_for_budget(2**30, lambda t, x: x, 51, SampleConfig()) is None  # no model without an EGNN
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000010.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="resume=True"):
        train(tbg.EGNN(1, 8, 1), [], tmp_path, TrainConfig(resume=False))


def test_autograd_divergence_any_width_and_differentiable() -> None:
    """The brute-force adapter on D = 5 (not whole atoms): the trace of v = tanh(x A^T) and its gradient."""
    from tbg.flow import AutogradDivergence

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, dtype=torch.float64, generator=g)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    dyn = AutogradDivergence(lambda t, y: torch.tanh(t * y @ a.T))
    t = torch.tensor(0.7, dtype=torch.float64)

    def exact(y: torch.Tensor) -> torch.Tensor:  # sum_i (1 - tanh^2(t a_i.y)) t A_ii
        return ((1 - torch.tanh(t * y @ a.T) ** 2) * t * torch.diagonal(a)).sum(1)

    v, div = dyn.divergence(t, x)
    assert v.shape == x.shape and div.shape == (4,)
    assert_close(v, torch.tanh(t * x @ a.T))
    assert_close(div, exact(x))
    (grad,) = torch.autograd.grad(div.sum(), x)  # create_graph under grad mode: differentiable
    (expected,) = torch.autograd.grad(exact(x).sum(), x)
    assert_close(grad, expected)
    with torch.no_grad():
        v0, div0 = dyn.divergence(t, x)
    assert not div0.requires_grad and not v0.requires_grad
    assert_close(div0, exact(x).detach())


def test_quadrature_rule_panels() -> None:
    from tbg.flow.ode import gauss_legendre, quadrature_rule
    nodes, weights = quadrature_rule(12, 0.0, 1.0, (0.1, 0.3))  # 4 nodes per panel: exact to degree 7
    assert len(nodes) == 12 and ((nodes > 0) & (nodes < 1)).all()
    assert [int(((nodes > a) & (nodes < b)).sum()) for a, b in ((0, .1), (.1, .3), (.3, 1))] == [4, 4, 4]
    for k in range(8):
        assert weights @ nodes**k == pytest.approx(1 / (k + 1), abs=1e-14)
    # A kink at a panel boundary is integrated exactly; one rule over [0, 1] is not.
    kink = lambda t: np.abs(t - 0.1)  # noqa: E731
    exact = (0.1**2 + 0.9**2) / 2
    assert weights @ kink(nodes) == pytest.approx(exact, abs=1e-14)
    n1, w1 = quadrature_rule(12, 0.0, 1.0)
    assert_close(torch.from_numpy(n1), torch.from_numpy(gauss_legendre(12, 0.0, 1.0)[0]))
    assert abs(w1 @ kink(n1) - exact) > 1e-4
    # Reversed: the same nodes, negated weights. Extra nodes go to the panels nearest t = 0.
    n_rev, w_rev = quadrature_rule(12, 1.0, 0.0, (0.1, 0.3))
    assert_close(torch.from_numpy(n_rev), torch.from_numpy(nodes))
    assert_close(torch.from_numpy(w_rev), torch.from_numpy(-weights))
    n4, _ = quadrature_rule(4, 0.0, 1.0, (0.1, 0.3))
    assert [int(((n4 > a) & (n4 < b)).sum()) for a, b in ((0, .1), (.1, .3), (.3, 1))] == [2, 1, 1]
    # Only boundaries inside the interval split it; fewer nodes than panels: one panel.
    for args in ((6, 0.5, 1.0), (2, 0.0, 1.0)):
        n, w = quadrature_rule(*args, (0.1, 0.3))
        n_ref, w_ref = gauss_legendre(*args)
        assert_close(torch.from_numpy(n), torch.from_numpy(n_ref))
        assert_close(torch.from_numpy(w), torch.from_numpy(w_ref))
    with pytest.raises(ValueError, match="at least one"):
        quadrature_rule(0, 0.0, 1.0)


def test_decoupled_with_panels_matches_joint_on_egnn() -> None:
    dyn = _egnn_dynamics()
    z = MeanFreeGaussian(4).sample(6, dtype=torch.float64)
    joint = integrate(dyn, z, solver=TIGHT)
    dec = decoupled_likelihood(dyn, z, n_nodes=24, solver=TIGHT, panels=(0.1, 0.3))
    assert_close(dec.dlogp, joint.dlogp, atol=1e-6, rtol=0)
    assert dec.nfe_divergence == 24


def test_fixed_step_grid_on_panels() -> None:
    from tbg.flow.ode import step_grid
    grid = step_grid(12, 0.0, 1.0, (0.1, 0.3))  # 4 equal steps per panel
    assert_close(torch.from_numpy(grid), torch.from_numpy(np.concatenate(
        [np.linspace(0, .1, 5)[:-1], np.linspace(.1, .3, 5)[:-1], np.linspace(.3, 1, 5)])))
    assert_close(torch.from_numpy(step_grid(12, 1.0, 0.0, (0.1, 0.3))), torch.from_numpy(grid[::-1].copy()))
    assert np.diff(step_grid(5, 0.0, 1.0, (0.1, 0.3))).tolist() == pytest.approx([.05, .05, .1, .1, .7])
    assert_close(torch.from_numpy(step_grid(2, 0.0, 1.0, (0.1, 0.3))),
                 torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert_close(torch.from_numpy(step_grid(3, 0.0, 1.0)), torch.linspace(0, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one step"):
        step_grid(0, 0.0, 1.0)


def test_fixed_step_solve_takes_the_steps_of_its_panels() -> None:
    """rk4 and Euler step on the panels' grid (their evaluations; a hand-written Euler solve), forwards and back."""
    from tbg.flow.ode import step_grid
    a = torch.randn(4, 4, dtype=torch.float64) * 0.7
    field = TimeLinear(a)
    z = torch.randn(8, 4, dtype=torch.float64)

    def euler(x: torch.Tensor, grid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        l, grid = torch.zeros(len(x), dtype=torch.float64), torch.from_numpy(grid)
        for t, h in zip(grid[:-1], grid.diff()):
            v, div = field.divergence(t, x)
            x, l = x + h * v, l + h * div
        return x, l

    for t0, t1 in ((0.0, 1.0), (1.0, 0.0)):
        res = integrate(field, z, t0=t0, t1=t1, solver=SolverConfig(method="euler", n_steps=6, panels=(0.1, 0.3)))
        x, l = euler(z, step_grid(6, t0, t1, (0.1, 0.3)))
        assert res.nfe_divergence == 6
        assert_close(res.x, x, atol=1e-12, rtol=0)
        assert_close(res.dlogp, l, atol=1e-12, rtol=0)
    rk4 = integrate(field, z, solver=SolverConfig(method="rk4", n_steps=6, panels=(0.1, 0.3)))
    assert rk4.nfe_divergence == 24
    # dx/dt = t A x changes fastest near t = 1, so steps crowded near t = 0 solve it worse than equal ones
    exact = z @ torch.linalg.matrix_exp(a / 2).T
    equal = integrate(field, z, solver=SolverConfig(method="rk4", n_steps=6))
    assert (rk4.x - exact).norm() > (equal.x - exact).norm()


def test_solver_panels_are_checked_and_recorded_only_when_given() -> None:
    assert "panels" not in SolverConfig(method="rk4").record()
    assert SolverConfig(method="rk4", panels=[0.1, 0.3]).record()["panels"] == (0.1, 0.3)
    with pytest.raises(ValueError, match="fixed-step"):
        SolverConfig(method="dopri5", panels=(0.1,))
    for bad in ((0.3, 0.1), (0.0, 0.5), (1.0,), (0.2, 0.2)):
        with pytest.raises(ValueError, match="panels must be increasing"):
            SolverConfig(method="rk4", panels=bad)


def test_sampling_record_names_quadrature_panels_only_when_given() -> None:
    from tbg.flow import SampleConfig
    from tbg.flow.sample import sampling_manifest
    field = TimeLinear(torch.eye(2, dtype=torch.float64))
    one_rule = sampling_manifest(field, 1, SampleConfig(n_samples=4, batch_size=4, likelihood="decoupled"))
    panels = sampling_manifest(field, 1, SampleConfig(n_samples=4, batch_size=4, likelihood="decoupled",
                                                      quadrature_panels=[0.1, 0.3]))
    assert "quadrature_panels" not in one_rule and panels["quadrature_panels"] == (0.1, 0.3)
    for bad in ((0.3, 0.1), (0.0, 0.5), (0.5, 1.0), (0.2, 0.2)):
        with pytest.raises(ValueError, match="quadrature_panels"):
            SampleConfig(quadrature_panels=bad)


def test_sampling_with_a_scaled_prior_keeps_the_density_exact(tmp_path) -> None:  # noqa: ANN001
    from tbg.flow import SampleConfig, sample
    from tbg.flow.refine import FlowDensity
    from tbg.flow.sample import sampling_manifest
    dyn = _egnn_dynamics()
    cfg = SampleConfig(n_samples=5, batch_size=3, likelihood="joint", solver=TIGHT, dtype="float64", progress=False)
    plain = np.load(sample(dyn, 4, tmp_path / "plain", cfg))
    scaled_cfg = replace(cfg, prior_scale=0.6)
    scaled = np.load(sample(dyn, 4, tmp_path / "scaled", scaled_cfg))
    assert_close(torch.from_numpy(scaled["latents"]), 0.6 * torch.from_numpy(plain["latents"]))
    prior = MeanFreeGaussian(4, scale=0.6)
    assert_close(torch.from_numpy(scaled["prior_energy"]), prior.energy(torch.from_numpy(scaled["latents"])))
    # log q of the samples from what the sampler stored = the flow's density there, integrated back.
    density = FlowDensity(dyn, prior, solver=TIGHT)
    stored = density.log_prob_from_sampling(torch.from_numpy(scaled["prior_energy"]), torch.from_numpy(scaled["dlogp"]))
    assert_close(stored, density.log_prob(torch.from_numpy(scaled["samples"])), atol=1e-6, rtol=0)
    # The run record names the scale only when it is not 1 (so runs made before the option still resume).
    assert "prior_scale" not in sampling_manifest(dyn, 4, cfg)
    assert sampling_manifest(dyn, 4, scaled_cfg)["prior_scale"] == 0.6
    for bad in (0.0, -0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="prior_scale"):
            SampleConfig(prior_scale=bad)
