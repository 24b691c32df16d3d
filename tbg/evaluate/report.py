"""One-call evaluation of generated samples against MD: report.json + PNG plots + a summary table."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import scipy.special

from tbg.evaluate import metrics, plots
from tbg.evaluate.validity import ValidityChecker
from tbg.flow.reweight import clip_log_weights, kish_ess, log_importance_weights, weighted_mean

logger = logging.getLogger("tbg")

__all__ = ["evaluate", "summary_table", "REPORT_FILE"]

REPORT_FILE = "report.json"
_LABELS = ("MD", "model", "reweighted")


def _json_safe(obj: Any) -> Any:
    """numpy -> Python, non-finite floats -> None (strict JSON has no NaN/inf)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _as_array(a: Any, name: str, n: int) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if len(v) != n:
        raise ValueError(f"{name} has {len(v)} entries, expected {n} (one per sample)")
    if np.isnan(v).any():
        raise ValueError(f"{name} contains NaN")
    return v


def _energies(energy_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, what: str) -> np.ndarray:
    t = time.perf_counter()
    e = np.asarray(energy_fn(x), dtype=np.float64).reshape(-1)
    if len(e) != len(x):
        raise ValueError(f"energy_fn returned {len(e)} energies for {len(x)} {what}")
    logger.info("energies of %d %s in %.1f s", len(x), what, time.perf_counter() - t)
    return e


