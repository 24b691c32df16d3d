"""Statistical metrics of samples against MD: torsions, free energies, Wasserstein distances.

All free energies are in units of kT. Weighted estimates take log importance weights (from
tbg.flow.reweight) and normalise them with its ``normalized_weights``; None means uniform weights.

Torsions are periodic, so their Wasserstein distance is the W1 distance on the circle of circumference
2 pi (geodesic ground distance), computed exactly: for two distributions on the circle with CDFs F, G
(from any cut point), W1 = min_c int |F - G - c| d(theta), and the optimal c is a median of F - G
weighted by arc length (Rabin, Delon & Gousseau, 2011). A linear W1 on [-pi, pi) would count a
shift across the +-pi seam as almost 2 pi.

Free-energy differences between states: a state is a product of torsion arcs (Arc, handling the +-pi
seam), a BasinDefinition pairs a basin with a reference state, and RAMACHANDRAN_BASINS holds the two the
report uses: alpha_R vs beta/PII along psi within phi < 0 (the states the shipped alanine-dipeptide MD
samples) and the published alpha_L (0 < phi < 2) vs rest, which short MD runs rarely or never visit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mdtraj as md
import numpy as np
import scipy.stats
import torch

from tbg.flow.reweight import normalized_weights

__all__ = [
    "backbone_torsions",
    "free_energy_profile",
    "Arc",
    "BasinDefinition",
    "RAMACHANDRAN_BASINS",
    "in_arc",
    "block_length",
    "state_free_energy_difference",
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
# (beta extends across the +-pi seam to phi ~ +3). The psi boundaries are the two maxima of the MD psi free
# energy of the shipped data (phi < 0 frames, von Mises kernel of width 0.1 rad): psi = -1.7 (inside an
# empty gap from -2.6 to -1.4) and psi = 1.5 (~4 kT above the beta minimum).
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
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be >= 2, got {n_bootstrap}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n = len(a)
    w = weights_from_log(log_w, n)
    value = _delta_f(a, b, w)
    n_blocks = -(-n // block)
    if not math.isfinite(value) or n_blocks < MIN_BLOCKS:
        return value, math.nan
    rng = np.random.default_rng(seed)
    boot = np.empty(n_bootstrap)
    for k in range(n_bootstrap):
        idx = ((rng.integers(0, n, n_blocks)[:, None] + np.arange(block)) % n).reshape(-1)[:n]
        boot[k] = _delta_f(a[idx], b[idx], w[idx])
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
