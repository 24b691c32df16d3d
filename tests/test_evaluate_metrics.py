"""Metrics of tbg.evaluate on synthetic samples with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from tbg.chem import ALANINE_DIPEPTIDE_DIR, load_trajectory
from tbg.evaluate import (RAMACHANDRAN_BASINS, BasinDefinition, backbone_torsions, basin_free_energy_difference,
                          circular_wasserstein, free_energy_profile, in_arc, state_free_energy_difference,
                          wasserstein_1d)
from tbg.evaluate.metrics import (TICA, block_length, energy_w2, fit_tica, free_energy_profile_stderr, point_set_w2,
                                   ramachandran_jsd, tica_features, tica_w2, torus_w2)
from tbg.flow.reweight import kish_ess


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def two_state_angles(rng: np.random.Generator, n: int, p_basin: float) -> np.ndarray:
    """Angles with probability p_basin uniformly inside (0.2, 1.8) and otherwise inside (-3, -0.2)."""
    inside = rng.random(n) < p_basin
    return np.where(inside, rng.uniform(0.2, 1.8, n), rng.uniform(-3.0, -0.2, n))


def test_ess_of_equal_weights_is_one(rng):
    assert kish_ess(np.full(1000, -3.7)) == pytest.approx(1.0, abs=1e-12)
    # One dominant weight: ESS -> 1/n.
    lw = np.full(1000, -50.0)
    lw[3] = 0.0
    assert kish_ess(lw) == pytest.approx(1e-3, rel=1e-6)


def test_delta_f_of_two_state_mixture(rng):
    p, n = 0.2, 20_000
    value, se = basin_free_energy_difference(two_state_angles(rng, n, p), n_bootstrap=300)
    exact = -math.log(p / (1 - p))
    se_binomial = math.sqrt(1.0 / (n * p * (1 - p)))  # delta method for -logit of a binomial fraction
    assert se == pytest.approx(se_binomial, rel=0.25)
    assert abs(value - exact) < 4 * se_binomial


def test_reweighted_delta_f_recovers_target(rng):
    # Samples from q (50/50); weights p/q turn them into the 20/80 target.
    n, p = 40_000, 0.2
    a = two_state_angles(rng, n, 0.5)
    inside = a > 0
    log_w = np.where(inside, math.log(p / 0.5), math.log((1 - p) / 0.5))
    value, se = basin_free_energy_difference(a, log_w, n_bootstrap=200)
    unweighted, _ = basin_free_energy_difference(a, n_bootstrap=50)
    assert abs(value - math.log((1 - p) / p)) < 4 * se
    assert abs(unweighted) < 0.1  # without weights it sees the 50/50 proposal


def test_delta_f_empty_state_is_infinite(rng):
    value, se = basin_free_energy_difference(rng.uniform(-3, -0.5, 100))
    assert value == math.inf and math.isnan(se)


def test_free_energy_profile_of_von_mises(rng):
    kappa, mu, n = 2.0, 1.0, 400_000
    a = rng.vonmises(mu, kappa, n)
    centres, f = free_energy_profile(a, bins=36)
    exact = -kappa * np.cos(centres - mu)
    exact -= exact.min()
    # Bin-averaging shifts a value by O(h^2 kappa); compare up to the arbitrary constant.
    offset = np.mean(f - exact)
    np.testing.assert_allclose(f - offset, exact, atol=0.08)
    assert f.min() == 0.0


def test_free_energy_profile_weighted(rng):
    a = rng.uniform(-math.pi, math.pi, 50_000)
    log_w = 1.5 * np.cos(a)  # reweight a uniform sample to a von Mises with kappa 1.5
    centres, f = free_energy_profile(a, log_w, bins=24)
    exact = -1.5 * np.cos(centres)
    np.testing.assert_allclose(f - np.mean(f - exact), exact, atol=0.1)


def test_free_energy_profile_wraps_periodic_input(rng):
    a = rng.uniform(-math.pi, math.pi, 1000)
    _, f1 = free_energy_profile(a)
    _, f2 = free_energy_profile(a + 2 * math.pi)
    np.testing.assert_allclose(f1, f2, atol=1e-9)


def test_free_energy_profile_stderr_matches_binomial_error(rng):
    # n independent samples: a bin's count is binomial, so se(-log p) = sqrt((1 - p) / (n p)).
    n, bins = 4000, 12
    a = rng.vonmises(0.0, 1.0, n)
    se = free_energy_profile_stderr(a, bins=bins, n_bootstrap=400, seed=1)
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    p = np.histogram(a, bins=edges)[0] / n
    np.testing.assert_allclose(se, np.sqrt((1 - p) / (n * p)), rtol=0.2)


def test_free_energy_profile_stderr_blocks_and_empty_bins(rng):
    # A slowly switching series: blocks spanning the stays give a larger (honest) error than independent draws.
    stays = np.repeat(rng.choice([-2.0, 2.0], 40), 100) + rng.normal(0, 0.3, 4000)
    independent = free_energy_profile_stderr(stays, bins=8, seed=0)
    blocked = free_energy_profile_stderr(stays, bins=8, seed=0, block=300)
    populated = np.histogram(stays, bins=np.linspace(-math.pi, math.pi, 9))[0] > 0.05 * len(stays)
    assert populated.sum() >= 2 and np.all(blocked[populated] > 2 * independent[populated])
    # Bins no resample reaches have no error; fewer than MIN_BLOCKS blocks give none at all.
    assert np.isnan(free_energy_profile_stderr(rng.uniform(0, 1, 500), bins=8)[0])
    assert np.isnan(free_energy_profile_stderr(stays, bins=8, block=1000)).all()


def test_circular_wasserstein_known_values(rng):
    assert circular_wasserstein(np.array([0.1]), np.array([0.3])) == pytest.approx(0.2)
    # Across the +-pi seam the circular distance is 0.1, the linear one 2 pi - 0.1.
    u, v = np.array([-math.pi + 0.05]), np.array([math.pi - 0.05])
    assert circular_wasserstein(u, v) == pytest.approx(0.1)
    assert wasserstein_1d(u, v) == pytest.approx(2 * math.pi - 0.1)
    # Rotation invariance.
    a, b = rng.vonmises(2.5, 1.0, 500), rng.vonmises(-2.8, 2.0, 400)
    assert circular_wasserstein(a + 0.7, b + 0.7) == pytest.approx(circular_wasserstein(a, b), rel=1e-9)


def test_circular_wasserstein_matches_linear_for_compact_support(rng):
    a, b = rng.uniform(-1.0, 0.5, 1000), rng.normal(0.2, 0.3, 700).clip(-1, 1)
    wa = rng.random(1000)
    np.testing.assert_allclose(circular_wasserstein(a, b, np.log(wa)),
                               scipy.stats.wasserstein_distance(a, b, wa, None), rtol=1e-9)


def test_circular_wasserstein_brute_force(rng):
    # Equal-size uniform samples: W1 on the circle is the best cyclic matching of the sorted angles.
    n = 200
    a, b = rng.vonmises(2.5, 1.0, n), rng.vonmises(-2.8, 2.0, n)
    sa, sb = np.sort(a % (2 * math.pi)), np.sort(b % (2 * math.pi))
    brute = min(np.mean(np.abs((sa - np.roll(sb, k) + math.pi) % (2 * math.pi) - math.pi)) for k in range(n))
    assert circular_wasserstein(a, b) == pytest.approx(brute, rel=1e-9)


def test_weights_equal_duplicates(rng):
    a, b = rng.normal(size=50), rng.normal(1.0, 2.0, size=80)
    counts = rng.integers(1, 4, 50)
    dup = np.repeat(a, counts)
    assert wasserstein_1d(a, b, np.log(counts)) == pytest.approx(wasserstein_1d(dup, b), rel=1e-9)
    assert circular_wasserstein(a, b, np.log(counts)) == pytest.approx(circular_wasserstein(dup, b), rel=1e-9)


def test_bad_inputs_raise(rng):
    with pytest.raises(ValueError, match="NaN"):
        free_energy_profile(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="length"):
        wasserstein_1d(np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        circular_wasserstein(np.zeros(0), np.zeros(3))
    with pytest.raises(ValueError, match="basin"):
        basin_free_energy_difference(np.zeros(3), basin=(2.0, 0.0))


def wrapped_two_state(rng: np.random.Generator, n: int, p_a: float) -> dict[str, np.ndarray]:
    """psi with probability p_a in (-1.5, 1.2) (state A), else in (1.8, pi) or (-pi, -2.2) (state B, across
    the +-pi seam); phi in (-3, -0.5) except 10% of the samples in (0.5, 1.5), which are in neither state."""
    in_a = rng.random(n) < p_a
    b = rng.uniform(1.8, 2 * math.pi - 2.2, n)
    psi = np.where(in_a, rng.uniform(-1.5, 1.2, n), (b + math.pi) % (2 * math.pi) - math.pi)
    phi = np.where(rng.random(n) < 0.1, rng.uniform(0.5, 1.5, n), rng.uniform(-3.0, -0.5, n))
    return {"phi": phi, "psi": psi}


PSI_SPLIT = BasinDefinition("A vs B", basin=(("phi", 2.0, 2 * math.pi), ("psi", -1.6, 1.5)),
                            reference=(("phi", 2.0, 2 * math.pi), ("psi", 1.5, 2 * math.pi - 1.6)))


def test_in_arc_wraps_around_the_seam():
    a = np.array([-math.pi, -3.0, -1.0, 0.0, 1.4, 2.9, math.pi, 3 * math.pi])
    # [2.5, pi] or [-pi, -2.5): contains +-pi (and 3 pi = pi), -3.0, 2.9; the complement is the other arc.
    across = in_arc(a, 2.5, 2 * math.pi - 2.5)
    np.testing.assert_array_equal(across, [True, True, False, False, False, True, True, True])
    np.testing.assert_array_equal(in_arc(a, -2.5, 2.5), ~across)
    np.testing.assert_array_equal(in_arc(a, 2.5 - 2 * math.pi, -2.5), across)  # same arc, other turn
    assert in_arc(a, -math.pi, math.pi).all()
    for bad in ((2.0, 0.0), (0.0, 7.0), (0.0, math.nan)):
        with pytest.raises(ValueError, match="basin arc"):
            in_arc(a, *bad)


def test_basin_definition_two_state_mixture_across_seam(rng):
    n, p = 20_000, 0.3
    tors = wrapped_two_state(rng, n, p)
    in_a, in_b = PSI_SPLIT.masks(tors)
    assert not (in_a & in_b).any()
    neither = tors["phi"] > 0
    np.testing.assert_array_equal(in_a | in_b, ~neither)  # every negative-phi sample is in one state
    value, se = state_free_energy_difference(in_a, in_b, n_bootstrap=300)
    exact = -math.log(p / (1 - p))  # the phi > 0 samples are independent of the psi state
    se_binomial = math.sqrt(1.0 / (0.9 * n * p * (1 - p)))
    assert se == pytest.approx(se_binomial, rel=0.25)
    assert abs(value - exact) < 4 * se_binomial
    # Weights that turn the 30/70 split into 60/40.
    target = 0.6
    log_w = np.where(in_a, math.log(target / p), math.log((1 - target) / (1 - p)))
    value_w, se_w = state_free_energy_difference(in_a, in_b, log_w, n_bootstrap=200)
    assert abs(value_w - math.log((1 - target) / target)) < 4 * se_w


def test_block_bootstrap_of_correlated_series(rng):
    # A two-state series that stays ~50 steps in a state: i.i.d. resampling underestimates the error.
    n, dwell = 20_000, 50
    switches = rng.random(n) < 1.0 / dwell
    state = np.cumsum(switches) % 2 == 1
    block = block_length(state)
    assert 2 * dwell < block < 4 * dwell
    _, se_iid = state_free_energy_difference(state, ~state, n_bootstrap=200)
    value, se_block = state_free_energy_difference(state, ~state, n_bootstrap=200, block=block)
    # Telegraph process: rho(k) = (1 - 2/dwell)^k, integrated autocorrelation time 1 + 2 sum rho = dwell - 1;
    # delta method for -logit of the fraction p = 1/2.
    se_expected = math.sqrt((dwell - 1) / (n * 0.25))
    assert se_block == pytest.approx(se_expected, rel=0.35)
    assert se_block > 4 * se_iid
    assert abs(value) < 4 * se_expected
    # Two state changes: too few blocks for an error, reported as nan rather than a false 0.
    short = np.repeat([False, True, False], [100, 30, 170])
    value, se = state_free_energy_difference(short, ~short, n_bootstrap=50, block=block_length(short))
    assert value == pytest.approx(-math.log(30 / 270)) and math.isnan(se)


def test_basin_definition_bad_inputs():
    with pytest.raises(ValueError, match="basin arc"):
        BasinDefinition("bad", basin=(("psi", 1.0, -1.0),))
    with pytest.raises(ValueError, match="needs torsion"):
        PSI_SPLIT.masks({"psi": np.zeros(3)})
    with pytest.raises(ValueError, match="overlap"):
        state_free_energy_difference(np.ones(3, bool), np.ones(3, bool))
    with pytest.raises(ValueError, match="block"):
        state_free_energy_difference(np.ones(3, bool), np.zeros(3, bool), block=0)


def test_ramachandran_basins_split_the_shipped_md():
    """MD Delta F of the shipped alanine dipeptide data is finite for alpha_R vs beta/PII (it is not for the
    published alpha_L basin, which 3 ns at 300 K never enter)."""
    topology, frames = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
    tors = {name: a for name, (_, a) in backbone_torsions(frames, topology).items()}
    in_a, in_b = RAMACHANDRAN_BASINS["alphaR_beta"].masks(tors)
    assert (in_a | in_b).mean() > 0.99  # the two states cover the data
    assert 0.2 < in_a.mean() < 0.8
    value, se = state_free_energy_difference(in_a, in_b, n_bootstrap=50, block=block_length(in_a + 2 * in_b))
    assert math.isfinite(value) and 0 < se < 1
    alpha_l, rest = RAMACHANDRAN_BASINS["alphaL_rest"].masks(tors)
    np.testing.assert_array_equal(rest, ~alpha_l)


# ---- the literature's metrics: energy-W2, torus-W2, TICA-W2, JSD -----------------------------------------
def test_wasserstein_1d_p1_matches_scipy_and_p2_known_values(rng):
    a, b = rng.normal(size=300), rng.gamma(2.0, size=200)
    wa, wb = rng.random(300), rng.random(200)
    assert wasserstein_1d(a, b, np.log(wa), np.log(wb)) == pytest.approx(
        scipy.stats.wasserstein_distance(a, b, wa, wb), rel=1e-9)
    assert wasserstein_1d(np.array([0.0, 1.0]), np.array([2.0, 3.0]), p=2) == pytest.approx(2.0)
    # Unequal sizes: {0} vs {0, 2}: half the mass moves by 2, W2 = sqrt(0.5 * 4).
    assert wasserstein_1d(np.array([0.0]), np.array([0.0, 2.0]), p=2) == pytest.approx(math.sqrt(2.0))
    counts = rng.integers(1, 4, 300)
    assert wasserstein_1d(a, b, np.log(counts), p=2) == pytest.approx(
        wasserstein_1d(np.repeat(a, counts), b, p=2), rel=1e-9)
    with pytest.raises(ValueError, match="p must"):
        wasserstein_1d(a, b, p=0.5)


def test_energy_w2_of_two_gaussians(rng):
    # W2(N(m1, s1^2), N(m2, s2^2))^2 = (m1 - m2)^2 + (s1 - s2)^2. 50k samples each: measured sd of the
    # estimate over 20 seeds 0.006 (0.0045 with the weighted proposal); 5 sd.
    exact = math.sqrt(0.7**2 + 0.5**2)
    ref, e = rng.normal(0.0, 1.0, 50_000), rng.normal(0.7, 1.5, 50_000)
    assert energy_w2(ref, e) == pytest.approx(exact, abs=0.03)
    # Weighted: N(0, 2^2) samples with importance weights toward N(0.7, 1.5^2).
    c = rng.normal(0.0, 2.0, 50_000)
    log_w = -((c - 0.7) ** 2) / (2 * 1.5**2) + c**2 / 8
    assert energy_w2(ref, c, log_w) == pytest.approx(exact, abs=0.025)
    assert energy_w2(e, e) == 0.0
    # Zero-weight samples may be broken (u = +inf); weighted broken ones are an error.
    e_broken = np.append(e, np.inf)
    assert energy_w2(ref, e_broken, np.append(np.zeros_like(e), -np.inf)) == pytest.approx(energy_w2(ref, e))
    with pytest.raises(ValueError, match="NaN/inf"):
        energy_w2(ref, e_broken)


def wrap(a: np.ndarray) -> np.ndarray:
    return (a + math.pi) % (2 * math.pi) - math.pi


def test_torus_w2_of_a_shifted_set_across_the_seam(rng):
    # A tight cloud around (pi - 0.1, 0.5) and the same points shifted by (0.3, -0.2), i.e. across the
    # phi seam. Shifting every point by delta costs |delta|^2 per point and no other matching is cheaper,
    # so W2 = |delta| exactly; the Euclidean (non-periodic) W2 sees the wrap as a ~2 pi jump.
    a = np.array([math.pi - 0.1, 0.5]) + 0.05 * rng.standard_normal((300, 2))
    delta = np.array([0.3, -0.2])
    b = wrap(a + delta)
    a = wrap(a)
    assert torus_w2(b, a) == pytest.approx(np.linalg.norm(delta), rel=1e-9)
    assert point_set_w2(b, a) > 3.0
    assert torus_w2(a, a) == 0.0
    # Symmetric, and invariant under a common rotation of the torus.
    c = wrap(rng.vonmises(0.0, 1.0, (200, 2)))
    d = wrap(rng.vonmises(1.0, 2.0, (200, 2)))
    assert torus_w2(c, d) == pytest.approx(torus_w2(d, c), rel=1e-9)
    assert torus_w2(wrap(c + 2.0), wrap(d + 2.0)) == pytest.approx(torus_w2(c, d), rel=1e-9)


def test_point_set_w2_is_exact_on_small_sets(rng):
    # Brute force over all 7! matchings with the periodic cost.
    from itertools import permutations
    a, b = rng.uniform(-math.pi, math.pi, (7, 2)), rng.uniform(-math.pi, math.pi, (7, 2))
    d = np.abs(a[:, None] - b[None])
    cost = (np.minimum(d, 2 * math.pi - d) ** 2).sum(-1)
    brute = min(cost[np.arange(7), list(p)].mean() for p in permutations(range(7)))
    assert torus_w2(a, b) == pytest.approx(math.sqrt(brute), rel=1e-12)


def test_point_set_w2_weighted_and_subsampled(rng):
    # Weighted: samples of N(0, 1.5^2 I) with importance weights toward N(mu, I) against exact samples of
    # N(mu, I): W2 stays near the floor of two independent 600-point samples of N(mu, I) (~0.21-0.25 over
    # seeds; the weighted set, resampled with duplicates, measured 0.98-1.26 times it) and far below the
    # unweighted W2 (~1.2-1.5).
    mu = np.array([1.0, -0.5])
    target = mu + rng.standard_normal((600, 2))
    prop = 1.5 * rng.standard_normal((4000, 2))
    log_w = -0.5 * ((prop - mu) ** 2).sum(1) + 0.5 * (prop**2).sum(1) / 1.5**2
    floor = point_set_w2(mu + rng.standard_normal((600, 2)), target)
    assert 0.15 < floor < 0.35
    assert point_set_w2(prop, target, log_w, max_points=600) < 1.6 * floor
    assert point_set_w2(prop, target, max_points=600) > 1.0
    # A weighted set with few distinct points is resampled to the size of the unweighted one: weights
    # (1/2, 1/4, 1/4) are the multiplicities (2, 1, 1) of four points, exactly.
    three = rng.standard_normal((3, 2))
    assert point_set_w2(three, three[[0, 0, 1, 2]], np.log([0.5, 0.25, 0.25])) == 0.0
    # Subsampling is deterministic given the seed; m = min(max_points, n_a, n_b).
    assert point_set_w2(prop, target, log_w, max_points=200, seed=3) == point_set_w2(prop, target, log_w,
                                                                                     max_points=200, seed=3)
    with pytest.raises(ValueError, match="dimensions"):
        point_set_w2(prop, target[:, :1])


def ar1(rng: np.random.Generator, phis: list[float], length: int) -> np.ndarray:
    s = np.zeros((length, len(phis)))
    noise = rng.standard_normal((length, len(phis))) * np.sqrt(1 - np.square(phis))  # unit stationary variance
    for t in range(1, length):
        s[t] = np.asarray(phis) * s[t - 1] + noise[t]
    return s


def test_tica_finds_the_slow_mode(rng):
    # Independent AR(1) processes with coefficients 0.99, 0.7, 0 mixed by a random matrix: TICA at lag tau
    # must return eigenvalues phi^tau and a first component that is the slow process.
    phis = [0.99, 0.7, 0.0]
    s = ar1(rng, phis, 100_000)
    mix = rng.standard_normal((3, 3)) + 2 * np.eye(3)
    x = s @ mix.T + np.array([5.0, -1.0, 2.0])
    for lag in (1, 5):
        model = fit_tica(x, lag, scaling=None)
        # Estimation noise of an autocorrelation from 1e5 correlated samples: ~0.01 for the slow mode.
        np.testing.assert_allclose(model.eigenvalues, np.power(phis, lag), atol=0.03)
        tics = model.transform(x)
        assert abs(np.corrcoef(tics[:, 0], s[:, 0])[0, 1]) > 0.99
        np.testing.assert_allclose(tics.var(0), 1.0, rtol=0.02)  # unit variance without scaling
    km = fit_tica(x, 1, dim=2)
    assert km.components.shape == (3, 2)
    np.testing.assert_allclose(km.transform(x).var(0), km.eigenvalues**2, rtol=0.02)  # kinetic map
    # Several trajectories: pairs never straddle two of them.
    parts = fit_tica([x[:50_000], x[50_000:]], 1, scaling=None)
    np.testing.assert_allclose(parts.eigenvalues, model_eigs := fit_tica(x, 1, scaling=None).eigenvalues, atol=1e-3)
    assert model_eigs[0] > 0.98
    with pytest.raises(ValueError, match="longer than the lag"):
        fit_tica(x[:3], 5)


def test_tica_w2_and_features_on_the_shipped_md():
    topology, frames = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
    feats = tica_features(frames[:2000], topology)
    assert feats.shape == (2000, 45 + 4)  # 10 heavy atoms; sin/cos of phi and psi
    np.testing.assert_allclose(feats[:, 45::2] ** 2 + feats[:, 46::2] ** 2, 1.0, rtol=1e-5)
    model = fit_tica(feats, 10, dim=2)
    assert isinstance(model, TICA) and 0 < model.eigenvalues[1] <= model.eigenvalues[0] < 1
    assert tica_w2(model, feats[:500], feats[:500]) == 0.0
    # Two halves of the series are two samples of (nearly) one distribution: smaller than against a
    # sample whose heavy-atom distances are stretched by 5%.
    stretched = tica_features(frames[:500] * 1.05, topology)
    assert tica_w2(model, feats[:500], feats[1500:2000]) < tica_w2(model, stretched, feats[1500:2000])


def test_ramachandran_jsd_known_values(rng):
    cell = 2 * math.pi / 60
    centre = lambda i, j: [-math.pi + (i + 0.5) * cell, -math.pi + (j + 0.5) * cell]  # noqa: E731
    p = np.array([centre(3, 4)] * 4)
    q = np.array([centre(3, 4)] * 2 + [centre(10, 50)] * 2)
    # P = (1, 0), Q = (1/2, 1/2): M = (3/4, 1/4), JSD = H(M) - (H(P) + H(Q))/2 = H(3/4, 1/4) - 1/2 bits.
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert ramachandran_jsd(p, q) == pytest.approx(h_m - 0.5, rel=1e-12)
    assert ramachandran_jsd(q, p) == pytest.approx(h_m - 0.5, rel=1e-12)
    assert ramachandran_jsd(p, np.array([centre(40, 40)])) == 1.0  # disjoint
    assert 0 < ramachandran_jsd(p, np.array([centre(40, 40)]), smoothing=1e-3) < 1.0
    a = wrap(rng.vonmises(0.0, 1.0, (5000, 2)))
    b = wrap(rng.vonmises(0.5, 2.0, (3000, 2)))
    assert ramachandran_jsd(a, a) == 0.0
    jsd = ramachandran_jsd(a, b)
    assert 0 < jsd < 1 and jsd == pytest.approx(ramachandran_jsd(b, a), rel=1e-12)
    assert ramachandran_jsd(a + 2 * math.pi, b) == pytest.approx(ramachandran_jsd(a, b), rel=1e-12)
    # Weights act as multiplicities.
    counts = rng.integers(1, 4, 3000)
    assert ramachandran_jsd(a, b, None, np.log(counts)) == pytest.approx(
        ramachandran_jsd(a, np.repeat(b, counts, axis=0)), rel=1e-9)
    with pytest.raises(ValueError, match="pairs"):
        ramachandran_jsd(a[:, :1], b)
