"""Statistical metrics of samples against MD: torsions, free energies, Wasserstein distances.

All free energies are in units of kT. Weighted estimates take log importance weights (from
tbg.flow.reweight) and normalise them with its ``normalized_weights``; None means uniform weights.

Torsions are periodic, so their Wasserstein distance is the W1 distance on the circle of circumference
2 pi (geodesic ground distance), computed exactly: for two distributions on the circle with CDFs F, G
(from any cut point), W1 = min_c int |F - G - c| d(theta), and the optimal c is a median of F - G
weighted by arc length (Rabin, Delon & Gousseau, 2011). A linear W1 on [-pi, pi) would count a
shift across the +-pi seam as almost 2 pi.
"""

from __future__ import annotations

import math

import mdtraj as md
import numpy as np
import scipy.stats
import torch

from tbg.flow.reweight import normalized_weights

__all__ = [
    "backbone_torsions",
    "free_energy_profile",
    "basin_free_energy_difference",
    "wasserstein_1d",
    "circular_wasserstein",
    "weights_from_log",
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
    wrapped = (a + math.pi) % TWO_PI - math.pi
    hist, _ = np.histogram(wrapped, bins=edges, weights=w)
    with np.errstate(divide="ignore"):
        f = -np.log(hist)
    f -= f[np.isfinite(f)].min()
    return 0.5 * (edges[1:] + edges[:-1]), f


def _basin_delta_f(inside: np.ndarray, w: np.ndarray) -> float:
    p_in = float(w[inside].sum())
    p_out = float(w[~inside].sum())
    if p_in <= 0 or p_out <= 0:
        return math.inf if p_in <= 0 else -math.inf
    return -math.log(p_in / p_out)


def basin_free_energy_difference(
    angles: np.ndarray,
    log_w: np.ndarray | torch.Tensor | None = None,
    *,
    basin: tuple[float, float] = (0.0, 2.0),
    n_bootstrap: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """Delta F = F(basin) - F(rest) = -log(P(lo < theta < hi) / P(rest)) in kT, with a bootstrap error.

    The default basin 0 < phi < 2 rad is the positive-phi (alpha_L / C7ax) state of alanine dipeptide;
    the rest is the negative-phi (beta / C7eq / alpha_R) state. The error is the standard deviation of
    Delta F over ``n_bootstrap`` resamples (with replacement, weights resampled with their samples and
    renormalised); it assumes independent samples, so for correlated MD frames it is a lower bound.
    Returns (+-inf, nan) when a state holds no weight.
    """
    a = _check_values(angles, "angles")
    lo, hi = basin
    if not lo < hi:
        raise ValueError(f"basin must be (lo, hi) with lo < hi, got {basin}")
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be >= 2, got {n_bootstrap}")
    w = weights_from_log(log_w, len(a))
    wrapped = (a + math.pi) % TWO_PI - math.pi
    inside = (wrapped > lo) & (wrapped < hi)
    value = _basin_delta_f(inside, w)
    if not math.isfinite(value):
        return value, math.nan
    rng = np.random.default_rng(seed)
    boot = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        idx = rng.integers(0, len(a), len(a))
        boot[b] = _basin_delta_f(inside[idx], w[idx])
    boot = boot[np.isfinite(boot)]
    return value, float(boot.std(ddof=1)) if len(boot) > 1 else math.nan


def wasserstein_1d(
    u: np.ndarray, v: np.ndarray, u_log_w: np.ndarray | torch.Tensor | None = None,
    v_log_w: np.ndarray | torch.Tensor | None = None,
) -> float:
    """W1 between two weighted samples on the real line (scipy.stats.wasserstein_distance)."""
    u = _check_values(u, "u")
    v = _check_values(v, "v")
    return float(scipy.stats.wasserstein_distance(u, v, weights_from_log(u_log_w, len(u)),
                                                  weights_from_log(v_log_w, len(v))))


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
