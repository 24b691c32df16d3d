"""One-call evaluation of generated samples against MD: report.json + PNG plots + a summary table.

``evaluate`` runs named steps, each usable alone: ``check_validity`` (bond graphs, chirality; invalid
samples are dropped, mirrored ones fixed), ``compute_energies`` (MD frames and valid samples),
``reweight`` (importance weights and ESS), ``energy_metrics``, ``free_energies`` (torsion profiles,
Wasserstein distances, basin Delta F), ``compare`` (every method side by side with the field's metrics:
the flow's samples, plain importance sampling, IS with each tail treatment, refined samples;
tbg.evaluate.methods), ``write_plots`` and ``write_report``. Model quantities are over the valid samples
only. "reweighted" is plain importance sampling throughout: tail treatments (clipped weights, an energy
cutoff) appear only beside it, in the methods.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mdtraj as md
import numpy as np
import scipy.special

from tbg.evaluate import metrics, plots
from tbg.evaluate.methods import MDReference, MethodSamples, compare_methods, methods_table
from tbg.evaluate.validity import ValidityChecker, ValidityResult
from tbg.flow.reweight import (kish_ess, log_importance_weights, normalized_weights, pareto_k, tail_treatments,
                               weighted_mean)
from tbg.runfolder import write_atomically

logger = logging.getLogger("tbg")

__all__ = ["REPORT_FILE", "Energies", "EvaluationOptions", "FreeEnergies", "MDFrames", "MethodSamples", "ModelSamples",
           "Molecule", "Reweighting", "Validity", "check_validity", "compare", "compute_energies", "energy_metrics",
           "evaluate", "free_energies", "reweight", "summary_table", "write_plots", "write_report"]

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


def _as_array(a: Any, name: str, n: int, *, allow_nonfinite: bool = False) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if len(v) != n:
        raise ValueError(f"{name} has {len(v)} entries, expected {n} (one per sample)")
    if not allow_nonfinite and np.isnan(v).any():
        raise ValueError(f"{name} contains NaN")
    return v


def _energies(energy_fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, what: str) -> np.ndarray:
    t = time.perf_counter()
    e = np.asarray(energy_fn(x), dtype=np.float64).reshape(-1)
    if len(e) != len(x):
        raise ValueError(f"energy_fn returned {len(e)} energies for {len(x)} {what}")
    logger.info("energies of %d %s in %.1f s", len(x), what, time.perf_counter() - t)
    return e


@dataclass
class Molecule:
    """The molecule evaluated: its topology, a reference structure [N, 3] in nm (bond graph and chirality of
    a correct configuration) and optionally ``energy_fn(positions_nm [k, N, 3]) -> u = U/kT [k]`` (e.g.
    ``EnergyModel(...).reduced_energy`` with unit="nm"); without it the energy metrics are null."""

    topology: md.Topology
    reference_positions_nm: np.ndarray
    energy_fn: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class ModelSamples:
    """Model samples [n, N, 3] in nm, atoms in topology order up to equivalent atoms, with optional
    importance weights, one of: ``log_weights`` [n] (entries of invalid samples are ignored), or
    ``prior_energy`` [n] and ``dlogp`` [n] from the sampler, combined with the model energies as
    log w = -u + prior_energy + dlogp (needs the molecule's energy_fn). Samples whose prior_energy or dlogp
    is not finite (an integration that blew up) get weight 0 and are counted in the report."""

    positions_nm: np.ndarray
    log_weights: np.ndarray | None = None
    prior_energy: np.ndarray | None = None
    dlogp: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.positions_nm = np.asarray(self.positions_nm)
        if self.log_weights is not None and (self.prior_energy is not None or self.dlogp is not None):
            raise ValueError("give either log_weights or (prior_energy, dlogp), not both")
        if (self.prior_energy is None) != (self.dlogp is None):
            raise ValueError("prior_energy and dlogp must be given together")
        n = len(self.positions_nm)
        for name in ("log_weights", "prior_energy", "dlogp"):
            if getattr(self, name) is not None:
                setattr(self, name, _as_array(getattr(self, name), name, n, allow_nonfinite=name != "log_weights"))


@dataclass
class MDFrames:
    """MD frames [m, N, 3] in nm in time order (the MD error bars resample blocks of consecutive frames);
    ``energies`` [m] (reduced), if given, replace the molecule's energy_fn for them."""

    positions_nm: np.ndarray
    energies: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.positions_nm = np.asarray(self.positions_nm)
        if self.energies is not None:
            self.energies = _as_array(self.energies, "md_energies", len(self.positions_nm))


@dataclass
class EvaluationOptions:
    """Tail treatments of the importance weights, each reported as a method beside plain IS (never instead
    of it): ``clip_quantiles``, clip the largest log weights at each quantile
    (tbg.flow.reweight.clip_log_weights); ``energy_cutoffs``, weight 0 for samples whose reduced energy lies
    more than each value (kT) above the MD frames' mean energy (relative to MD, so that one value serves
    molecules of any size and energy offset; needs the energies). ``basins`` names the states whose
    free-energy difference is reported; ``bins`` of the free-energy profiles; ``n_bootstrap`` resamples
    for their error bars; ``timeout_s`` per isomorphism search of the validity check; ``w2_points``
    equal-mass points per set of the point-set W2 metrics (torus, TICA; the assignment costs O(m^3));
    ``tica_lag`` the TICA lag in frames of the MD frames given (in time order)."""

    clip_quantiles: Sequence[float] = ()
    energy_cutoffs: Sequence[float] = ()
    basins: Mapping[str, metrics.BasinDefinition] = field(default_factory=lambda: metrics.RAMACHANDRAN_BASINS)
    bins: int = 60
    n_bootstrap: int = 200
    timeout_s: float = 5.0
    w2_points: int = 1000
    tica_lag: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.clip_quantiles, self.energy_cutoffs = tuple(self.clip_quantiles), tuple(self.energy_cutoffs)
        if not all(0 < q <= 1 for q in self.clip_quantiles):
            raise ValueError(f"clip quantiles must be in (0, 1], got {self.clip_quantiles}")
        if not all(math.isfinite(c) for c in self.energy_cutoffs):
            raise ValueError(f"energy cutoffs must be finite, got {self.energy_cutoffs}")
        if self.w2_points < 1 or self.tica_lag < 1:
            raise ValueError(f"need w2_points >= 1 and tica_lag >= 1, got {self.w2_points}, {self.tica_lag}")


@dataclass
class Validity:
    """The validity check of the samples and of the MD frames; ``positions_nm`` are the valid samples,
    reordered to the topology's atom order and mirrored back where needed."""

    result: ValidityResult
    md_rate: float
    md_n_frames: int
    valid_idx: np.ndarray
    positions_nm: np.ndarray


@dataclass
class Energies:
    """Reduced energies of the MD frames and of the valid samples (None when not computed)."""

    md: np.ndarray | None
    model: np.ndarray | None


@dataclass
class Reweighting:
    """Log importance weights of the valid samples (``log_w``, None without weights), the ESS entry of the
    report and the counts of samples whose weight is 0 because a number in it is not finite
    (``n_nonfinite``: dlogp and prior_energy among all samples, energy among the valid ones; None where the
    quantity is absent)."""

    log_w: np.ndarray | None
    ess: dict[str, Any]
    n_nonfinite: dict[str, int | None] = field(default_factory=dict)

    @property
    def weights(self) -> np.ndarray | None:
        """Normalised weights of the reweighted estimates."""
        return None if self.log_w is None else metrics.weights_from_log(self.log_w, len(self.log_w))


@dataclass
class FreeEnergies:
    """Torsion entries, free-energy profiles and basin Delta F of the report, and the torsions themselves
    (name -> (atoms, angles)) for the plots."""

    torsions: dict[str, Any]
    free_energy: dict[str, Any]
    delta_f: dict[str, Any]
    profiles: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]  # (centres, F, stderr of F)
    md_angles: dict[str, tuple[Any, np.ndarray]]
    model_angles: dict[str, tuple[Any, np.ndarray]]


