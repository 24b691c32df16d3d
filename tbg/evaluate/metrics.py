"""Statistical metrics of samples against MD: torsions, free energies, Wasserstein distances.

All free energies are in units of kT. Weighted estimates take log importance weights (from
tbg.flow.reweight) and normalise them with its ``normalized_weights``; None means uniform weights.

Torsions are periodic, so their Wasserstein distance is the W1 distance on the circle of circumference
2 pi (geodesic ground distance), computed exactly: for two distributions on the circle with CDFs F, G
(from any cut point), W1 = min_c int |F - G - c| d(theta), and the optimal c is a median of F - G
weighted by arc length (Rabin, Delon & Gousseau, 2011). A linear W1 on [-pi, pi) would count a
shift across the +-pi seam as almost 2 pi.

The metrics the Boltzmann-generator literature reports (every one accepts importance weights):

* energy-W2 (``energy_w2``): 2-Wasserstein distance between the 1-D distributions of the reduced energy
  u = U/kT (kT), computed exactly from the quantile functions (``wasserstein_1d`` with p = 2).
* torus-W2 (``torus_w2``): 2-Wasserstein distance between (phi, psi) distributions on the flat torus
  [-pi, pi)^2 with the periodic ground distance d^2 = sum_k min(|dtheta_k|, 2 pi - |dtheta_k|)^2 (radians).
* TICA-W2 (``tica_w2``): 2-Wasserstein distance (Euclidean) between the projections onto the first two
  TICA components of a TICA model fitted on the MD reference (``fit_tica``, ``tica_features``).
* JSD (``ramachandran_jsd``): Jensen-Shannon divergence (bits, in [0, 1]) of the 2-D (phi, psi)
  histograms.

Point-set W2 (torus, TICA) is an exact optimal-transport problem; it is solved exactly on equal-mass
point sets of m points each, m = max_points or the size of a smaller unweighted set (``point_set_w2``):
an unweighted set larger than m is subsampled without replacement, a weighted set is turned into m
equal-mass points by systematic resampling of its normalised weights, and the two m-point sets are
matched by scipy.optimize.linear_sum_assignment (an optimal plan between two uniform m-point sets is a
permutation). Two unweighted sets of equal size <= max_points give the exact W2 of the samples; otherwise
the value is that of m-point subsamples, whose expectation exceeds the population W2 (sampling noise
does not average out in a distance): compare numbers at the same m, and read them against the W2 of two
independent MD subsamples of the same size.

Free-energy differences between states: a state is a product of torsion arcs (Arc, handling the +-pi
seam), a BasinDefinition pairs a basin with a reference state, and RAMACHANDRAN_BASINS holds the two the
report uses: alpha_R vs beta/PII along psi within phi < 0 (the states the shipped alanine-dipeptide MD
samples) and the published alpha_L (0 < phi < 2) vs rest, which short MD runs rarely or never visit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mdtraj as md
import numpy as np
import scipy.optimize
import torch

from tbg.flow.refine.resampling import systematic_resample
from tbg.flow.reweight import normalized_weights

__all__ = [
    "backbone_torsions",
    "free_energy_profile",
    "free_energy_profile_stderr",
    "Arc",
    "BasinDefinition",
    "RAMACHANDRAN_BASINS",
    "in_arc",
    "block_length",
    "bootstrap_indices",
    "state_free_energy_difference",
    "basin_free_energy_difference",
    "wasserstein_1d",
    "circular_wasserstein",
    "weights_from_log",
    "energy_w2",
    "point_set_w2",
    "torus_w2",
    "TICA",
    "fit_tica",
    "tica_features",
    "tica_w2",
    "ramachandran_jsd",
]

TWO_PI = 2.0 * math.pi


def weights_from_log(log_w: np.ndarray | torch.Tensor | None, n: int) -> np.ndarray:
    """Normalised weights [n] (sum 1) from log weights, uniform when log_w is None."""
    if log_w is None:
        if n == 0:
            raise ValueError("no samples")
        return np.full(n, 1.0 / n)
    w = normalized_weights(log_w).cpu().numpy()
    if len(w) != n:
        raise ValueError(f"log weights have length {len(w)}, values have {n}")
    return w


def _check_values(values: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    if len(v) == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN/inf")
    return v


def backbone_torsions(positions_nm: np.ndarray, topology: md.Topology) -> dict[str, tuple[list[str], np.ndarray]]:
    """The first backbone phi and psi (mdtraj definitions) of each frame, in radians [-pi, pi].

    Returns {"phi": (atom labels, angles [n]), "psi": (...)}; a torsion the topology lacks is left out
    (a single residue has neither). For alanine dipeptide these are the usual phi/psi of Ala.
    """
    x = np.asarray(positions_nm, dtype=np.float32)
    traj = md.Trajectory(x, topology)
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for name, fn in (("phi", md.compute_phi), ("psi", md.compute_psi)):
        idx, ang = fn(traj)
        if idx.shape[0]:
            labels = [str(topology.atom(int(a))) for a in idx[0]]
            out[name] = (labels, ang[:, 0].astype(np.float64))
    return out


def free_energy_profile(
    angles: np.ndarray, log_w: np.ndarray | torch.Tensor | None = None, *, bins: int = 60
) -> tuple[np.ndarray, np.ndarray]:
    """F(theta) = -log p(theta) in kT on ``bins`` equal bins over [-pi, pi), shifted to min 0.

    Returns (bin centres, F); empty bins have F = +inf.
    """
    a = _check_values(angles, "angles")
    w = weights_from_log(log_w, len(a))
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    f = _minus_log_histogram(a, w, edges)
    f -= f[np.isfinite(f)].min()
    return 0.5 * (edges[1:] + edges[:-1]), f


def _minus_log_histogram(angles: np.ndarray, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """-log of the weighted histogram of angles (wrapped into [-pi, pi)); +inf for empty bins."""
    hist, _ = np.histogram((angles + math.pi) % TWO_PI - math.pi, bins=edges, weights=w)
    with np.errstate(divide="ignore"):
        return -np.log(hist)


def free_energy_profile_stderr(
    angles: np.ndarray, log_w: np.ndarray | torch.Tensor | None = None, *, bins: int = 60,
    n_bootstrap: int = 200, seed: int = 0, block: int = 1,
) -> np.ndarray:
    """Bootstrap standard error [kT] of each bin of free_energy_profile (same bins), NaN where fewer than
    two resamples put weight in the bin or fewer than MIN_BLOCKS blocks fit.

    It is the standard deviation of -log p(bin) over resamples (weights resampled with their samples;
    ``block`` as in state_free_energy_difference, > 1 for a time series such as MD frames); the profile's
    shift to minimum 0 is left out, so the band shows how well each bin's probability is known.
    """
    a = _check_values(angles, "angles")
    w = weights_from_log(log_w, len(a))
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    se = np.full(bins, math.nan)
    indices = bootstrap_indices(len(a), n_bootstrap=n_bootstrap, seed=seed, block=block)
    if indices is None:
        return se
    boot = np.stack([_minus_log_histogram(a[idx], w[idx], edges) for idx in indices])
    boot = np.where(np.isfinite(boot), boot, np.nan)
    enough = np.count_nonzero(np.isfinite(boot), axis=0) >= 2
    se[enough] = np.nanstd(boot[:, enough], axis=0, ddof=1)
    return se


Arc = tuple[str, float, float]
"""(torsion name, lo, hi): the angles theta with lo <= theta < hi modulo 2 pi, radians. lo < hi <= lo + 2 pi;
an arc across the +-pi seam has hi > pi, e.g. ("psi", 1.5, 2 pi - 1.7) = psi in [1.5, pi] or [-pi, -1.7)."""


def in_arc(angles: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Boolean mask of the angles on the arc [lo, hi) (modulo 2 pi; see Arc)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi <= lo + TWO_PI):
        raise ValueError(f"a basin arc (lo, hi) needs lo < hi <= lo + 2 pi (write a range across the +-pi seam "
                         f"with hi > pi), got ({lo}, {hi})")
    # Half-open, so that the arcs (lo, hi) and (hi, lo + 2 pi) split the circle exactly.
    return (np.asarray(angles, dtype=np.float64) - lo) % TWO_PI < hi - lo


def _format_arcs(arcs: tuple[Arc, ...]) -> str:
    def one(name: str, lo: float, hi: float) -> str:
        lo_w = (lo + math.pi) % TWO_PI - math.pi
        if lo_w + (hi - lo) <= math.pi:
            return f"{name} in [{lo_w:.2f}, {lo_w + hi - lo:.2f})"
        return f"{name} in [{lo_w:.2f}, pi] or [-pi, {lo_w + hi - lo - TWO_PI:.2f})"
    return " and ".join(one(*a) for a in arcs)


@dataclass(frozen=True)
class BasinDefinition:
    """Two states of torsion space whose free-energy difference F(basin) - F(reference) is reported.

    Each state is the set of samples whose torsions all lie on the state's arcs (see Arc); reference None
    means every sample outside the basin. Samples in neither state are left out of Delta F (they still
    count in the bootstrap resamples).
    """

    label: str
    basin: tuple[Arc, ...]
    reference: tuple[Arc, ...] | None = None

    def __post_init__(self) -> None:
        for arcs in (self.basin, self.reference or ()):
            for _, lo, hi in arcs:
                in_arc(np.zeros(0), lo, hi)  # checks the bounds once, at definition time
        if not self.basin:
            raise ValueError(f"basin {self.label!r} has no arcs")

    @property
    def torsions(self) -> set[str]:
        return {a[0] for a in (*self.basin, *(self.reference or ()))}

    def masks(self, torsions: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(in basin, in reference) boolean masks of samples given {torsion name: angles [n]}."""
        missing = self.torsions - set(torsions)
        if missing:
            raise ValueError(f"basin {self.label!r} needs torsion(s) {sorted(missing)}; have {sorted(torsions)}")

        def inside(arcs: tuple[Arc, ...]) -> np.ndarray:
            return np.logical_and.reduce([in_arc(torsions[name], lo, hi) for name, lo, hi in arcs])

        in_basin = inside(self.basin)
        return in_basin, ~in_basin if self.reference is None else inside(self.reference)

    def describe(self) -> dict[str, Any]:
        """JSON-ready definition: the label, the arcs and both states in words."""
        return {"label": self.label, "basin": [list(a) for a in self.basin],
                "reference": None if self.reference is None else [list(a) for a in self.reference],
                "basin_text": _format_arcs(self.basin),
                "reference_text": "the rest" if self.reference is None else _format_arcs(self.reference)}


