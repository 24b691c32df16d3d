"""Importance reweighting of flow samples to the Boltzmann distribution.

For a sample x = flow(z) with exact log-det ``dlogp = int_0^1 div v dt`` the flow density is
log q(x) = log q0(z) - dlogp, so the unnormalised log importance weight against exp(-u(x)) is

    log w = -u(x) + prior_energy(z) + dlogp          (constants dropped, docs/model.md)

with u the reduced energy (U / kT) and prior_energy(z) = 0.5 |z - mean z|^2. Everything here works in
log space (logsumexp) so that weights spanning hundreds of orders of magnitude stay exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "log_importance_weights",
    "kish_ess",
    "pareto_k",
    "normalized_weights",
    "weighted_mean",
    "clip_log_weights",
    "energy_cutoff_log_weights",
    "TailTreatment",
    "tail_treatments",
]

log = logging.getLogger("tbg")


def _as_tensor(a: Tensor | np.ndarray | list | float) -> Tensor:
    t = torch.as_tensor(a)
    return t if t.is_floating_point() else t.to(torch.float64)


def _check_log_w(log_w: Tensor | np.ndarray) -> Tensor:
    lw = _as_tensor(log_w).to(torch.float64)
    if lw.dim() != 1:
        raise ValueError(f"log_w must be 1-D [n], got shape {tuple(lw.shape)}")
    if torch.isnan(lw).any() or torch.isposinf(lw).any():
        raise ValueError("log_w contains NaN or +inf; use log_importance_weights to map broken samples to -inf")
    if lw.numel() == 0 or torch.isneginf(lw).all():
        raise ValueError("no sample has a positive weight (log_w empty or all -inf)")
    return lw


def log_importance_weights(
    reduced_energy: Tensor | np.ndarray, prior_energy: Tensor | np.ndarray, dlogp: Tensor | np.ndarray
) -> Tensor:
    """log w = -u(x) + prior_energy(z) + dlogp, float64 [n].

    Samples whose reduced energy is +inf or NaN (broken geometry, failed energy evaluation) or whose
    prior energy / log-det is not finite get log w = -inf, i.e. weight 0.
    """
    u = _as_tensor(reduced_energy).to(torch.float64).reshape(-1)
    pe = _as_tensor(prior_energy).to(torch.float64).reshape(-1)
    dl = _as_tensor(dlogp).to(torch.float64).reshape(-1)
    if not (u.shape == pe.shape == dl.shape):
        raise ValueError(
            f"shape mismatch: reduced_energy {tuple(u.shape)}, prior_energy {tuple(pe.shape)}, dlogp {tuple(dl.shape)}"
        )
    pe, dl = pe.to(u.device), dl.to(u.device)
    log_w = -u + pe + dl
    bad = ~torch.isfinite(u) | ~torch.isfinite(pe) | ~torch.isfinite(dl)
    # u = -inf would give +inf weight: that is an energy bug, not a broken sample -> refuse.
    if torch.isneginf(u).any():
        raise ValueError("reduced_energy contains -inf")
    return torch.where(bad, torch.full_like(log_w, -math.inf), log_w)


def normalized_weights(log_w: Tensor | np.ndarray) -> Tensor:
    """Self-normalised weights w_i / sum_j w_j (float64, sum 1), computed as exp(log_w - logsumexp)."""
    lw = _check_log_w(log_w)
    return torch.exp(lw - torch.logsumexp(lw, 0))


def kish_ess(log_w: Tensor | np.ndarray) -> float:
    """Kish effective sample size as a fraction of n: (sum w)^2 / (n sum w^2) in [0, 1].

    Computed as exp(2 lse(log w) - lse(2 log w) - log n). Zero-weight samples (-inf) count in n.
    """
    lw = _check_log_w(log_w)
    n = lw.numel()
    val = 2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0) - math.log(n)
    return float(min(1.0, math.exp(float(val))))


def pareto_k(log_w: Tensor | np.ndarray) -> float | None:
    """The tail shape k of the importance weights: a generalised Pareto distribution fitted to the largest
    weights, the reliability diagnostic of Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman,
    Yao and Gabry). The variance of the weights is finite only for k < 0.5; above k = 0.7 self-normalised
    estimates converge too slowly to be trusted at any practical sample size, and one draw's Kish ESS can
    look better than it is. Negative k: a bounded tail.

    Fitted to the M = ceil(min(n / 5, 3 sqrt(n))) largest of the n positive weights, as their excess over
    the next largest one, by the profile-likelihood estimator of Zhang and Stephens (2009), shrunk toward
    0.5 with the weight of 10 observations (as the PSIS authors do). None when it cannot be fitted: fewer
    than 5 tail weights (under 25 positive weights) or a tail of equal weights.
    """
    lw = _check_log_w(log_w)
    lw = lw[torch.isfinite(lw)].sort().values
    n = lw.numel()
    m = math.ceil(min(n / 5, 3 * math.sqrt(n)))
    if m < 5:
        return None
    tail = torch.exp(lw[-(m + 1):] - lw[-1])  # ascending, the largest weight 1
    excess = tail[1:] - tail[0]
    if not excess[-1] > 0:
        return None
    return _generalized_pareto_shape(excess)


def _generalized_pareto_shape(x: Tensor) -> float:
    """Shape k of a generalised Pareto distribution fitted to the exceedances x >= 0 (ascending, largest > 0).

    Density (1/s)(1 + k x/s)^(-1/k - 1) written with theta = -k/s: for fixed theta the maximum-likelihood
    shape is k(theta) = mean log(1 - theta x) and the profile log-likelihood n (log(-theta/k) - k - 1).
    Zhang and Stephens average theta over a grid of m candidates (all below 1/max x) with weights
    proportional to that likelihood, then take k(theta_hat).
    """
    n = x.numel()
    grid = 30 + int(math.sqrt(n))
    j = torch.arange(1, grid + 1, dtype=x.dtype)
    positive = x[x > 0]
    quartile = torch.maximum(x[int(n / 4 + 0.5) - 1], positive.min())
    theta = 1 / x[-1] + (1 - torch.sqrt(grid / (j - 0.5))) / (3 * quartile)
    k = torch.log1p(-theta[:, None] * x).mean(1)
    profile = n * (torch.log(-theta / k) - k - 1)
    theta_hat = (torch.softmax(profile, 0) * theta).sum()
    k_hat = float(torch.log1p(-theta_hat * x).mean())
    prior_n, prior_k = 10, 0.5
    return (n * k_hat + prior_n * prior_k) / (n + prior_n)


def weighted_mean(
    values: Tensor | np.ndarray, log_w: Tensor | np.ndarray
) -> tuple[float | Tensor, float | Tensor]:
    """Self-normalised importance-sampling estimate of E_p[f] with its standard error.

    ``values`` is [n] (returns floats) or [n, ...] (returns tensors of shape [...]). The standard error is
    the delta-method estimate of the self-normalised estimator,
        se^2 = sum_i wbar_i^2 (f_i - mu)^2,     wbar = normalised weights,
    which reduces to std/sqrt(n) for uniform weights and grows like 1/sqrt(ESS) otherwise. Samples with
    weight 0 may carry non-finite values (they are ignored); a non-finite value with positive weight is
    an error.
    """
    wbar = normalized_weights(log_w)
    f = _as_tensor(values).to(torch.float64).to(wbar.device)
    if f.shape[:1] != wbar.shape:
        raise ValueError(f"values has leading dim {tuple(f.shape[:1])}, log_w has {tuple(wbar.shape)}")
    w = wbar.reshape(-1, *([1] * (f.dim() - 1)))
    pos = w > 0
    if (~torch.isfinite(f) & pos).any():
        raise ValueError("values contains NaN/inf for samples with positive weight")
    f = torch.where(pos, f, torch.zeros_like(f))
    mu = (w * f).sum(0)
    se = torch.sqrt((w**2 * (f - mu) ** 2).sum(0))
    if f.dim() == 1:
        return float(mu), float(se)
    return mu, se


def clip_log_weights(log_w: Tensor | np.ndarray, quantile: float = 0.999) -> Tensor:
    """Clip the largest log weights at their ``quantile`` (among samples with positive weight).

    Trades bias for variance: report the clipped estimate separately from the unclipped one. -inf
    (zero-weight) entries stay -inf.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    lw = _check_log_w(log_w)
    finite = lw[torch.isfinite(lw)]
    cap = torch.quantile(finite, quantile)
    return torch.minimum(lw, cap)