def evaluate(samples: ModelSamples, molecule: Molecule, md_frames: MDFrames, out_dir: str | Path,
             options: EvaluationOptions | None = None, *,
             refined: Sequence[MethodSamples] = ()) -> tuple[dict[str, Any], str]:
    """Evaluate model samples of one molecule against its MD frames; write report.json and plots.

    Model energies are evaluated on the valid samples after reordering and mirroring (the raw order can
    put atoms on the wrong force-field parameters). ESS and all reweighted quantities are over the valid
    samples (ess.kish_fraction = Kish ESS / number of valid samples; ess.log_weight_std, in nats, and
    ess.largest_weight, the largest normalised weight, say how much one draw's ESS can be trusted, and
    ess.pareto_k, the fitted tail shape of the weights (tbg.flow.reweight.pareto_k), whether the reweighted
    estimates can be: above 0.7 they cannot). Free
    energies are in kT; torsion Wasserstein distances are circular W1 in radians (see
    tbg.evaluate.metrics). By default the basins are alpha_R vs beta/PII along psi, which the shipped MD
    samples, and the published alpha_L (0 < phi < 2) vs rest. ``refined`` are samples of refinement
    methods (SMC, MCMC) of the same molecule, positions [n, N, 3] in nm as sampled (checked for validity
    here, energies computed here), scored beside IS (``compare``). Returns (report dict, as written to
    out_dir/report.json; summary table string).
    """
    options = options or EvaluationOptions()
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_md_frames(md_frames, molecule.topology.n_atoms)
    if samples.prior_energy is not None and molecule.energy_fn is None:
        raise ValueError("prior_energy/dlogp need energy_fn to form log weights")

    validity = check_validity(samples, molecule, md_frames, options.timeout_s)
    energies = compute_energies(molecule, md_frames, validity.positions_nm)
    weights = reweight(samples, validity, energies)
    energy, energy_series = energy_metrics(energies, weights)
    free = free_energies(md_frames, validity, molecule.topology, weights, options)
    comparison = compare(molecule, md_frames, validity, energies, weights, free, options, refined)
    written = write_plots(out, energy_series, free, weights, comparison, options.basins)
    report = write_report(out, validity, weights, energy, free, comparison, written, time.perf_counter() - t_start)
    table = summary_table(report)
    logger.info("evaluation written to %s\n%s", out, table)
    return report, table