# The Ramachandran basins of the first backbone phi/psi (alanine dipeptide), boundaries at the barriers.
# The negative-phi half is phi in [2, 2 pi), i.e. everything outside the published alpha_L basin 0 < phi < 2
# (beta extends across the +-pi seam to phi ~ +3). The psi boundaries sit at the barriers of the MD psi free
# energy of the shipped data (phi < 0 frames): psi = -1.7 inside an almost empty gap from -2.4 to -1.35, and
# psi = 1.5 on a ~4.5 kT plateau from 1.0 to 1.6 (tbg/data/alanine-dipeptide/README.md).
NEGATIVE_PHI: Arc = ("phi", 2.0, TWO_PI)
RAMACHANDRAN_BASINS: dict[str, BasinDefinition] = {
    "alphaR_beta": BasinDefinition(
        "alpha_R vs beta/PII (psi split at -1.7, 1.5)",
        basin=(NEGATIVE_PHI, ("psi", -1.7, 1.5)),
        reference=(NEGATIVE_PHI, ("psi", 1.5, TWO_PI - 1.7))),
    "alphaL_rest": BasinDefinition("alpha_L/C7ax vs rest (0 <= phi < 2)", basin=(("phi", 0.0, 2.0),)),
}


def _delta_f(in_a: np.ndarray, in_b: np.ndarray, w: np.ndarray) -> float:
    p_a = float(w[in_a].sum())
    p_b = float(w[in_b].sum())
    if p_a <= 0 or p_b <= 0:
        return math.inf if p_a <= 0 else -math.inf
    return -math.log(p_a / p_b)


