"""The demo (what `tbg demo` runs): a Boltzmann generator end to end on one molecule's MD data.

Two ways, chosen by the caller (the CLI's presets):

- with a shipped model (``model``: a run folder of ``tbg.flow.runs.SHIPPED_MODELS`` for this molecule):
  stage 1 is a training demonstration, a short run of the flow-matching stage of the shipped model's
  recipe from scratch (not the model sampled afterwards; its losses are compared with the shipped run's
  log at the same steps), and
  stages 2-3 sample the shipped model with exact likelihoods and evaluate it;
- without one: stage 1 trains the model that stages 2-3 sample (the published recipe, ``--full``).

An optional refinement stage (``refinement``: SMC and/or independence MH on the samples, tbg.flow.refine.runs)
runs after sampling; the evaluation then scores the refined samples beside importance sampling.

Every stage resumes from what is on disk. The summary leads with the numbers that say whether the
Boltzmann generator works: correct configurations, ESS with its number of effective samples, the energy
distance to MD before and after reweighting, and the free-energy differences with their errors; then,
with the refinement stage, the same numbers for each refined method.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openmm
import torch

from tbg.chem.trajectory import MDData
from tbg.evaluate.report import EvaluationOptions
from tbg.evaluate.runs import evaluate_samples_file
from tbg.flow.ode import ADAPTIVE
from tbg.flow.refine.runs import RefineOptions, method_name, refine_samples
from tbg.flow.runs import (TOPOLOGY_FILE, SamplingOptions, TrainingOptions, check_sample_likelihood,
                           find_run_model, read_train_log, sample_checkpoint, train_on_md)
from tbg.runfolder import exclusive, write_atomically

log = logging.getLogger("tbg")

__all__ = ["FEW_EFFECTIVE_SAMPLES", "SUMMARY_FILE", "TrainingRecord", "demo_summary", "run_demo"]

SUMMARY_FILE = "summary.txt"
LIKELIHOOD_CHECK_FILE = "likelihood_check.json"
# Below this Kish effective sample size the bootstrap errors of reweighted estimates mean little.
FEW_EFFECTIVE_SAMPLES = 30
# Tail shapes of the weights (tbg.flow.reweight.pareto_k) at which the verdict changes, as in PSIS.
PARETO_K_VERDICTS = ((0.5, "finite variance"), (0.7, "slow convergence"),
                     (math.inf, "too heavy a tail: the reweighted numbers are not reliable"))


@dataclass(frozen=True)
class TrainingRecord:
    """What the summary says about stage 1: the run's log, and for a demonstration the shipped run's."""

    run: Path
    demonstration: bool
    shipped: Path | None = None

    def describe(self) -> list[str]:
        rows = read_train_log(self.run)
        if not rows:
            return []
        first, last = rows[0], rows[-1]
        minutes = last.get("seconds", 0.0) / 60
        text = (f"{int(last['step'])} steps in {minutes:.1f} min (this run), loss {first['loss']:.3g} at step "
                f"{int(first['step'])} -> {last['loss']:.3g}")
        if not self.demonstration:
            return [f"  training                {text}"]
        lines = ["  training demonstration  not the sampled model: the flow-matching stage of the shipped model's "
                 "recipe from scratch,",
                 f"                          {text}"]
        shipped = read_train_log(self.shipped) if self.shipped is not None else []
        if shipped:
            same = min(shipped, key=lambda r: abs(r["step"] - last["step"]))
            lines.append(f"                          (the shipped run logged {same['loss']:.3g} at step "
                         f"{int(same['step'])} and {shipped[-1]['loss']:.3g} at its last step {int(shipped[-1]['step'])})")
        return lines


def run_demo(md: MDData, out: Path, training: TrainingOptions, sampling: SamplingOptions,
             evaluation: EvaluationOptions, *, device: torch.device | str, md_frames: int,
             platform: openmm.Platform | str | None = None, model: Path | None = None,
             refinement: RefineOptions | None = None, likelihood_check: int = 0,
             record: Callable[[Path], None] | None = None) -> str:
    """Train (a demonstration in out/train-demo when ``model`` is given, else the model in out/train), sample
    ``model`` or the trained one (out/sample), measure the likelihood error of its first ``likelihood_check``
    samples (out/likelihood_check.json, ``tbg.flow.runs.check_sample_likelihood``; 0: not measured) and
    evaluate against ``md_frames`` MD frames (out/evaluate,
    energies at the sampling temperature on the OpenMM ``platform``), with ``refinement`` refining the
    samples first (out/refine) and evaluating the refined samples beside IS; every stage resumes from what
    is on disk, and ``out`` is held against other processes meanwhile. Writes out/summary.txt (the report's table
    and ``demo_summary``) and returns the summary. ``record(folder)``, if given, is called for ``out`` and
    each stage's folder once that stage is known to go ahead."""
    t0 = time.perf_counter()
    with exclusive(out):
        def record_training(train_dir: Path) -> None:
            if record is not None:
                record(out)
                record(train_dir)

        if model is None:
            log.info("== 1/3 train the model")
            checkpoint = train_on_md([md], out / "train", training, device, record=record_training)
            topology, trained = out / "train" / TOPOLOGY_FILE, TrainingRecord(out / "train", demonstration=False)
        else:
            log.info("== 1/3 training demonstration (%d steps of the flow-matching stage of the shipped model's "
                     "recipe; the shipped model is what gets sampled)", training.steps)
            train_on_md([md], out / "train-demo", training, device, record=record_training)
            checkpoint, topology = find_run_model(model)
            trained = TrainingRecord(out / "train-demo", demonstration=True, shipped=model)
        log.info("== 2/3 sample %s with likelihood=%s", checkpoint, sampling.config.likelihood)
        samples = sample_checkpoint(checkpoint, topology, out / "sample", sampling, record=record)
        checked = None
        if likelihood_check and sampling.config.likelihood != "none":
            checked = check_sample_likelihood(checkpoint, topology, samples, out / LIKELIHOOD_CHECK_FILE, sampling,
                                              n=likelihood_check)
        if refinement is not None:
            log.info("== refine the samples (%s)", ", ".join(
                method_name(kind, config) for kind, config in (("smc", refinement.smc), ("mcmc", refinement.mcmc))
                if config is not None))
            refine_samples(out / "sample", out / "refine", refinement, checkpoint=checkpoint, platform=platform,
                           record=record)
            samples = out / "refine"
        log.info("== 3/3 validate, reweight, evaluate")
        report, table = evaluate_samples_file(samples, md, out / "evaluate", evaluation, md_frames=md_frames,
                                              temperature=sampling.temperature, platform=platform, record=record)
        summary = demo_summary(report, time.perf_counter() - t0, model=checkpoint, sampling=sampling,
                               likelihood_check=checked, training=trained)
        write_atomically(out / SUMMARY_FILE, lambda tmp: tmp.write_text(table + "\n\n" + summary + "\n"))
    return summary


