"""Profiling of sampling (tbg.flow.profile), the batch-size sweep (tbg.flow.sweep) and the memory model
behind batch_size="auto" (tbg.flow.memory), checked against measured runs on the CPU."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import tbg
from tbg.flow import SampleConfig, SolverConfig, sample
from tbg.flow.memory import MemoryModel
from tbg.flow.profile import TRACE_DETAILED_EVALUATIONS, SamplingProfiler, format_profile, stage
from tbg.flow.sample import batch_size_for_budget, resolve_batch_size, sample_chunk
from tbg.flow.sweep import SweepConfig, profile_sampling

FUSED = tbg.has_kernel("egnn_forward", "cpu") and tbg.has_kernel("egnn_divergence", "cpu")
FAST = SolverConfig(method="rk4", n_steps=2)
MiB = 2**20


def _dynamics(n_atoms: int = 6, hidden: int = 8, layers: int = 2, backend: str = "auto") -> tbg.BoundDynamics:
    torch.manual_seed(0)
    egnn = tbg.EGNN(n_atoms, hidden=hidden, n_layers=layers)
    with torch.no_grad():  # a non-trivial field (the published init makes the coordinate heads ~1e-3)
        for layer in egnn.layers:
            layer.coord_mlp[2].weight.normal_(0, 0.3)
    return tbg.BoundDynamics(egnn, torch.eye(n_atoms), backend=backend)


def _trace_names(path: Path) -> set[str]:
    events = json.loads(path.read_text())["traceEvents"]
    # no CPU op inside one of our ops: their internal ATen calls are dropped from the trace
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name", "").startswith("tbg::")]
    assert not any(a <= e["ts"] and e["ts"] + e["dur"] <= b for e in events if e.get("cat") == "cpu_op"
                   and not e["name"].startswith("tbg::") for a, b in spans)
    return {e.get("name", "") for e in events}


@pytest.mark.parametrize("likelihood", ["joint", "decoupled"])
def test_sample_profile_stages_nfe_memory_and_trace(likelihood: str, tmp_path: Path) -> None:
    dyn = _dynamics()
    cfg = SampleConfig(n_samples=10, batch_size=4, likelihood=likelihood, n_quadrature=3,
                       solver=SolverConfig(atol=1e-3, rtol=1e-3), progress=False, profile=True)
    merged = np.load(sample(dyn, 6, tmp_path, cfg))
    profile = json.loads((tmp_path / "profile.json").read_text())

    # Stage times: non-negative, field and divergence inside the solve, all of them within the wall time.
    run = profile["run"]
    assert run["samples"] == 10 and run["chunks"] == 3
    for breakdown, wall in [(run["stages"], run["wall_seconds"])] + [
            (profile["sampling"]["stages"], profile["sampling"]["seconds"])]:
        assert all(row["seconds"] >= 0 for row in breakdown.values()), breakdown
        assert sum(row["seconds"] for name, row in breakdown.items() if name != "other") <= wall
    for chunk in profile["chunks"]:
        assert all(v >= 0 for v in chunk["stages"].values())
        assert chunk["stages"].get("field", 0) + chunk["stages"].get("divergence", 0) <= chunk["stages"]["solve"]
        assert chunk["stages"]["prior"] + chunk["stages"]["solve"] + chunk["stages"]["io"] <= chunk["seconds"]
    assert run["stages"]["divergence"]["seconds"] > 0 and run["stages"]["io"]["seconds"] > 0
    assert (run["stages"]["field"]["seconds"] > 0) == (likelihood == "decoupled")

    # Evaluation counts agree with the solver's own counts stored in the chunks.
    nfe = merged["nfe_per_chunk"]
    assert [c["nfe"].get("field", 0) for c in profile["chunks"]] == nfe[:, 0].tolist()
    assert [c["nfe"]["divergence"] for c in profile["chunks"]] == nfe[:, 1].tolist()
    dist = profile["nfe_per_sample"]["divergence"]
    per_sample = np.repeat(nfe[:, 1], [4, 4, 2])
    assert (dist["min"], dist["median"], dist["max"]) == (per_sample.min(), np.median(per_sample), per_sample.max())
    assert sum(dist["histogram"]["counts"]) == 10
    if likelihood == "decoupled":
        assert dist["min"] == dist["max"] == 3  # one divergence per quadrature node

    # Throughput over the chunks without the trace (the last full chunk after the first is traced).
    sampling = profile["sampling"]
    assert (profile["trace"]["path"], profile["trace"]["chunk"]) == ("trace.json", 1)
    assert sampling["chunks"] == 2 and sampling["samples"] == 6
    assert math.isclose(sampling["samples_per_second"], 6 / sampling["seconds"])
    assert sampling["evaluations"]["divergence"] == 4 * nfe[0, 1] + 2 * nfe[2, 1]
    memory = profile["memory"]
    assert memory["source"] and memory["chunk_peak_bytes"] == max(profile["chunks"][i]["peak_memory_bytes"]
                                                                  for i in (0, 2))
    assert "samples/s" in format_profile(profile)

    # The trace is valid JSON naming our stages and ops (the fused ones when built, else the reference's).
    names = _trace_names(tmp_path / "trace.json")
    assert profile["trace"]["events"] == len(json.loads((tmp_path / "trace.json").read_text())["traceEvents"])
    assert profile["trace"]["internal_op_events_dropped"] > 0 or not FUSED
    assert {"tbg.solve", "tbg.divergence", "tbg.prior", "tbg.io"} <= names
    assert ("tbg.field" in names) == (likelihood == "decoupled")
    if FUSED:
        assert "tbg::egnn_divergence" in names
        assert ("tbg::egnn_forward" in names) == (likelihood == "decoupled")
    else:
        assert "aten::linear" in names
    # Every evaluation of the traced chunk shows as its stage range; only the first ones of each kind show
    # what ran inside (the trace does not grow with the NFE).
    events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e.get("ph") == "X"]
    count = lambda name: sum(e["name"] == name for e in events)  # noqa: E731
    assert (count("tbg.field"), count("tbg.divergence")) == tuple(nfe[1])
    if FUSED:
        assert count("tbg::egnn_divergence") == min(TRACE_DETAILED_EVALUATIONS, nfe[1, 1])
        assert count("tbg::egnn_forward") == min(TRACE_DETAILED_EVALUATIONS, nfe[1, 0])


def test_profiling_changes_nothing_and_resumes(tmp_path: Path) -> None:
    dyn = _dynamics()
    cfg = SampleConfig(n_samples=6, batch_size=3, likelihood="decoupled", n_quadrature=2, solver=FAST,
                       progress=False)
    plain = np.load(sample(dyn, 6, tmp_path / "plain", cfg))
    assert not (tmp_path / "plain" / "profile.json").exists()
    profiled = np.load(sample(dyn, 6, tmp_path / "profiled", replace(cfg, profile=True)))
    for key in ("samples", "dlogp", "nfe_per_chunk"):
        np.testing.assert_array_equal(plain[key], profiled[key])
    # Profiling a finished run (all chunks on disk) is allowed and profiles only the merge.
    sample(dyn, 6, tmp_path / "plain", replace(cfg, profile=True))
    profile = json.loads((tmp_path / "plain" / "profile.json").read_text())
    assert profile["run"]["chunks"] == 0 and profile["trace"] is None
    assert profile["sampling"]["samples_per_second"] is None and "0 chunks" in format_profile(profile)


def test_stage_without_profiler_is_a_shared_no_op() -> None:
    assert stage("field") is stage("solve")
    with stage("field"):
        pass
    with SamplingProfiler("cpu") as prof, stage("field"):
        pass
    assert prof.calls["field"] == 1 and prof.seconds["field"] >= 0
    with pytest.raises(RuntimeError, match="already active"), prof, SamplingProfiler("cpu"):
        pass


def test_sweep_rows_files_and_best(tmp_path: Path) -> None:
    dyn = _dynamics()
    config = SweepConfig(batch_sizes=[4, 1, 2], likelihoods=["joint", "decoupled"], solver=FAST, n_quadrature=2,
                         min_samples=4, memory_budget_gb=1.0, progress=False)
    result, paths = profile_sampling(dyn, 6, config, "cpu", tmp_path)
    assert [(p.likelihood, p.batch_size) for p in result.points] == [
        ("joint", 1), ("joint", 2), ("joint", 4), ("decoupled", 1), ("decoupled", 2), ("decoupled", 4)]
    for p in result.points:
        assert p.samples >= 4 and p.samples == p.chunks * p.batch_size
        for value in (p.seconds, p.samples_per_second, p.evaluations_per_second, p.peak_memory_bytes,
                      p.model_peak_bytes):
            assert math.isfinite(value) and value >= 0
        assert p.samples_per_second > 0 and p.nfe_divergence == (8 if p.likelihood == "joint" else 2)
        assert p.nfe_field == (0 if p.likelihood == "joint" else 8)
    for mode in ("joint", "decoupled"):
        rows = [p for p in result.points if p.likelihood == mode]
        assert result.best[mode] == max(rows, key=lambda p: p.samples_per_second).batch_size
        assert result.model_choice[mode] >= 1
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(math.isfinite(float(r["samples_per_second"])) for r in rows)
    assert json.loads(paths["json"].read_text())["best"] == result.best
    assert paths["plot"].stat().st_size > 0
    # A budget below every measured peak leaves no batch.
    tight = replace(config, batch_sizes=[1], likelihoods=["joint"], min_samples=0, memory_budget_gb=1e-9)
    assert profile_sampling(dyn, 6, tight, "cpu", tmp_path / "tight")[0].best == {"joint": None}


def test_memory_model_shape() -> None:
    """Grows with the batch; the CPU divergence kernel's part does not (threads set it); the reference
    divergence carries all 3N tangents; the budget inverts peak_bytes."""
    common = dict(n_atoms=22, n_features=22, hidden=64, n_layers=5, threads=4)
    fused = {lik: MemoryModel(likelihood=lik, fused_field=True, fused_divergence=True, **common)
             for lik in ("none", "joint", "decoupled")}
    reference = MemoryModel(likelihood="joint", fused_field=False, fused_divergence=False, **common)
    for model in [*fused.values(), reference]:
        peaks = [model.peak_bytes(b) for b in (1, 2, 16, 256, 4096)]
        assert peaks == sorted(peaks)
        for budget in (0.01 * 2**30, 2**30, 16 * 2**30):
            b = model.largest_batch(budget)
            assert b == 1 or model.peak_bytes(b) <= budget < model.peak_bytes(b + 1)
    assert fused["joint"].divergence_bytes(1) > 0.9 * fused["joint"].divergence_bytes(64)  # mostly per thread
    assert reference.divergence_bytes(1) > 66 * 22 * 21 * 64 * 4  # at least one [3N, E, H] tensor
    assert reference.largest_batch(2**30) < fused["joint"].largest_batch(2**30)
    with pytest.raises(ValueError, match=">= 1"):
        reference.peak_bytes(0)
    assert MemoryModel(likelihood="joint", fused_field=True, fused_divergence=True, **common).largest_batch(1.0) == 1


def test_batch_size_resolution() -> None:
    dyn = _dynamics()
    gib = 2**30
    cfg = SampleConfig(n_samples=10**6, batch_size="auto", memory_budget_gb=0.25)
    auto = resolve_batch_size(dyn, 6, cfg, torch.device("cpu"))
    assert auto == batch_size_for_budget(0.25 * gib, dyn, 6, cfg)
    # a given batch is capped by the budget, "auto" leaves at least 4 chunks per rank
    assert resolve_batch_size(dyn, 6, replace(cfg, batch_size=7), torch.device("cpu")) == 7
    assert resolve_batch_size(dyn, 6, replace(cfg, batch_size=10**7), torch.device("cpu")) == auto
    assert resolve_batch_size(dyn, 6, replace(cfg, n_samples=41), torch.device("cpu"), world=2) == 5
    # with the reference (all 3N tangents at once) a divergence-free run fits far more samples; the fused
    # CPU divergence keeps no per-layer states, so there the joint likelihood fits about as many
    reference = _dynamics(backend="reference")
    assert batch_size_for_budget(gib, reference, 6, replace(cfg, likelihood="none")) > \
        4 * batch_size_for_budget(gib, reference, 6, replace(cfg, likelihood="joint"))
    with pytest.raises(ValueError, match="EGNN-backed"):
        resolve_batch_size(lambda t, x: -x, 6, cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="batch_size"):
        SampleConfig(batch_size="big")


# Measured peak on the CPU (resident set) against the budget the model was asked to respect. The model is
# an upper envelope; "not absurdly conservative": the measured peak uses at least 1 / SLACK of the budget.
SLACK = 4


@pytest.mark.parametrize("likelihood,backend,budget_mib", [
    ("none", "auto", 32), ("decoupled", "auto", 32), ("joint", "auto", 32), ("joint", "reference", 64)])
def test_auto_batch_size_fits_the_budget_in_a_measured_run(likelihood: str, backend: str, budget_mib: int) -> None:
    dyn = _dynamics(n_atoms=16, hidden=16, layers=2, backend=backend)
    cfg = SampleConfig(n_samples=10**6, batch_size="auto", likelihood=likelihood, n_quadrature=2,
                       solver=SolverConfig(method="rk4", n_steps=1), memory_budget_gb=budget_mib / 1024, progress=False)
    batch = resolve_batch_size(dyn, 16, cfg, torch.device("cpu"))
    run = replace(cfg, batch_size=batch)
    sample_chunk(dyn, 16, 0, 2, run, torch.device("cpu"))  # warm-up: first-use allocations are not the batch's
    with SamplingProfiler("cpu") as prof, prof.chunk(batch):
        sample_chunk(dyn, 16, 0, batch, run, torch.device("cpu"))
    measured = prof.chunks[0].peak_memory_bytes
    assert measured <= budget_mib * MiB, (batch, measured / MiB)
    assert measured >= budget_mib * MiB / SLACK, (batch, measured / MiB)


def test_cli_sample_profile_and_profile_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tbg sample --profile --sample-batch-size auto` (the export's energies and I/O are stages too) and
    `tbg profile` with a random-init model (installed-package use: no bench/ needed)."""
    from tbg.cli import main

    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    tbg.save_published(checkpoint, tbg.EGNN(22, hidden=8, n_layers=2))
    smp = tmp_path / "smp"
    assert main(["sample", "--checkpoint", str(checkpoint), "--peptide", "ala2", "--n", "9", "--out", str(smp),
                 "--sample-batch-size", "auto", "--memory-budget", "0.5", "--likelihood", "decoupled", "--quadrature",
                 "2", "--method", "rk4", "--ode-steps", "2", "--profile", "--no-progress", "--trajectory", "pdb"]) == 0
    profile = json.loads((smp / "profile.json").read_text())
    assert profile["run"]["chunks"] == 5  # auto: the budget fits all 9, but each rank keeps at least 4 chunks
    stages = profile["run"]["stages"]
    assert stages["energies"]["seconds"] > 0 and stages["io"]["seconds"] > 0
    assert sum(v["seconds"] for k, v in stages.items() if k != "other") <= profile["run"]["wall_seconds"]
    assert json.loads((smp / "run.json").read_text())["defines"]["batch_size"] == 2
    assert "tbg.energies" not in _trace_names(smp / "trace.json")  # the trace holds one chunk only
    assert main(["profile", "--peptide", "ala2", "--hidden", "8", "--layers", "2", "--batch-sizes", "1", "2",
                 "--likelihoods", "joint", "--method", "rk4", "--ode-steps", "2", "--memory-budget", "1",
                 "--out", str(tmp_path / "prof"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best batch for joint" in out and "sweep.png" in out
    rows = json.loads((tmp_path / "prof" / "sweep.json").read_text())["points"]
    assert [r["batch_size"] for r in rows] == [1, 2]
