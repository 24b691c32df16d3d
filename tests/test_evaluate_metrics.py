"""Metrics of tbg.evaluate on synthetic samples with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from tbg.evaluate import basin_free_energy_difference, circular_wasserstein, free_energy_profile, wasserstein_1d
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