def energy_cutoff_log_weights(log_w: Tensor | np.ndarray, reduced_energy: Tensor | np.ndarray,
                              cutoff: float) -> Tensor:
    """log w with every sample whose reduced energy u exceeds ``cutoff`` (kT, absolute) set to -inf.

    Like clipping, this trades bias for variance: the estimates become those of p restricted to
    u <= cutoff, which is harmless only when p puts negligible mass above the cutoff (e.g. a cutoff far
    above the MD energies). Report it beside the untreated estimate (``tail_treatments``).
    """
    if not math.isfinite(cutoff):
        raise ValueError(f"the energy cutoff must be finite, got {cutoff}")
    lw = _check_log_w(log_w)
    u = _as_tensor(reduced_energy).to(torch.float64).reshape(-1).to(lw.device)
    if u.shape != lw.shape:
        raise ValueError(f"reduced_energy has shape {tuple(u.shape)}, log_w {tuple(lw.shape)}")
    if torch.isnan(u).any():
        raise ValueError("reduced_energy contains NaN (use +inf for broken samples)")
    return torch.where(u > cutoff, torch.full_like(lw, -math.inf), lw)


@dataclass
class TailTreatment:
    """One way of weighting the same samples: its log weights, Kish ESS (fraction of all n samples),
    number of samples with positive weight, and the estimates (mean, standard error) of the observables.
    ``ess`` is 0 and the estimates are NaN when the treatment leaves no sample with positive weight."""

    name: str
    log_w: Tensor
    ess: float
    n_positive: int
    estimates: dict[str, tuple[float, float]] = field(default_factory=dict)


