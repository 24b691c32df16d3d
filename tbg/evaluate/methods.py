"""Sampling methods side by side against MD: the flow's samples, importance sampling (IS) with and without
tail treatments, and refinement (SMC particles, MCMC chains), each scored with the field's metrics.

Every method is a weighted set of samples of the molecule (``MethodSamples``: positions, reduced energies,
log weights or None for equal weights). ``compare_methods`` scores each against the MD reference
(``MDReference``) with the same numbers, so that a treated or refined estimate is never read alone:

* ESS: Kish's effective sample size of the weights (the fraction is of the set's size); a method can
  bring its own (MCMC: the autocorrelation ESS of its chains). SMC particles after resampling share
  ancestors, which Kish's number does not see: the report gives their distinct ancestors beside it.
* mean reduced energy with its standard error, energy W1 and energy-W2 to MD (kT);
* torus-W2 of (phi, psi) (rad), TICA-W2 on the first two components of a TICA model fitted on the MD
  frames (dimensionless: kinetic-map coordinates of unit-variance components), Ramachandran JSD (bits);
  point-set W2 compares ``w2_points`` equal-mass points per set (see tbg.evaluate.metrics: compare numbers
  at the same size only);
* circular W1 of each torsion to MD (rad);
* Delta F of every basin definition with its bootstrap error (samples resampled in blocks of the set's
  ``bootstrap_block``; 1 treats them as independent, which underestimates the error of correlated samples
  such as SMC descendants of one ancestor) and its difference to MD (errors in quadrature).

Quantities a set cannot have (no energies, no weights, no torsions) are None.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mdtraj as md
import numpy as np

from tbg.evaluate import metrics
from tbg.flow.reweight import kish_ess, weighted_mean

log = logging.getLogger("tbg")

__all__ = ["DEFINITIONS", "MDReference", "MethodSamples", "compare_methods", "methods_table"]

ENERGY_KEYS = ("mean", "stderr", "w1", "w2", "n_nonfinite")
# What each number of a method means, with its unit (written into the report).
DEFINITIONS: dict[str, str] = {
    "ess": "effective samples: Kish (sum w)^2 / sum w^2 of the set's weights, fraction of its size; MCMC: chain "
           "length / integrated autocorrelation time of u; SMC: distinct ancestors (initial flow samples) beside it",
    "energy.mean": "weighted mean of the reduced energy u = U/kT [kT], with its standard error",
    "energy.w1": "exact 1-D Wasserstein-1 distance of u to the MD frames' [kT]",
    "energy.w2": "energy-W2: exact 1-D Wasserstein-2 distance of u to the MD frames' [kT]",
    "torus_w2": "torus-W2: Wasserstein-2 distance of (phi, psi) to MD with the periodic distance [rad], exact "
                "optimal transport between w2_points equal-mass points of each set",
    "tica_w2": "TICA-W2: Euclidean Wasserstein-2 distance to MD on the first 2 TICA components (fitted on the MD "
               "frames at lag tica_lag frames, kinetic-map scaling; dimensionless), w2_points points per set",
    "ramachandran_jsd": "Jensen-Shannon divergence of the 60 x 60 (phi, psi) histograms to MD [bits, 0..1]",
    "torsion_w1": "circular Wasserstein-1 distance of each torsion to MD [rad]",
    "delta_f": "F(basin) - F(reference) [kT] with bootstrap stderr, and minus MD (errors in quadrature)",
}


@dataclass
class MethodSamples:
    """One method's samples: ``positions_nm`` [n, N, 3] (correct configurations, topology atom order),
    ``energies`` [n] reduced (None: not computed), ``log_w`` [n] (None: equal weights; -inf: weight 0),
    ``kind`` ("flow", "IS", "IS + tail treatment", "SMC", "MCMC"), an ``ess`` entry replacing Kish's (MCMC),
    ``bootstrap_block`` for the Delta F errors, and ``info`` recorded with the method's numbers (settings,
    costs)."""

    name: str
    kind: str
    positions_nm: np.ndarray
    energies: np.ndarray | None = None
    log_w: np.ndarray | None = None
    ess: dict[str, Any] | None = None
    bootstrap_block: int = 1
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MDReference:
    """The MD frames [m, N, 3] in nm in time order, their reduced energies (or None), backbone torsions
    (name -> angles [m]) and the MD Delta F entries (key -> {"value", "stderr"} or None)."""

    positions_nm: np.ndarray
    energies: np.ndarray | None
    torsions: Mapping[str, np.ndarray]
    delta_f: Mapping[str, Mapping[str, Any] | None]


def _phi_psi(torsions: Mapping[str, np.ndarray]) -> np.ndarray | None:
    return np.stack([torsions["phi"], torsions["psi"]], 1) if {"phi", "psi"} <= set(torsions) else None


def _ess(s: MethodSamples, log_w: np.ndarray | None) -> dict[str, Any] | None:
    if s.ess is not None:
        return s.ess
    if log_w is None:
        return None
    fraction = kish_ess(log_w)
    return {"kind": "Kish", "fraction": fraction, "effective_samples": fraction * len(log_w)}


def _energy(s: MethodSamples, ref: MDReference, log_w: np.ndarray | None) -> dict[str, Any]:
    entry: dict[str, Any] = dict.fromkeys(ENERGY_KEYS)
    if s.energies is None:
        return entry
    e = np.asarray(s.energies, dtype=np.float64)
    finite = np.isfinite(e)
    entry["n_nonfinite"] = int((~finite).sum())
    # Equal weights: broken samples (u = inf) are left out; weighted: they must have weight 0.
    lw = np.where(finite, 0.0, -np.inf) if log_w is None else log_w
    if (np.isfinite(lw) & ~finite).any():
        raise ValueError(f"{s.name}: positive weight on samples with non-finite energy")
    if not np.isfinite(lw).any():
        return entry
    entry["mean"], entry["stderr"] = weighted_mean(np.where(finite, e, 0.0), lw)
    if ref.energies is not None:
        keep = np.isfinite(lw)
        entry["w1"] = metrics.wasserstein_1d(ref.energies, e[keep], None, lw[keep])
        entry["w2"] = metrics.energy_w2(ref.energies, e[keep], lw[keep])
    return entry


def _delta_f(in_states: tuple[np.ndarray, np.ndarray], log_w: np.ndarray | None, md_entry: Mapping | None,
             block: int, n_bootstrap: int, seed: int) -> dict[str, Any]:
    in_a, in_b = in_states
    value, se = metrics.state_free_energy_difference(in_a, in_b, log_w, n_bootstrap=n_bootstrap, seed=seed,
                                                     block=max(1, min(block, len(in_a))))
    finite = md_entry is not None and md_entry.get("value") is not None and math.isfinite(value)
    md_se = None if md_entry is None else md_entry.get("stderr")
    return {"value": value, "stderr": se, "n_basin": int(in_a.sum()), "n_reference": int(in_b.sum()),
            "minus_md": {"value": value - md_entry["value"] if finite else None,
                         "stderr": math.hypot(se, md_se) if finite and md_se is not None and math.isfinite(se)
                         else None}}


def compare_methods(ref: MDReference, sets: Sequence[MethodSamples], topology: md.Topology, *,
                    basins: Mapping[str, metrics.BasinDefinition], n_bootstrap: int, seed: int = 0,
                    w2_points: int = 1000, tica_lag: int = 1) -> dict[str, Any]:
    """{"methods": name -> numbers (see the module docstring), "metrics": {"definitions": DEFINITIONS,
    "w2_points", "tica": the TICA model's lag and eigenvalues (None where it could not be fitted)}}."""
    md_phi_psi = _phi_psi(ref.torsions)
    md_tica = tica = None
    try:
        md_features = metrics.tica_features(ref.positions_nm, topology)
        tica = metrics.fit_tica(md_features, tica_lag, dim=2)
        md_tica = tica.transform(md_features)
    except ValueError as err:  # e.g. fewer MD frames than the lag time
        log.warning("no TICA-W2: %s", err)
    methods: dict[str, Any] = {}
    for s in sets:
        lw = None if s.log_w is None else np.asarray(s.log_w, dtype=np.float64)
        entry: dict[str, Any] = {"kind": s.kind, "n": len(s.positions_nm), "n_positive": 0, "ess": None,
                                 "energy": dict.fromkeys(ENERGY_KEYS),
                                 "torus_w2": None, "tica_w2": None, "ramachandran_jsd": None, "torsion_w1": {},
                                 "delta_f": {}, **s.info}
        if len(s.positions_nm) == 0 or (lw is not None and not np.isfinite(lw).any()):
            log.warning("%s: no sample with positive weight; its metrics are null", s.name)
            methods[s.name] = entry
            continue
        entry["ess"] = _ess(s, lw)
        entry["energy"] = _energy(s, ref, lw)
        entry["n_positive"] = len(s.positions_nm) if lw is None else int(np.isfinite(lw).sum())
        torsions = {name: a for name, (_, a) in metrics.backbone_torsions(s.positions_nm, topology).items()}
        keep = np.ones(len(s.positions_nm), bool) if lw is None else np.isfinite(lw)
        lw_kept = None if lw is None else lw[keep]
        for name, a_md in ref.torsions.items():
            if name in torsions:
                entry["torsion_w1"][name] = metrics.circular_wasserstein(a_md, torsions[name][keep], None, lw_kept)
        phi_psi = _phi_psi(torsions)
        if phi_psi is not None and md_phi_psi is not None:
            entry["torus_w2"] = metrics.torus_w2(phi_psi[keep], md_phi_psi, lw_kept, max_points=w2_points, seed=seed)
            entry["ramachandran_jsd"] = metrics.ramachandran_jsd(phi_psi[keep], md_phi_psi, lw_kept)
        if tica is not None:
            features = metrics.tica_features(s.positions_nm[keep], topology)
            entry["tica_w2"] = metrics.point_set_w2(tica.transform(features, 2), md_tica, lw_kept,
                                                    max_points=w2_points, seed=seed)
        for key, definition in basins.items():
            if definition.torsions <= set(torsions):
                entry["delta_f"][key] = _delta_f(definition.masks(torsions), lw, ref.delta_f.get(key),
                                                 s.bootstrap_block, n_bootstrap, seed)
        methods[s.name] = entry
    return {"methods": methods,
            "metrics": {"definitions": DEFINITIONS, "w2_points": w2_points,
                        "tica": None if tica is None else {"lag_frames": tica_lag,
                                                           "eigenvalues": tica.eigenvalues[:2].tolist()}}}


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _pm(e: Mapping | None) -> str:
    if e is None or e.get("value") is None:
        return "-"
    return f"{e['value']:+.2f} +- {_fmt(e['stderr'], '.2f')}"


def _ess_text(ess: Mapping | None, unique: int | None) -> str:
    if ess is None:
        return "-"
    text = _fmt(ess.get("effective_samples"), ".0f")
    if ess.get("fraction") is not None:
        text += f" ({100 * ess['fraction']:.2g}%)"
    return text + (f", {unique} anc." if unique is not None else "")


def methods_table(report: Mapping[str, Any], md_delta_f: Mapping[str, Mapping | None]) -> str:
    """Two fixed-width tables of a report's "methods", one row per method (MD first where it has the
    number): the estimates (ESS, mean energy, Delta F per basin) and the distances to MD."""
    methods, md_energy_mean = report["methods"], report["energy"]["md_mean"]
    keys = list(md_delta_f)
    estimates = [("method", "ESS", "mean u [kT]", *(f"dF {k} [kT]" for k in keys)),
                 ("MD", "", _fmt(md_energy_mean), *(_pm(md_delta_f[k]) for k in keys))]
    distances = [("method", "energy W1 [kT]", "energy W2 [kT]", "torus W2 [rad]", "TICA W2", "JSD [bits]",
                  *(f"dF {k} - MD [kT]" for k in keys))]
    for name, m in methods.items():
        e = m["energy"]
        mean = "-" if e["mean"] is None else f"{e['mean']:.2f} +- {e['stderr']:.2f}"
        estimates.append((name, _ess_text(m["ess"], m.get("unique_ancestors")), mean,
                          *(_pm(m["delta_f"].get(k)) for k in keys)))
        distances.append((name, _fmt(e["w1"]), _fmt(e["w2"]), _fmt(m["torus_w2"]), _fmt(m["tica_w2"]),
                          _fmt(m["ramachandran_jsd"]), *(_pm((m["delta_f"].get(k) or {}).get("minus_md")) for k in keys)))

    def render(rows: list[tuple[str, ...]]) -> str:
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    return (f"{render(estimates)}\n\n{render(distances)}\n(point-set W2 on {report['metrics']['w2_points']} "
            f"equal-mass points per set; see report.json metrics.definitions)")