def evaluate(
    samples_nm: np.ndarray,
    *,
    topology: md.Topology,
    reference_positions_nm: np.ndarray,
    md_positions_nm: np.ndarray,
    out_dir: str | Path,
    energy_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    md_energies: np.ndarray | None = None,
    log_weights: np.ndarray | None = None,
    prior_energy: np.ndarray | None = None,
    dlogp: np.ndarray | None = None,
    clip_quantile: float | None = None,
    basins: Mapping[str, metrics.BasinDefinition] = metrics.RAMACHANDRAN_BASINS,
    bins: int = 60,
    n_bootstrap: int = 200,
    timeout_s: float = 5.0,
    seed: int = 0,
) -> tuple[dict[str, Any], str]:
    """Evaluate model samples of one molecule against its MD data; write report.json and plots.

    samples_nm [n, N, 3] (nm) model samples, atoms in the order of ``topology`` up to equivalent
    atoms; md_positions_nm [m, N, 3] MD frames in topology order. energy_fn(positions_nm [k, N, 3]) ->
    reduced energies u = U/kT [k] (e.g. ``EnergyModel(...).reduced_energy`` with unit="nm"); without it
    the energy metrics are null. Model energies are evaluated on the valid samples after reordering and
    mirroring (the raw order can put atoms on the wrong force-field parameters). md_energies, if given,
    replaces energy_fn for the MD frames.

    Importance weights, one of: log_weights [n] (aligned with samples_nm; entries of invalid samples
    are ignored), or prior_energy [n] and dlogp [n] from the sampler, combined with the model energies
    as log w = -u + prior_energy + dlogp (needs energy_fn). Without weights the reweighted entries are
    null. clip_quantile clips the largest log weights (tbg.flow.reweight.clip_log_weights) before the
    reweighted estimates; the unclipped ESS is reported either way. ESS and all reweighted quantities
    are over the valid samples (ess.kish_fraction = Kish ESS / number of valid samples).

    Free energies are in kT; torsion Wasserstein distances are circular W1 in radians (see
    tbg.evaluate.metrics). ``basins`` names the states whose free-energy difference is reported
    (report["delta_f"][key], one entry per definition, with the definition itself): by default alpha_R vs
    beta/PII along psi, which the shipped MD samples, and the published alpha_L (0 < phi < 2) vs rest.
    md_positions_nm must be in time order: the MD error bars resample blocks of consecutive frames.
    Returns (report dict, as written to out_dir/report.json; summary table string).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = np.asarray(samples_nm)
    md_x = np.asarray(md_positions_nm)
    n_atoms = topology.n_atoms
    if md_x.ndim != 3 or md_x.shape[1:] != (n_atoms, 3) or len(md_x) == 0:
        raise ValueError(f"md_positions_nm must be [m>0, {n_atoms}, 3], got {md_x.shape}")
    if not np.isfinite(md_x).all():
        raise ValueError("md_positions_nm contains NaN/inf")
    if log_weights is not None and (prior_energy is not None or dlogp is not None):
        raise ValueError("give either log_weights or (prior_energy, dlogp), not both")
    if (prior_energy is None) != (dlogp is None):
        raise ValueError("prior_energy and dlogp must be given together")
    if prior_energy is not None and energy_fn is None:
        raise ValueError("prior_energy/dlogp need energy_fn to form log weights")

    checker = ValidityChecker(topology, reference_positions_nm)
    result = checker.check(x, timeout_s=timeout_s, progress=len(x) > 50_000)
    md_rate = checker.check(md_x, timeout_s=timeout_s).rate
    valid_idx = np.flatnonzero(result.valid)
    xv = result.samples_nm[valid_idx]
    n, n_valid = len(x), len(valid_idx)

    # ---- energies and weights (model quantities are over valid samples only)
    e_md = e_model = None
    if md_energies is not None:
        e_md = _as_array(md_energies, "md_energies", len(md_x))
    elif energy_fn is not None:
        e_md = _energies(energy_fn, md_x, "MD frames")
    if energy_fn is not None and n_valid:
        e_model = _energies(energy_fn, xv, "valid samples")
    log_w = None
    if log_weights is not None:
        log_w = _as_array(log_weights, "log_weights", n)[valid_idx]
    elif prior_energy is not None and e_model is not None:
        pe = _as_array(prior_energy, "prior_energy", n)[valid_idx]
        dl = _as_array(dlogp, "dlogp", n)[valid_idx]
        log_w = log_importance_weights(e_model, pe, dl).numpy()
    if log_w is not None and not np.isfinite(log_w).any():
        logger.warning("no valid sample has a finite log weight: reweighted metrics are null")
        log_w = None
    ess = {"kish_fraction": None, "kish_n": None, "n_weighted": n_valid if log_w is not None else 0,
           "clip_quantile": clip_quantile, "kish_fraction_clipped": None}
    log_w_used = None
    if log_w is not None:
        ess["kish_fraction"] = kish_ess(log_w)
        ess["kish_n"] = ess["kish_fraction"] * n_valid
        log_w_used = log_w
        if clip_quantile is not None:
            log_w_used = clip_log_weights(log_w, clip_quantile).numpy()
            ess["kish_fraction_clipped"] = kish_ess(log_w_used)
    w_used = metrics.weights_from_log(log_w_used, n_valid) if log_w_used is not None else None

    # ---- energy metrics
    energy: dict[str, Any] = dict.fromkeys(
        ["md_mean", "model_mean", "reweighted_mean", "reweighted_stderr", "model_n_nonfinite",
         "wasserstein_model", "wasserstein_reweighted"])
    energy_series: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if e_md is not None:
        if not np.isfinite(e_md).all():
            raise ValueError("MD energies contain NaN/inf")
        energy["md_mean"] = float(e_md.mean())
        energy_series["MD"] = (e_md, None)
    if e_model is not None:
        finite = np.isfinite(e_model)
        energy["model_n_nonfinite"] = int((~finite).sum())
        if finite.any():
            energy["model_mean"] = float(e_model[finite].mean())
            energy_series["model"] = (e_model[finite], None)
            energy["wasserstein_model"] = metrics.wasserstein_1d(e_md, e_model[finite])
        if log_w_used is not None:
            # Non-finite energies get weight 0 from log_importance_weights; user-given log weights
            # that put weight on them are inconsistent with the energy model.
            positive = np.isfinite(log_w_used)
            if (positive & ~finite).any():
                raise ValueError("log_weights give positive weight to samples with non-finite energy")
            mean, se = weighted_mean(e_model, log_w_used)
            energy["reweighted_mean"], energy["reweighted_stderr"] = mean, se
            energy["wasserstein_reweighted"] = metrics.wasserstein_1d(
                e_md, e_model[positive], None, log_w_used[positive])
            energy_series["reweighted"] = (e_model[positive],
                                           metrics.weights_from_log(log_w_used[positive], int(positive.sum())))

    # ---- torsions, free energies, basin Delta F
    tors_md = metrics.backbone_torsions(md_x, topology)
    tors_model = metrics.backbone_torsions(xv, topology) if n_valid else {}
    torsions: dict[str, Any] = {}
    free_energy: dict[str, Any] = {"bins": None}
    for name, (atoms, a_md) in tors_md.items():
        entry = {"atoms": atoms, "wasserstein_model": None, "wasserstein_reweighted": None}
        profiles = {"MD": metrics.free_energy_profile(a_md, bins=bins)}
        if name in tors_model:
            a_model = tors_model[name][1]
            entry["wasserstein_model"] = metrics.circular_wasserstein(a_md, a_model)
            profiles["model"] = metrics.free_energy_profile(a_model, bins=bins)
            if log_w_used is not None:
                entry["wasserstein_reweighted"] = metrics.circular_wasserstein(a_md, a_model, None, log_w_used)
                profiles["reweighted"] = metrics.free_energy_profile(a_model, log_w_used, bins=bins)
        torsions[name] = entry
        free_energy["bins"] = profiles["MD"][0]
        free_energy[name] = {label: profiles[label][1] if label in profiles else None for label in _LABELS}
        plots.plot_free_energy(out / f"free_energy_{name}.png", name, profiles)

    delta_f = {key: _delta_f_entry(definition, tors_md, tors_model, log_w_used, n_bootstrap, seed)
               for key, definition in basins.items()}

    # ---- plots
    written = {}
    if energy_series:
        written["energy_histogram"] = plots.plot_energy_histograms(out / "energy_histogram.png", energy_series)
    if "phi" in tors_md and "psi" in tors_md:
        panels = {"MD": (tors_md["phi"][1], tors_md["psi"][1], None)}
        if "phi" in tors_model:
            panels["model"] = (tors_model["phi"][1], tors_model["psi"][1], None)
            if w_used is not None:
                panels["reweighted"] = (tors_model["phi"][1], tors_model["psi"][1], w_used)
        written["ramachandran"] = plots.plot_ramachandran(out / "ramachandran.png", panels)
    for name in tors_md:
        written[f"free_energy_{name}"] = out / f"free_energy_{name}.png"
    if log_w is not None:
        written["log_weights"] = plots.plot_log_weights(out / "log_weights.png", log_w)

    report = {
        "n_samples": n,
        "n_valid": n_valid,
        "correct_configuration_rate": result.rate,
        "n_mirrored": int(result.mirrored.sum()),
        "invalid_reasons": result.reason_counts(),
        "n_graphs_searched": result.n_graphs_searched,
        "n_isomorphism_timeouts": result.n_timeouts,
        "md_n_frames": len(md_x),
        "md_correct_configuration_rate": md_rate,
        "ess": ess,
        "energy": energy,
        "torsions": torsions,
        "free_energy": free_energy,
        "delta_f": delta_f,
        "plots": {k: Path(v).name for k, v in written.items()},
        "timings_s": {**{f"validity_{k}": v for k, v in result.timings.items()},
                      "total": time.perf_counter() - t_start},
    }
    report = _json_safe(report)
    with open(out / REPORT_FILE, "w") as fh:
        json.dump(report, fh, indent=1, allow_nan=False)
    table = summary_table(report)
    logger.info("evaluation written to %s\n%s", out, table)
    return report, table


def _delta_f_entry(definition: metrics.BasinDefinition, tors_md: dict, tors_model: dict,
                   log_w: np.ndarray | None, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """MD / model / reweighted Delta F of one basin definition, and model - MD, reweighted - MD."""
    entry: dict[str, Any] = {
        "definition": {**definition.describe(),
                       "formula": "F(basin) - F(reference) = -log(P(basin)/P(reference)) in kT; p_basin = "
                                  "P(basin)/(P(basin)+P(reference)); stderr: bootstrap std (MD: blocks of "
                                  "md_block_frames consecutive frames, null when fewer than "
                                  f"{metrics.MIN_BLOCKS} blocks fit); value null when a state is empty; "
                                  "minus_md errors add in quadrature"},
        "md_block_frames": None, **dict.fromkeys(_LABELS)}
    if not definition.torsions <= set(tors_md):
        return entry
    in_md = definition.masks({name: a for name, (_, a) in tors_md.items()})
    # MD frames are a time series: resample blocks spanning a few stays in a state (basin, reference, neither).
    block = metrics.block_length(in_md[0] + 2 * in_md[1])
    entry["md_block_frames"] = block
    sources: dict[str, tuple[tuple[np.ndarray, np.ndarray], np.ndarray | None, int]] = {"MD": (in_md, None, block)}
    if definition.torsions <= set(tors_model):
        in_model = definition.masks({name: a for name, (_, a) in tors_model.items()})
        sources["model"] = (in_model, None, 1)
        if log_w is not None:
            sources["reweighted"] = (in_model, log_w, 1)
    for label, ((in_a, in_b), lw, blk) in sources.items():
        value, se = metrics.state_free_energy_difference(in_a, in_b, lw, n_bootstrap=n_bootstrap, seed=seed,
                                                         block=blk)
        if label == "MD" and math.isfinite(value) and not math.isfinite(se):
            logger.warning("dF %s: the %d MD frames change state too rarely for an error bar (bootstrap blocks "
                           "of %d frames); stderr is null", definition.label, len(in_a), blk)
        # P(basin) stays informative when a state is empty and Delta F is infinite (null in JSON).
        entry[label] = {"value": value, "stderr": se, "p_basin": float(scipy.special.expit(-value)),
                        "n_basin": int(in_a.sum()), "n_reference": int(in_b.sum())}
    md = entry["MD"]
    for label in _LABELS[1:]:
        e = entry[label]
        if e is not None:
            finite = md is not None and math.isfinite(md["value"]) and math.isfinite(e["value"])
            # Independent estimates: their errors add in quadrature.
            e["minus_md"] = {"value": e["value"] - md["value"] if finite else None,
                             "stderr": math.hypot(e["stderr"], md["stderr"]) if finite else None}
    return entry


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _pm(entry: dict | None) -> str:
    """value +- stderr of a Delta F entry; P(basin) when a state is empty; - when there is none."""
    if entry is None:
        return "-"
    if entry["value"] is None:
        return f"P(basin)={entry['p_basin']:.3g}" if "p_basin" in entry else "-"
    return f"{entry['value']:.2f} +- {_fmt(entry['stderr'], '.2f')}"


def summary_table(report: dict[str, Any]) -> str:
    """A short fixed-width table of the headline numbers of a report."""
    e, t, d = report["energy"], report["torsions"], report["delta_f"]
    rows = [
        ("correct configurations", f"{100 * report['md_correct_configuration_rate']:.1f}%",
         f"{100 * report['correct_configuration_rate']:.1f}%", ""),
        ("ESS (Kish)", "", "",
         "-" if report["ess"]["kish_fraction"] is None else f"{100 * report['ess']['kish_fraction']:.2f}%"),
        ("mean energy [kT]", _fmt(e["md_mean"]), _fmt(e["model_mean"]), _fmt(e["reweighted_mean"])),
        ("W1 energy to MD [kT]", "", _fmt(e["wasserstein_model"]), _fmt(e["wasserstein_reweighted"])),
    ]
    for name, entry in t.items():
        rows.append((f"W1 {name} to MD [rad]", "", _fmt(entry["wasserstein_model"]),
                     _fmt(entry["wasserstein_reweighted"])))
    for entry in d.values():
        rows.append((f"dF {entry['definition']['label']} [kT]", *(_pm(entry[label]) for label in _LABELS)))
        rows.append(("  minus MD [kT]", "",
                     *(_pm(entry[label] and entry[label]["minus_md"]) for label in _LABELS[1:])))
    header = ("metric", *_LABELS)
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)