def _pm(e: dict | None, unit: str = "kT") -> str:
    if e is None or e["value"] is None:
        return "-"
    error = "(no error bar)" if e["stderr"] is None else f"+- {e['stderr']:.2f}"
    return f"{e['value']:+.2f} {error} {unit}"


def _number(value: float | None, fmt: str = ".2f", unit: str = " kT") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _refined_lines(report: dict[str, Any]) -> list[str]:
    """One block per refined method of the report (SMC, MCMC): what it cost, its ESS, the energy distance
    to MD and every basin's Delta F against MD."""
    lines = []
    for name, m in (report.get("methods") or {}).items():
        if m["kind"] not in ("SMC", "MCMC"):
            continue
        costs = m.get("costs") or {}
        lines.append(f"  refined ({name}: {m.get('n_samples', m['n'])} samples, "
                     f"{costs.get('energy_evaluations', 0):.0f} energy and {costs.get('likelihood_evaluations', 0):.0f} "
                     f"likelihood evaluations, {costs.get('wall_time_s', 0.0) / 60:.1f} min):")
        ess = m["ess"]
        if ess is None:
            ess_text = "-"
        else:
            ess_text = f"{ess['effective_samples']:.0f} effective samples ({ess['kind']}) of {m['n']}"
            if m.get("unique_ancestors") is not None:
                ess_text += f", {m['unique_ancestors']} distinct ancestors"
        lines += [f"    ESS                   {ess_text}",
                  f"    energy W1 to MD       {_number(m['energy']['w1'])}"]
        for key, e in m["delta_f"].items():
            label = report["delta_f"][key]["definition"]["label"]
            lines.append(f"    dF {label}: refined {_pm(e)}, refined - MD {_pm(e['minus_md'])}")
    return lines