def _check_md_frames(md_frames: MDFrames, n_atoms: int) -> None:
    md_x = md_frames.positions_nm
    if md_x.ndim != 3 or md_x.shape[1:] != (n_atoms, 3) or len(md_x) == 0:
        raise ValueError(f"md_positions_nm must be [m>0, {n_atoms}, 3], got {md_x.shape}")
    if not np.isfinite(md_x).all():
        raise ValueError("md_positions_nm contains NaN/inf")


def check_validity(samples: ModelSamples, molecule: Molecule, md_frames: MDFrames, timeout_s: float) -> Validity:
    """Correct configurations among the samples (and the rate among the MD frames, as a check of the rule)."""
    checker = ValidityChecker(molecule.topology, molecule.reference_positions_nm)
    x = samples.positions_nm
    result = checker.check(x, timeout_s=timeout_s, progress=len(x) > 50_000)
    md_rate = checker.check(md_frames.positions_nm, timeout_s=timeout_s).rate
    valid_idx = np.flatnonzero(result.valid)
    return Validity(result, md_rate, len(md_frames.positions_nm), valid_idx, result.samples_nm[valid_idx])


def compute_energies(molecule: Molecule, md_frames: MDFrames, valid_positions_nm: np.ndarray) -> Energies:
    """Reduced energies of the MD frames (given or from energy_fn) and of the valid samples."""
    e_md = md_frames.energies
    if e_md is None and molecule.energy_fn is not None:
        e_md = _energies(molecule.energy_fn, md_frames.positions_nm, "MD frames")
    e_model = None
    if molecule.energy_fn is not None and len(valid_positions_nm):
        e_model = _energies(molecule.energy_fn, valid_positions_nm, "valid samples")
    return Energies(e_md, e_model)