def tail_treatments(log_w: Tensor | np.ndarray, observables: Mapping[str, Tensor | np.ndarray] | None = None, *,
                    reduced_energy: Tensor | np.ndarray | None = None, clip_quantiles: Sequence[float] = (0.999,),
                    energy_cutoffs: Sequence[float] = ()) -> dict[str, TailTreatment]:
    """Plain importance sampling and each tail treatment side by side, so that a treated number is never
    shown alone.

    Returns {name: TailTreatment} in the order "plain", then "clip q=<quantile>" for each quantile
    (``clip_log_weights``), then "energy cutoff u<=<cutoff>" for each cutoff (``energy_cutoff_log_weights``,
    needs ``reduced_energy``). ``observables`` maps names to per-sample values [n]; each treatment holds
    their self-normalised estimates with standard errors (``weighted_mean``).
    """
    lw = _check_log_w(log_w)
    if energy_cutoffs and reduced_energy is None:
        raise ValueError("energy cutoffs need reduced_energy")
    variants: list[tuple[str, Tensor]] = [("plain", lw)]
    variants += [(f"clip q={q:g}", clip_log_weights(lw, q)) for q in clip_quantiles]
    variants += [(f"energy cutoff u<={c:g}", energy_cutoff_log_weights(lw, reduced_energy, c)) for c in energy_cutoffs]
    out: dict[str, TailTreatment] = {}
    for name, treated in variants:
        positive = int(torch.isfinite(treated).sum())
        if positive == 0:
            log.warning("tail treatment %r leaves no sample with positive weight", name)
            nan = (math.nan, math.nan)
            out[name] = TailTreatment(name, treated, 0.0, 0, {k: nan for k in (observables or {})})
            continue
        estimates = {k: weighted_mean(v, treated) for k, v in (observables or {}).items()}
        out[name] = TailTreatment(name, treated, kish_ess(treated), positive, estimates)
    return out