def demo_summary(report: dict[str, Any], wall_s: float, *, model: Path | None = None,
                 sampling: SamplingOptions | None = None, likelihood_check: dict[str, Any] | None = None,
                 training: TrainingRecord | None = None) -> str:
    """The demo's closing lines: correct configurations, ESS, energy distance to MD, every basin's Delta F
    against MD, then what was sampled and how (with the measured ``likelihood_check``:
    ``tbg.flow.runs.check_sample_likelihood``), and the training stage."""
    ess, energy = report["ess"], report["energy"]
    few = ess["kish_n"] is not None and ess["kish_n"] < FEW_EFFECTIVE_SAMPLES
    ess_text = "-" if ess["kish_fraction"] is None else \
        f"{100 * ess['kish_fraction']:.2f}% ({ess['kish_n']:.0f} effective samples of {ess['n_weighted']})"
    lines = [
        f"summary ({report['n_samples']} samples, {wall_s / 60:.1f} min this run):",
        f"  correct configurations  {100 * report['correct_configuration_rate']:.1f}%",
        f"  ESS (Kish)              {ess_text}",
    ]
    if ess.get("log_weight_std") is not None:
        lines.append(f"  log-weights             std {ess['log_weight_std']:.1f} nats, largest weight "
                     f"{100 * ess['largest_weight']:.0f}% of the total")
    if ess.get("pareto_k") is not None:
        verdict = next(text for bound, text in PARETO_K_VERDICTS if ess["pareto_k"] <= bound)
        lines.append(f"  tail of the weights     Pareto k {ess['pareto_k']:.2f} ({verdict})")
    lines.append(f"  energy W1 to MD         model {_number(energy['wasserstein_model'])}, "
                 f"reweighted {_number(energy['wasserstein_reweighted'])}")
    broken = {k: v for k, v in (report.get("n_nonfinite") or {}).items() if v}
    if broken:
        lines.append("  weight 0 (not finite)   " + ", ".join(f"{v} samples' {k}" for k, v in broken.items()))
    if few:
        lines += [f"  (under {FEW_EFFECTIVE_SAMPLES} effective samples: the reweighted values below rest on a",
                  "   handful of samples, and their error bars are not meaningful)"]
    # Every basin definition of the report; compared with MD where the MD frames visit both states.
    lines.append("  dF = F(basin) - F(reference), states in report.json delta_f:")
    for d in report["delta_f"].values():
        label, md = d["definition"]["label"], d["MD"]
        if md is None or md["value"] is None:
            frames = "" if md is None else f": {md['n_basin']} basin / {md['n_reference']} reference frames"
            lines.append(f"    {label}: no MD value{frames}; model {_pm(d['model'])}, reweighted {_pm(d['reweighted'])}")
            continue
        lines += [f"    {label}", f"      MD          {_pm(md)}"]
        for name in ("model", "reweighted"):
            e = d[name]
            lines.append(f"      {name:<11} {_pm(e)}   {name + ' - MD':<15} {_pm(e and e['minus_md'])}")
    lines += _refined_lines(report)
    if model is not None:
        lines.append(f"  sampled model           {model}")
    if sampling is not None:
        cfg = sampling.config
        solver = cfg.solver.method + (f" at atol = rtol = {cfg.solver.atol:g}" if cfg.solver.method in ADAPTIVE
                                      else f" in {cfg.solver.n_steps} steps")
        panels = (" on panels split at t = " + ", ".join(f"{b:g}" for b in cfg.quadrature_panels)
                  if cfg.quadrature_panels else "")
        how = {"decoupled": f"decoupled: x by {solver}, Gauss-Legendre quadrature of the exact divergence at "
                            f"{cfg.n_quadrature} nodes{panels}",
               "joint": f"joint: {solver} on (x, dlogp)",
               "none": "none"}[cfg.likelihood]
        lines.append(f"  likelihood              {how}")
    if likelihood_check is not None:
        c = likelihood_check
        spread = "" if c["stderr"] is None else f" +- {c['stderr']:.3f}"
        lines.append(f"  likelihood error        mean {c['mean']:.3f}{spread}, max {c['max']:.3f} nats on {c['n']} "
                     f"samples (|dlogp - joint dopri5 at {c['tol']:g}|)")
        if cfg.prior_scale != 1.0:
            lines.append(f"  latents                 N(0, {cfg.prior_scale:g}^2), the prior scaled (the weights use "
                         "its density)")
    if training is not None:
        lines += training.describe()
    return "\n".join(lines)