def reweight(samples: ModelSamples, validity: Validity, energies: Energies) -> Reweighting:
    """Log importance weights of the valid samples and their Kish ESS."""
    valid_idx, n_valid = validity.valid_idx, len(validity.valid_idx)
    log_w = None
    if samples.log_weights is not None:
        log_w = samples.log_weights[valid_idx]
    elif samples.prior_energy is not None and energies.model is not None:
        log_w = log_importance_weights(energies.model, samples.prior_energy[valid_idx],
                                       samples.dlogp[valid_idx]).numpy()
    def count(values: np.ndarray | None) -> int | None:
        return None if values is None else int((~np.isfinite(values)).sum())

    n_nonfinite = {"dlogp": count(samples.dlogp), "prior_energy": count(samples.prior_energy),
                   "energy": count(energies.model)}
    if any(n_nonfinite.values()):
        logger.warning("samples with non-finite values get weight 0 (counted in report.json n_nonfinite): %s",
                       ", ".join(f"{k} {v}" for k, v in n_nonfinite.items() if v))
    if log_w is not None and not np.isfinite(log_w).any():
        logger.warning("no valid sample has a finite log weight: reweighted metrics are null")
        log_w = None
    # The Kish ESS of one draw is set by its largest weights; the spread of the log-weights and the share
    # of the largest weight say how far that number can be trusted (a spread of many nats means the ESS
    # of a few thousand samples is not yet converged).
    finite = log_w[np.isfinite(log_w)] if log_w is not None else np.empty(0)
    ess = {"kish_fraction": None, "kish_n": None, "n_weighted": len(finite), "log_weight_std": None,
           "largest_weight": None, "pareto_k": None}
    if log_w is not None:
        ess["kish_fraction"] = kish_ess(log_w)
        ess["kish_n"] = ess["kish_fraction"] * n_valid
        ess["log_weight_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else None
        ess["largest_weight"] = float(normalized_weights(log_w).max())
        ess["pareto_k"] = pareto_k(log_w)
    return Reweighting(log_w, ess, n_nonfinite)


def energy_metrics(energies: Energies, weights: Reweighting
                   ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    """The report's energy entry (means, Wasserstein distances to MD) and the series for the histogram."""
    energy: dict[str, Any] = dict.fromkeys(
        ["md_mean", "model_mean", "reweighted_mean", "reweighted_stderr", "model_n_nonfinite",
         "wasserstein_model", "wasserstein_reweighted"])
    series: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    e_md, e_model, log_w = energies.md, energies.model, weights.log_w
    if e_md is not None:
        if not np.isfinite(e_md).all():
            raise ValueError("MD energies contain NaN/inf")
        energy["md_mean"] = float(e_md.mean())
        series["MD"] = (e_md, None)
    if e_model is None:
        return energy, series
    finite = np.isfinite(e_model)
    energy["model_n_nonfinite"] = int((~finite).sum())
    if finite.any():
        energy["model_mean"] = float(e_model[finite].mean())
        series["model"] = (e_model[finite], None)
        energy["wasserstein_model"] = metrics.wasserstein_1d(e_md, e_model[finite])
    if log_w is not None:
        # Non-finite energies get weight 0 from log_importance_weights; user-given log weights that put
        # weight on them are inconsistent with the energy model.
        positive = np.isfinite(log_w)
        if (positive & ~finite).any():
            raise ValueError("log_weights give positive weight to samples with non-finite energy")
        energy["reweighted_mean"], energy["reweighted_stderr"] = weighted_mean(e_model, log_w)
        energy["wasserstein_reweighted"] = metrics.wasserstein_1d(e_md, e_model[positive], None, log_w[positive])
        series["reweighted"] = (e_model[positive], metrics.weights_from_log(log_w[positive], int(positive.sum())))
    return energy, series


def free_energies(md_frames: MDFrames, validity: Validity, topology: md.Topology, weights: Reweighting,
                  options: EvaluationOptions) -> FreeEnergies:
    """Backbone torsions of MD and valid samples: free-energy profiles, circular W1 to MD, basin Delta F."""
    tors_md = metrics.backbone_torsions(md_frames.positions_nm, topology)
    tors_model = metrics.backbone_torsions(validity.positions_nm, topology) if len(validity.valid_idx) else {}
    log_w = weights.log_w
    torsions: dict[str, Any] = {}
    free_energy: dict[str, Any] = {"bins": None}
    all_profiles: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    md_block = _md_block_frames(tors_md, options.basins)

    def profile(angles: np.ndarray, lw: np.ndarray | None, block: int) -> tuple[np.ndarray, ...]:
        """(bin centres, F, bootstrap standard error of F) of one set of angles."""
        se = metrics.free_energy_profile_stderr(angles, lw, bins=options.bins, n_bootstrap=options.n_bootstrap,
                                                seed=options.seed, block=block)
        return (*metrics.free_energy_profile(angles, lw, bins=options.bins), se)

    for name, (atoms, a_md) in tors_md.items():
        entry = {"atoms": atoms, "wasserstein_model": None, "wasserstein_reweighted": None}
        profiles = {"MD": profile(a_md, None, md_block)}
        if name in tors_model:
            a_model = tors_model[name][1]
            entry["wasserstein_model"] = metrics.circular_wasserstein(a_md, a_model)
            profiles["model"] = profile(a_model, None, 1)
            if log_w is not None:
                entry["wasserstein_reweighted"] = metrics.circular_wasserstein(a_md, a_model, None, log_w)
                profiles["reweighted"] = profile(a_model, log_w, 1)
        torsions[name] = entry
        free_energy["bins"] = profiles["MD"][0]
        free_energy[name] = {label: profiles[label][1] if label in profiles else None for label in _LABELS}
        all_profiles[name] = profiles
    delta_f = {key: _delta_f_entry(definition, tors_md, tors_model, log_w, options.n_bootstrap, options.seed)
               for key, definition in options.basins.items()}
    return FreeEnergies(torsions, free_energy, delta_f, all_profiles, tors_md, tors_model)


def _md_block_frames(tors_md: dict, basins: Mapping[str, metrics.BasinDefinition]) -> int:
    """Bootstrap block length of the MD frames for the free-energy profiles: that of the first basin
    definition's states (the slow transitions set the frames' correlation), 1 without one."""
    angles = {name: a for name, (_, a) in tors_md.items()}
    for definition in basins.values():
        if definition.torsions <= set(angles):
            in_basin, in_reference = definition.masks(angles)
            return metrics.block_length(in_basin + 2 * in_reference)
    return 1


def _treatment_names(clip_quantiles: Sequence[float], energy_cutoffs: Sequence[float]) -> list[str]:
    """Method names of plain IS and each tail treatment, in the order of tbg.flow.reweight.tail_treatments."""
    return (["IS"] + [f"IS clip q={q:g}" for q in clip_quantiles]
            + [f"IS u<=MD+{c:g}kT" for c in energy_cutoffs])


def compare(molecule: Molecule, md_frames: MDFrames, validity: Validity, energies: Energies, weights: Reweighting,
            free: FreeEnergies, options: EvaluationOptions, refined: Sequence[MethodSamples] = ()) -> dict[str, Any]:
    """Every method side by side against MD (tbg.evaluate.methods): the flow's valid samples ("model"),
    plain IS and IS with each tail treatment of ``options``, and the ``refined`` samples (validity checked
    and energies computed here, as for the model's). Returns the report's "methods" and "metrics" entries."""
    sets = [MethodSamples("model", "flow", validity.positions_nm, energies.model)]
    if weights.log_w is not None:
        cutoffs = options.energy_cutoffs
        if cutoffs and (energies.md is None or energies.model is None):
            logger.warning("no energy-cutoff treatment without energies")
            cutoffs = ()
        absolute = [float(energies.md.mean()) + c for c in cutoffs]
        treated = tail_treatments(weights.log_w, reduced_energy=energies.model if cutoffs else None,
                                  clip_quantiles=options.clip_quantiles, energy_cutoffs=absolute)
        described = [{}] + [{"treatment": f"log weights clipped at their {q:g} quantile"}
                            for q in options.clip_quantiles] + \
            [{"treatment": f"weight 0 above u = {a:.2f} kT (MD mean + {c:g} kT)", "energy_cutoff_u": a}
             for c, a in zip(cutoffs, absolute)]
        for name, treatment, info in zip(_treatment_names(options.clip_quantiles, cutoffs), treated.values(),
                                         described):
            sets.append(MethodSamples(name, "IS" if not info else "IS + tail treatment", validity.positions_nm,
                                      energies.model, treatment.log_w.numpy(), info=info))
    checker = ValidityChecker(molecule.topology, molecule.reference_positions_nm) if refined else None
    for r in refined:
        result = checker.check(np.asarray(r.positions_nm), timeout_s=options.timeout_s)
        valid = np.flatnonzero(result.valid)
        positions = result.samples_nm[valid]
        e = _energies(molecule.energy_fn, positions, f"valid {r.name} samples") \
            if molecule.energy_fn is not None and len(valid) else None
        log_w = None if r.log_w is None else np.asarray(r.log_w, dtype=np.float64)[valid]
        if log_w is not None and e is not None:  # broken configurations carry no weight
            log_w = np.where(np.isfinite(e), log_w, -np.inf)
        sets.append(replace(r, positions_nm=positions, energies=e, log_w=log_w,
                            info={**r.info, "n_samples": len(result.valid), "correct_configuration_rate": result.rate}))
    md_reference = MDReference(md_frames.positions_nm, energies.md,
                               {name: a for name, (_, a) in free.md_angles.items()},
                               {key: entry["MD"] for key, entry in free.delta_f.items()})
    return compare_methods(md_reference, sets, molecule.topology, basins=options.basins,
                           n_bootstrap=options.n_bootstrap, seed=options.seed, w2_points=options.w2_points,
                           tica_lag=options.tica_lag)


def write_plots(out: Path, energy_series: dict[str, tuple[np.ndarray, np.ndarray | None]], free: FreeEnergies,
                weights: Reweighting, comparison: Mapping[str, Any] | None = None,
                basins: Mapping[str, metrics.BasinDefinition] | None = None) -> dict[str, Path]:
    """Energy histograms, Ramachandran panels (``basins`` outlined), free-energy profiles with error bands,
    the log-weight histogram and the methods' metrics (those the data allow); returns name -> file."""
    written: dict[str, Path] = {}
    if energy_series:
        written["energy_histogram"] = plots.plot_energy_histograms(out / "energy_histogram.png", energy_series)
    tors_md, tors_model = free.md_angles, free.model_angles
    if "phi" in tors_md and "psi" in tors_md:
        panels = {"MD": (tors_md["phi"][1], tors_md["psi"][1], None)}
        if "phi" in tors_model:
            panels["model"] = (tors_model["phi"][1], tors_model["psi"][1], None)
            if weights.log_w is not None:
                panels["reweighted"] = (tors_model["phi"][1], tors_model["psi"][1], weights.weights)
        written["ramachandran"] = plots.plot_ramachandran(out / "ramachandran.png", panels, basins=basins)
    for name, profiles in free.profiles.items():
        written[f"free_energy_{name}"] = plots.plot_free_energy(out / f"free_energy_{name}.png", name, profiles)
    if weights.log_w is not None:
        written["log_weights"] = plots.plot_log_weights(out / "log_weights.png", weights.log_w)
    if comparison is not None and comparison["methods"]:
        written["method_metrics"] = plots.plot_method_metrics(out / "method_metrics.png", comparison["methods"],
                                                              comparison["metrics"]["w2_points"])
    return written


def write_report(out: Path, validity: Validity, weights: Reweighting, energy: dict[str, Any], free: FreeEnergies,
                 comparison: Mapping[str, Any], written: dict[str, Path], seconds: float) -> dict[str, Any]:
    """Assemble the report (JSON-safe: non-finite values become null) and write out/report.json."""
    result = validity.result
    report = {
        "n_samples": len(result.valid),
        "n_valid": len(validity.valid_idx),
        "correct_configuration_rate": result.rate,
        "n_mirrored": int(result.mirrored.sum()),
        "invalid_reasons": result.reason_counts(),
        "n_graphs_searched": result.n_graphs_searched,
        "n_isomorphism_timeouts": result.n_timeouts,
        "md_n_frames": validity.md_n_frames,
        "md_correct_configuration_rate": validity.md_rate,
        "ess": weights.ess,
        "n_nonfinite": weights.n_nonfinite,
        "energy": energy,
        "torsions": free.torsions,
        "free_energy": free.free_energy,
        "delta_f": free.delta_f,
        "methods": comparison["methods"],
        "metrics": comparison["metrics"],
        "plots": {k: Path(v).name for k, v in written.items()},
        "timings_s": {**{f"validity_{k}": v for k, v in result.timings.items()}, "total": seconds},
    }
    report = _json_safe(report)
    write_atomically(out / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=1, allow_nan=False)))
    return report


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
        ("non-finite dlogp/prior/u", "", "/".join(_fmt(report["n_nonfinite"][k], "d")
                                                  for k in ("dlogp", "prior_energy", "energy")), ""),
        ("ESS (Kish)", "", "",
         "-" if report["ess"]["kish_fraction"] is None else f"{100 * report['ess']['kish_fraction']:.2f}%"),
        ("log-weight std [nats]", "", "", _fmt(report["ess"].get("log_weight_std"))),
        ("largest weight", "", "", _fmt(report["ess"].get("largest_weight"))),
        ("Pareto k of the weights", "", "", _fmt(report["ess"].get("pareto_k"))),
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
    table = "\n".join(lines)
    if report.get("methods"):
        table += "\n\n" + methods_table(report, {key: entry["MD"] for key, entry in d.items()})
    return table