MIN_BLOCKS = 8  # fewer independent blocks give no usable bootstrap error


def block_length(states: np.ndarray) -> int:
    """Bootstrap block length for a time series of state labels: 3 x the mean run length (at most n).

    For a two-state series with exponential correlations the integrated autocorrelation time is about
    one mean run; blocks of b steps keep sum_{|k|<b} (1 - |k|/b) rho(k) of the variance, ~60% at one run
    and ~90% at three.
    """
    s = np.asarray(states)
    if len(s) == 0:
        raise ValueError("no samples")
    mean_run = len(s) / (1 + int(np.count_nonzero(s[1:] != s[:-1])))
    return max(1, min(len(s), round(3 * mean_run)))


def bootstrap_indices(n: int, *, n_bootstrap: int, seed: int, block: int = 1) -> list[np.ndarray] | None:
    """``n_bootstrap`` resamples of range(n) with replacement: circular blocks of ``block`` consecutive
    indices (block = 1: independent draws). None when fewer than MIN_BLOCKS blocks fit."""
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be >= 2, got {n_bootstrap}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n_blocks = -(-n // block)
    if n_blocks < MIN_BLOCKS:
        return None
    rng = np.random.default_rng(seed)
    return [((rng.integers(0, n, n_blocks)[:, None] + np.arange(block)) % n).reshape(-1)[:n]
            for _ in range(n_bootstrap)]


def state_free_energy_difference(
    in_a: np.ndarray,
    in_b: np.ndarray,
    log_w: np.ndarray | torch.Tensor | None = None,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    block: int = 1,
) -> tuple[float, float]:
    """Delta F = F(A) - F(B) = -log(P(A) / P(B)) in kT of two states given as masks [n], bootstrap error.

    The error is the standard deviation of Delta F over ``n_bootstrap`` resamples with replacement
    (weights resampled with their samples). block = 1 treats samples as independent (model samples);
    block > 1 resamples circular blocks of that many consecutive samples, for a time series such as MD
    frames (see block_length); with too short blocks the error of correlated frames is underestimated.
    Returns (+-inf, nan) when a state holds no weight, and (value, nan) when fewer than MIN_BLOCKS
    blocks fit into the samples (too few state changes to estimate the error).
    """
    a = np.asarray(in_a, dtype=bool)
    b = np.asarray(in_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"state masks must be 1-D of equal length, got {a.shape} and {b.shape}")
    if (a & b).any():
        raise ValueError("the two states overlap: a sample lies in both")
    n = len(a)
    w = weights_from_log(log_w, n)
    value = _delta_f(a, b, w)
    indices = bootstrap_indices(n, n_bootstrap=n_bootstrap, seed=seed, block=block)
    if not math.isfinite(value) or indices is None:
        return value, math.nan
    boot = np.array([_delta_f(a[idx], b[idx], w[idx]) for idx in indices])
    boot = boot[np.isfinite(boot)]
    return value, float(boot.std(ddof=1)) if len(boot) > 1 else math.nan


def basin_free_energy_difference(
    angles: np.ndarray,
    log_w: np.ndarray | torch.Tensor | None = None,
    *,
    basin: tuple[float, float] = (0.0, 2.0),
    n_bootstrap: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """Delta F = F(basin) - F(rest) in kT of one torsion, basin = the arc [lo, hi) (see Arc), bootstrap error.

    The default basin 0 <= phi < 2 rad is the positive-phi (alpha_L / C7ax) state of alanine dipeptide;
    the rest is the negative-phi (beta / C7eq / alpha_R) state. Independent samples are assumed (see
    state_free_energy_difference). For states over several torsions use BasinDefinition.
    """
    inside = in_arc(_check_values(angles, "angles"), *basin)
    return state_free_energy_difference(inside, ~inside, log_w, n_bootstrap=n_bootstrap, seed=seed)


def wasserstein_1d(
    u: np.ndarray, v: np.ndarray, u_log_w: np.ndarray | torch.Tensor | None = None,
    v_log_w: np.ndarray | torch.Tensor | None = None, *, p: float = 1.0,
) -> float:
    """Exact p-Wasserstein distance between two weighted samples on the real line.

    W_p^p = int_0^1 |F^-1(s) - G^-1(s)|^p ds with F^-1, G^-1 the quantile functions of the weighted
    empirical distributions: both are step functions, so the integral is a finite sum over the merged
    steps of the cumulative weights (the monotone coupling is optimal on the line for every p >= 1).
    """
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p}")
    u = _check_values(u, "u")
    v = _check_values(v, "v")
    wu, wv = weights_from_log(u_log_w, len(u)), weights_from_log(v_log_w, len(v))
    ou, ov = np.argsort(u, kind="stable"), np.argsort(v, kind="stable")
    cu, cv = np.cumsum(wu[ou]), np.cumsum(wv[ov])
    levels = np.unique(np.concatenate([cu[:-1], cv[:-1], [0.0, 1.0]]).clip(0.0, 1.0))
    # Cumulative sums of equal weights differ in the last bits between the two sets: slivers narrower than
    # 1e-12 would pair the wrong quantiles (an error of ~1e-6 |u - v| in W2 of two identical samples).
    levels = levels[np.concatenate([np.diff(levels) > 1e-12, [True]])]
    levels[0] = 0.0
    mid = 0.5 * (levels[1:] + levels[:-1])
    qu = u[ou][np.searchsorted(cu, mid).clip(max=len(u) - 1)]
    qv = v[ov][np.searchsorted(cv, mid).clip(max=len(v) - 1)]
    return float(np.sum(np.diff(levels) * np.abs(qu - qv) ** p) ** (1.0 / p))


def _positive_weight(values: np.ndarray, log_w: np.ndarray | torch.Tensor | None, name: str):
    """The samples with positive weight and their log weights (all samples when log_w is None)."""
    values = np.asarray(values, dtype=np.float64)
    if log_w is None:
        return values, None
    lw = np.asarray(log_w.cpu() if isinstance(log_w, torch.Tensor) else log_w, dtype=np.float64).reshape(-1)
    if len(lw) != len(values):
        raise ValueError(f"{name}: log weights have length {len(lw)}, values have {len(values)}")
    keep = np.isfinite(lw)
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise ValueError(f"{name}: log weights contain NaN or +inf")
    return values[keep], lw[keep]


def energy_w2(reference_energies: np.ndarray, energies: np.ndarray,
              log_w: np.ndarray | torch.Tensor | None = None,
              reference_log_w: np.ndarray | torch.Tensor | None = None) -> float:
    """energy-W2: exact 2-Wasserstein distance between the distributions of reduced energies (kT).

    ``log_w`` weights the samples (e.g. importance or SMC weights); samples of weight 0 (-inf) may have
    non-finite energies and are left out, any other non-finite energy is an error (an unweighted set with
    broken samples has no finite W2: filter or weight them first).
    """
    e, lw = _positive_weight(energies, log_w, "energies")
    ref, rlw = _positive_weight(reference_energies, reference_log_w, "reference_energies")
    return wasserstein_1d(ref, e, rlw, lw, p=2)


def _equal_mass_points(n: int, log_w: np.ndarray | None, m: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of m equal-mass points representing n (weighted) samples (see the module docstring)."""
    if log_w is None:
        return np.arange(n) if m == n else rng.choice(n, m, replace=False)
    perm = rng.permutation(n)  # systematic resampling follows the order: shuffle it (MD frames are a series)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return perm[systematic_resample(torch.as_tensor(log_w[perm]), m, generator=gen).numpy()]


def point_set_w2(a: np.ndarray, b: np.ndarray, a_log_w: np.ndarray | torch.Tensor | None = None,
                 b_log_w: np.ndarray | torch.Tensor | None = None, *, period: float | None = None,
                 max_points: int = 2000, seed: int = 0) -> float:
    """2-Wasserstein distance between two weighted point sets [n, k] and [m, k] (see the module docstring).

    The ground distance is Euclidean, or with ``period`` the periodic one of a torus of that period in
    every coordinate. Exact for two unweighted sets of equal size <= max_points; otherwise the exact W2 of
    equal-mass subsamples of m points (deterministic given ``seed``): m = max_points, or the size of an
    unweighted set if smaller (a weighted set is resampled to any m, however few distinct points it has). The
    assignment costs O(m^3) in the worst case: m = 2000 takes ~1-10 s on one CPU core.
    """
    a, lwa = _positive_weight(a, a_log_w, "a")
    b, lwb = _positive_weight(b, b_log_w, "b")
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"{name} must be a non-empty [n, k] point set, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN/inf")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"point dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    rng = np.random.default_rng(seed)
    # Resampling turns a weighted set into any number of points; only unweighted sets cap m.
    m = min([max_points] + [len(x) for x, lw in ((a, lwa), (b, lwb)) if lw is None])
    pa = a[_equal_mass_points(len(a), lwa, m, rng)]
    pb = b[_equal_mass_points(len(b), lwb, m, rng)]
    diff = np.abs(pa[:, None, :] - pb[None, :, :])
    if period is not None:
        diff = np.minimum(diff % period, period - diff % period)
    cost = np.einsum("ijk,ijk->ij", diff, diff)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def torus_w2(phi_psi: np.ndarray, reference_phi_psi: np.ndarray, log_w: np.ndarray | torch.Tensor | None = None,
             reference_log_w: np.ndarray | torch.Tensor | None = None, *, max_points: int = 2000,
             seed: int = 0) -> float:
    """torus-W2 (radians) between (phi, psi) samples [n, 2] and the reference [m, 2] with the periodic
    distance (``point_set_w2`` with period 2 pi; subsampling as documented there)."""
    return point_set_w2(phi_psi, reference_phi_psi, log_w, reference_log_w, period=TWO_PI,
                        max_points=max_points, seed=seed)


@dataclass(frozen=True)
class TICA:
    """A fitted TICA model: features f [n, F] project to (f - mean) @ components [n, k].

    ``eigenvalues`` [k] are the autocorrelations of the components at ``lagtime`` frames (descending);
    with scaling "kinetic_map" each component is multiplied by its eigenvalue (Euclidean distances then
    approximate kinetic distances; the default of deeptime), with None it has unit variance.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    lagtime: int
    scaling: str | None

    def transform(self, features: np.ndarray, dim: int | None = None) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.mean):
            raise ValueError(f"features must be [n, {len(self.mean)}], got {f.shape}")
        return (f - self.mean) @ self.components[:, :dim]


def fit_tica(trajectories: np.ndarray | Sequence[np.ndarray], lagtime: int, *, dim: int | None = None,
             scaling: str | None = "kinetic_map", epsilon: float = 1e-6) -> TICA:
    """Fit TICA on one or more feature time series [T, F] with lag ``lagtime`` frames.

    Reversible estimator: from all pairs (f_t, f_{t+lag}) within each series, the mean mu of both halves,
    C00 = (X^T X + Y^T Y) / 2N and C0t = (X^T Y + Y^T X) / 2N of the mean-free X (instantaneous) and Y
    (lagged); then the generalized symmetric eigenproblem C0t v = lambda C00 v, solved by whitening with
    C00 (directions with eigenvalue below epsilon x the largest are dropped as linearly dependent) and
    normalised to v^T C00 v = 1. Components are sorted by descending lambda; ``dim`` keeps the first ones.
    """
    series = [np.asarray(t, dtype=np.float64) for t in
              ([trajectories] if isinstance(trajectories, np.ndarray) else trajectories)]
    if lagtime < 1:
        raise ValueError(f"lagtime must be >= 1, got {lagtime}")
    if scaling not in ("kinetic_map", None):
        raise ValueError(f"scaling must be 'kinetic_map' or None, got {scaling!r}")
    if any(t.ndim != 2 or t.shape[1] != series[0].shape[1] for t in series):
        raise ValueError("every trajectory must be [T, F] with the same F")
    pairs = [(t[:-lagtime], t[lagtime:]) for t in series if len(t) > lagtime]
    if not pairs:
        raise ValueError(f"no trajectory is longer than the lag time ({lagtime} frames)")
    x = np.concatenate([p[0] for p in pairs])
    y = np.concatenate([p[1] for p in pairs])
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features contain NaN/inf")
    mean = 0.5 * (x.mean(0) + y.mean(0))
    x, y = x - mean, y - mean
    n = len(x)
    c00 = (x.T @ x + y.T @ y) / (2 * n)
    c0t = (x.T @ y + y.T @ x) / (2 * n)
    s, u = np.linalg.eigh(c00)
    keep = s > epsilon * s.max()
    whiten = u[:, keep] / np.sqrt(s[keep])
    lam, r = np.linalg.eigh(whiten.T @ c0t @ whiten)
    order = np.argsort(lam)[::-1][:dim]
    lam, components = lam[order], whiten @ r[:, order]
    if scaling == "kinetic_map":
        components = components * lam
    return TICA(mean=mean, components=components, eigenvalues=lam, lagtime=lagtime, scaling=scaling)


def tica_features(positions_nm: np.ndarray, topology: md.Topology) -> np.ndarray:
    """TICA input features [n, F]: all pairwise distances (nm) between heavy (non-hydrogen) atoms, then
    sin and cos of every backbone phi, psi and omega torsion that mdtraj finds.

    For alanine dipeptide: 45 distances of its 10 heavy atoms and sin/cos of phi and psi (mdtraj finds no
    omega: its definition needs the CA of both residues, and the ACE/NME caps have none).
    """
    x = np.asarray(positions_nm, dtype=np.float32)
    traj = md.Trajectory(x, topology)
    heavy = [a.index for a in topology.atoms if a.element is None or a.element.symbol != "H"]
    i, j = np.triu_indices(len(heavy), 1)
    pairs = np.stack([np.asarray(heavy)[i], np.asarray(heavy)[j]], 1)
    parts = [md.compute_distances(traj, pairs).astype(np.float64)] if len(pairs) else []
    for fn in (md.compute_phi, md.compute_psi, md.compute_omega):
        _, ang = fn(traj)
        parts += [np.sin(ang).astype(np.float64), np.cos(ang).astype(np.float64)]
    return np.concatenate(parts, axis=1)


def tica_w2(model: TICA, features: np.ndarray, reference_features: np.ndarray,
            log_w: np.ndarray | torch.Tensor | None = None,
            reference_log_w: np.ndarray | torch.Tensor | None = None, *, dim: int = 2,
            max_points: int = 2000, seed: int = 0) -> float:
    """TICA-W2: Euclidean 2-Wasserstein distance between the samples' and the reference's projections on
    the first ``dim`` components of ``model`` (fitted on the MD reference; ``point_set_w2``)."""
    return point_set_w2(model.transform(features, dim), model.transform(reference_features, dim), log_w,
                        reference_log_w, max_points=max_points, seed=seed)


def ramachandran_jsd(phi_psi: np.ndarray, reference_phi_psi: np.ndarray,
                     log_w: np.ndarray | torch.Tensor | None = None,
                     reference_log_w: np.ndarray | torch.Tensor | None = None, *, bins: int = 60,
                     smoothing: float = 0.0) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) of the (phi, psi) histograms of two weighted samples.

    Histograms: bins x bins equal cells on [-pi, pi)^2 (default 60 x 60, 6 degree cells; angles wrapped
    into the range), normalised weights. ``smoothing`` adds that probability to every cell before
    renormalising (default 0: none; the divergence is finite without it because the mixture
    M = (P + Q)/2 is positive wherever P or Q is). JSD = H(M) - (H(P) + H(Q))/2 with entropies in bits:
    0 for identical histograms, 1 for disjoint ones, symmetric.
    """
    if bins < 1 or smoothing < 0:
        raise ValueError(f"need bins >= 1 and smoothing >= 0, got {bins}, {smoothing}")

    def histogram(angles: np.ndarray, lw: np.ndarray | torch.Tensor | None, name: str) -> np.ndarray:
        a = np.asarray(angles, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
            raise ValueError(f"{name} must be non-empty (phi, psi) pairs [n, 2], got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN/inf")
        w = weights_from_log(lw, len(a))
        cell = np.floor(((a + math.pi) % TWO_PI) / TWO_PI * bins).astype(np.int64).clip(0, bins - 1)
        h = np.bincount(cell[:, 0] * bins + cell[:, 1], weights=w, minlength=bins * bins)
        h = h + smoothing
        return h / h.sum()

    def entropy_bits(p: np.ndarray) -> float:
        nz = p[p > 0]
        return float(-(nz * np.log2(nz)).sum())

    p = histogram(phi_psi, log_w, "phi_psi")
    q = histogram(reference_phi_psi, reference_log_w, "reference_phi_psi")
    jsd = entropy_bits(0.5 * (p + q)) - 0.5 * (entropy_bits(p) + entropy_bits(q))
    return float(min(max(jsd, 0.0), 1.0))


def _cdf_at(points: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    order = np.argsort(values)
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    return cum[np.searchsorted(values[order], points, side="right")]


def circular_wasserstein(
    u: np.ndarray, v: np.ndarray, u_log_w: np.ndarray | torch.Tensor | None = None,
    v_log_w: np.ndarray | torch.Tensor | None = None, *, period: float = TWO_PI,
) -> float:
    """Exact W1 between two weighted samples of angles on a circle of circumference ``period``."""
    u = _check_values(u, "u") % period
    v = _check_values(v, "v") % period
    wu = weights_from_log(u_log_w, len(u))
    wv = weights_from_log(v_log_w, len(v))
    pts = np.unique(np.concatenate([u, v]))
    # F - G is constant on [pts[k], pts[k+1]); on the wrap-around arc both CDFs are 0 (or 1).
    diff = _cdf_at(pts, u, wu) - _cdf_at(pts, v, wv)
    lengths = np.diff(np.concatenate([pts, [pts[0] + period]]))
    diff[-1] = 0.0  # both CDFs are 1 at the last point: the arc back to pts[0] carries no difference
    order = np.argsort(diff)
    cum = np.cumsum(lengths[order])
    c = diff[order][np.searchsorted(cum, 0.5 * cum[-1])]
    return float(np.sum(lengths * np.abs(diff - c)))
