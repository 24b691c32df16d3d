"""The demo: train a flow on one molecule's MD data, sample it with likelihood, evaluate the samples, and
summarise the headline numbers (what `tbg demo` runs; its settings are the CLI's presets)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openmm
import torch

from tbg.chem.trajectory import MDData
from tbg.evaluate.report import EvaluationOptions
from tbg.evaluate.runs import evaluate_samples_file
from tbg.flow.runs import TOPOLOGY_FILE, SamplingOptions, TrainingOptions, sample_checkpoint, train_on_md
from tbg.runfolder import exclusive, write_atomically

log = logging.getLogger("tbg")

__all__ = ["FEW_EFFECTIVE_SAMPLES", "SUMMARY_FILE", "demo_summary", "run_demo"]

SUMMARY_FILE = "summary.txt"
# Below this Kish effective sample size the bootstrap errors of reweighted estimates mean little.
FEW_EFFECTIVE_SAMPLES = 30


def run_demo(md: MDData, out: Path, training: TrainingOptions, sampling: SamplingOptions,
             evaluation: EvaluationOptions, *, device: torch.device | str, md_frames: int,
             platform: openmm.Platform | str | None = None, record: Callable[[Path], None] | None = None) -> str:
    """Train (out/train), sample (out/sample) and evaluate against ``md_frames`` MD frames (out/evaluate,
    energies at the sampling temperature on the OpenMM ``platform``); every stage resumes from what is on
    disk, and ``out`` is held against other processes meanwhile. Writes out/summary.txt (the report's table
    and ``demo_summary``) and returns the summary. ``record(folder)``, if given, is called for ``out`` and
    each stage's folder once that stage is known to go ahead."""
    t0 = time.perf_counter()
    with exclusive(out):
        log.info("== 1/3 train")

        def record_training(train_dir: Path) -> None:
            if record is not None:
                record(out)
                record(train_dir)

        model = train_on_md([md], out / "train", training, device, record=record_training)
        log.info("== 2/3 sample with likelihood=%s", sampling.config.likelihood)
        samples = sample_checkpoint(model, out / "train" / TOPOLOGY_FILE, out / "sample", sampling, record=record)
        log.info("== 3/3 validate, reweight, evaluate")
        report, table = evaluate_samples_file(samples, md, out / "evaluate", evaluation, md_frames=md_frames,
                                              temperature=sampling.temperature, platform=platform, record=record)
        summary = demo_summary(report, time.perf_counter() - t0)
        write_atomically(out / SUMMARY_FILE, lambda tmp: tmp.write_text(table + "\n\n" + summary + "\n"))
    return summary


def demo_summary(report: dict[str, Any], wall_s: float) -> str:
    """The demo's closing lines: correct configurations, ESS and every basin's Delta F against MD."""
    ess = report["ess"]

    def pm(e: dict | None) -> str:
        if e is None or e["value"] is None:
            return "-"
        error = "(no error bar)" if e["stderr"] is None else f"+- {e['stderr']:.2f}"
        return f"{e['value']:+.2f} {error} kT"

    few = ess["kish_n"] is not None and ess["kish_n"] < FEW_EFFECTIVE_SAMPLES
    ess_text = "-" if ess["kish_fraction"] is None else \
        f"{100 * ess['kish_fraction']:.2f}% ({ess['kish_n']:.0f} samples)"
    lines = [
        f"summary ({report['n_samples']} samples, {wall_s / 60:.1f} min this run):",
        f"  correct configurations  {100 * report['correct_configuration_rate']:.1f}%",
        f"  ESS (Kish)              {ess_text}",
    ]
    if few:
        lines += [f"  (under {FEW_EFFECTIVE_SAMPLES} effective samples: the reweighted values below rest on a",
                  "   handful of samples, and their error bars are not meaningful)"]
    # Every basin definition of the report; compared with MD where the MD frames visit both states.
    lines.append("  dF = F(basin) - F(reference), states in report.json delta_f:")
    for d in report["delta_f"].values():
        label, md = d["definition"]["label"], d["MD"]
        if md is None or md["value"] is None:
            frames = "" if md is None else f": {md['n_basin']} basin / {md['n_reference']} reference frames"
            lines.append(f"    {label}: no MD value{frames}; model {pm(d['model'])}, reweighted {pm(d['reweighted'])}")
            continue
        lines += [f"    {label}", f"      MD          {pm(md)}"]
        for name in ("model", "reweighted"):
            e = d[name]
            lines.append(f"      {name:<11} {pm(e)}   {name + ' - MD':<15} {pm(e and e['minus_md'])}")
    return "\n".join(lines)
