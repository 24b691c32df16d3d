"""`tbg refine` end to end on tiny settings: the refined samples and their records, resuming after an
interruption (the same result as an uninterrupted run), refusal of a resume with other inputs, the folder
lock, `tbg evaluate` of a refinement folder, and the demo's refinement stage.

The flow is a tiny model trained for two steps, whose samples are broken molecules; so that the moves have
something to do, the fixture replaces its samples by MD frames and stores, as latents and dlogp, what
integrating those frames back through the same flow gives: the flow's log q at them, consistent with what
the annealed scheme computes at moved particles."""
from __future__ import annotations

import csv
import json
import re
import threading
from pathlib import Path

import mdtraj
import numpy as np
import openmm.app as app
import pytest
import torch

import tbg
import tbg.chem.energy as energy_module
import tbg.flow.refine.runs as refine_runs
from tbg.chem.energy import EnergyModel
from tbg.chem.units import SCALE
from tbg.flow import SolverConfig, integrate
from tbg.flow.prior import MeanFreeGaussian
from tbg.runfolder import exclusive

from cli_helpers import FAST_SAMPLE, TINY_TRAIN, run, simulate_md

N = 24
REFINE = ["--n-moves", "3", "--checkpoint-interval", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def flow_samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(MD folder, training run, sampling folder whose samples are MD frames with the flow's log q)."""
    root = tmp_path_factory.mktemp("refine")
    md = simulate_md(root / "md")
    assert tbg.cli.main(["train", "--data", str(md), "--out", str(root / "t"), "--steps", "2", *TINY_TRAIN]) == 0
    assert tbg.cli.main(["sample", "--checkpoint", str(root / "t"), "--n", str(N), "--sample-batch-size", "12",
                         "--out", str(root / "s"), "--trajectory", *FAST_SAMPLE]) == 0
    with np.load(md / "ala2-traj-arrays.npz") as f:
        frames = f["positions"][:N].astype(np.float32)
    x = torch.from_numpy((frames - frames.mean(1, keepdims=True)).reshape(N, -1) * SCALE)
    topology = app.PDBFile(str(root / "s" / "topology.pdb")).topology
    dyn = tbg.load_published(root / "t" / "model.pt", tbg.chem.encode_atoms(topology))
    back = integrate(dyn, x, t0=1.0, t1=0.0, likelihood=True, solver=SolverConfig(method="rk4", n_steps=2))
    # log q(x) = log q0(z) + dlogp_back, and the sampler's convention is log q = log q0(z) - dlogp.
    arrays = dict(np.load(root / "s" / "samples.npz"))
    arrays.update(samples=x.numpy(), latents=back.x.detach().numpy(), dlogp=-back.dlogp.detach().numpy(),
                  prior_energy=MeanFreeGaussian(22).energy(back.x.detach()).numpy())
    np.savez(root / "s" / "samples.npz", **arrays)
    return md, root / "t", root / "s"


def _result(folder: Path, kind: str = "smc") -> tuple[dict[str, np.ndarray], dict]:
    with np.load(folder / f"{kind}.npz") as f:
        arrays = {k: f[k] for k in f.files if k != "summary"}
        summary = json.loads(str(f["summary"]))
    return arrays, summary


def test_refine_writes_the_refined_samples(flow_samples, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    md, _, samples = flow_samples
    out = tmp_path / "r"
    argv = ["refine", "--samples", samples, "--out", out, "--mcmc", "--mcmc-chains", "4", "--mcmc-burn-in", "1",
            *REFINE]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "refined:" in stdout
    assert json.loads((out / "run.json").read_text())["kind"] == "refinement"
    smc, summary = _result(out)
    assert smc["samples"].shape == (N, 66) and smc["log_weights"].shape == smc["ancestors"].shape == (N,)
    assert set(smc["ancestors"]) <= set(range(N))
    # The energies stored are those of the refined samples at 300 K; the moves kept them mean-free.
    with EnergyModel(app.PDBFile(str(out / "topology.pdb")).topology, temperature=300.0) as energy:
        np.testing.assert_allclose(smc["reduced_energy"], energy.reduced_energy(smc["samples"], unit="scaled"),
                                   rtol=1e-6)
    source = np.load(samples / "samples.npz")["samples"].astype(np.float64)
    centre = smc["samples"].reshape(N, 22, 3).mean(1)
    np.testing.assert_allclose(centre, source[smc["ancestors"]].reshape(N, 22, 3).mean(1), rtol=0, atol=1e-9)
    # Resample-move: one stage, 3 moves; one energy with forces per particle and move, none of the flow.
    assert summary["method"] == "SMC resample-move" and len(summary["stages"]) == 1
    assert summary["costs"]["energy_evaluations"] == N * (1 + 3) and summary["costs"]["likelihood_evaluations"] == 0
    assert 0 < summary["acceptance"] <= 1 and summary["costs"]["wall_time_s"] > 0
    with (out / "smc_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and {"beta", "ess", "acceptance", "step_size", "energy_evaluations"} <= set(rows[0])
    with (out / "smc_weights.csv").open() as fh:
        weights = list(csv.DictReader(fh))
    assert sum(float(r["weight"]) for r in weights) == pytest.approx(1.0)
    assert [int(r["ancestor"]) for r in weights] == list(smc["ancestors"])
    traj = mdtraj.load(str(out / "smc.dcd"), top=str(out / "topology.pdb"))
    np.testing.assert_allclose(traj.xyz, smc["samples"].reshape(N, 22, 3) / SCALE, atol=1e-6)
    mcmc, msummary = _result(out, "mcmc")
    assert mcmc["samples"].shape == (4 * 5, 66) and list(mcmc["chain"][:6]) == [0] * 5 + [1]
    np.testing.assert_array_equal(mcmc["samples"], source[mcmc["source"]])
    assert msummary["costs"]["energy_evaluations"] == N  # the proposals' energies
    refine_json = json.loads((out / "refine.json").read_text())
    assert refine_json["smc"]["costs"] == summary["costs"] and refine_json["particles"] == N
    assert not any((out / "state").iterdir())  # checkpoints removed once done

    # A rerun finds both methods done and changes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "smc.npz", out / "mcmc.npz")}
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # `tbg evaluate` of the folder scores the refined samples beside IS of the samples they came from.
    code, _, err = run(["evaluate", "--samples", out, "--data", md, "--out", tmp_path / "e", "--md-frames", 20,
                        "--bootstrap", 5], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert list(report["methods"]) == ["model", "IS", "IS clip q=0.999", "IS u<=MD+20kT", "SMC resample-move", "IMH"]
    assert report["n_samples"] == N and report["methods"]["SMC resample-move"]["costs"] == summary["costs"]
    assert report["methods"]["IMH"]["ess"]["kind"] == "autocorrelation"


def test_refine_resumes_after_an_interruption(flow_samples, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped during the annealed scheme (after 5 steps, checkpoint after each), a rerun continues from the
    checkpoint and ends where an uninterrupted run ends. OpenMM's CPU platform runs on one thread here: its
    threads add forces in a varying order (the same positions give reduced energies ~2e-6 kT apart between
    calls), and the adaptive beta steps can turn such differences into log weights 5e-4 apart (it happened
    in one CI run); on one thread the energies repeat exactly."""
    single = energy_module.platform_properties
    monkeypatch.setattr(energy_module, "platform_properties", lambda plat, threads=None: single(plat, threads=1))
    _, _, samples = flow_samples
    argv = ["refine", "--samples", samples, "--scheme", "adaptive", "--target-cess", "0.5", *REFINE, "--particles", "12",
            "--n-moves", "2"]
    code, _, err = run([*argv, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    calls = []
    original = refine_runs._Checkpointer.__call__

    def interrupt(self, checkpoint) -> None:  # noqa: ANN001
        original(self, checkpoint)
        calls.append(checkpoint)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(refine_runs._Checkpointer, "__call__", interrupt)
        code, _, err = run([*argv, "--out", tmp_path / "cut"], capsys)
    assert code == 130 and "rerun the same command to resume" in err
    assert (tmp_path / "cut" / "state" / "smc.npz").is_file() and not (tmp_path / "cut" / "smc.npz").exists()
    code, _, err = run([*argv, "--out", tmp_path / "cut"], capsys)
    assert code == 0, err
    (whole, s_whole), (cut, s_cut) = _result(tmp_path / "whole"), _result(tmp_path / "cut")
    np.testing.assert_allclose(cut["samples"], whole["samples"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(cut["log_weights"], whole["log_weights"], rtol=2e-5)
    np.testing.assert_array_equal(cut["ancestors"], whole["ancestors"])
    assert len(s_cut["stages"]) == len(s_whole["stages"]) > 1
    for key in ("energy_evaluations", "likelihood_evaluations"):
        assert s_cut["costs"][key] == s_whole["costs"][key] > 0  # the annealed stages integrate the flow back


def test_refine_starts_over_from_an_unreadable_checkpoint(flow_samples, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    _, _, samples = flow_samples
    argv = ["refine", "--samples", samples, *REFINE, "--particles", "12"]
    code, _, err = run([*argv, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    original = refine_runs._Checkpointer.__call__

    def interrupt(self, checkpoint) -> None:  # noqa: ANN001
        original(self, checkpoint)
        raise KeyboardInterrupt

    monkeypatch.setattr(refine_runs._Checkpointer, "__call__", interrupt)
    assert run([*argv, "--out", tmp_path / "cut"], capsys)[0] == 130
    monkeypatch.undo()
    state = tmp_path / "cut" / "state" / "smc.npz"
    state.write_bytes(state.read_bytes()[:100])
    code, _, err = run([*argv, "--out", tmp_path / "cut"], capsys)
    assert code == 0, err
    assert "unreadable checkpoint" in caplog.text and (state.parent / "smc.npz.corrupt").is_file()
    np.testing.assert_allclose(_result(tmp_path / "cut")[0]["samples"], _result(tmp_path / "whole")[0]["samples"],
                               rtol=0, atol=1e-6)


def test_refine_refuses_other_inputs_and_a_held_folder(flow_samples, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    md, train, samples = flow_samples
    out = tmp_path / "r"
    code, _, err = run(["refine", "--samples", samples, "--out", out, *REFINE], capsys)
    assert code == 0, err
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # Another setting, another scheme: refused before anything changes, naming the field.
    for extra, message in ((["--n-moves", "4"], "smc.n_moves is 3 there but 4 now"),
                           (["--particles", "10"], "particles is 24 there but 10 now"),
                           (["--scheme", "none", "--mcmc", "--mcmc-chains", "2", "--mcmc-burn-in", "0"], "smc is")):
        code, _, err = run(["refine", "--samples", samples, "--out", out, *REFINE, *extra], capsys)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # A folder held by another job (here another thread) is refused, untouched.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with exclusive(out):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(60)
        code, _, err = run(["refine", "--samples", samples, "--out", out, *REFINE], capsys)
    finally:
        release.set()
        holder.join()
    assert code == 2 and "is in use by this process (another thread)" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # The annealed scheme needs the checkpoint that made the samples: another one is refused.
    other = tmp_path / "other.pt"
    other.write_bytes((train / "model.pt").read_bytes() + b"\0")
    code, _, err = run(["refine", "--samples", samples, "--out", tmp_path / "r2", "--scheme", "adaptive",
                        "--checkpoint", other, *REFINE], capsys)
    assert code == 2 and "is not the checkpoint that made the samples" in err
    assert not (tmp_path / "r2").exists()
    # Samples without a likelihood, a folder that is not a sampling run.
    code, _, err = run(["refine", "--samples", train, "--out", tmp_path / "r3", *REFINE], capsys)
    assert code == 2 and "samples.npz not found" in err
    code, _, err = run(["refine", "--samples", samples, "--out", tmp_path / "r4", "--scheme", "none", *REFINE],
                       capsys)
    assert code == 2 and "nothing to refine" in err


def test_demo_with_the_refinement_stage(flow_samples, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tbg demo --quick --refine on` on tiny settings: the refinement stage runs between sampling and the
    evaluation, and the summary shows the refined numbers after the reweighted ones, as report.json says."""
    md, _, _ = flow_samples
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--model", "train", "--data", md, "--out", out, "--steps", 2, "--n", 12,
            "--sample-batch-size", 12, "--md-frames", 20, "--refine", "on", "--mcmc", "--mcmc-chains", 2,
            "--mcmc-burn-in", 0, *REFINE]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert (out / "refine" / "smc.npz").is_file() and (out / "refine" / "mcmc.npz").is_file()
    assert {"SMC resample-move", "IMH"} <= set(report["methods"])
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  refined (SMC resample-move: 12 samples"))
    assert start > next(i for i, line in enumerate(lines) if "dF = F(basin) - F(reference)" in line)
    smc = report["methods"]["SMC resample-move"]
    assert f"{smc['costs']['energy_evaluations']:.0f} energy" in lines[start]
    assert re.match(r"    ESS\s+", lines[start + 1]) and re.match(r"    energy W1 to MD\s+", lines[start + 2])
    assert any(line.startswith("  refined (IMH: ") for line in lines[start + 3:])


def test_refinement_weighs_the_samples_by_the_prior_they_were_drawn_from(flow_samples) -> None:
    """A sampling run with a scaled prior (`--prior-scale`) records the scale; refinement's log q uses it,
    and folders made before the option existed mean the standard normal."""
    _, _, samples = flow_samples
    source = refine_runs._read_source(samples)
    assert "prior_scale" not in source.manifest["defines"] and source.prior.scale == 1.0
    scaled = refine_runs._Source(source.folder, source.arrays, {"defines": {**source.manifest["defines"],
                                                                            "prior_scale": 0.6}}, source.topology_pdb)
    z = torch.from_numpy(source.arrays["latents"][:3]).double()
    torch.testing.assert_close(scaled.prior.log_prob(z), MeanFreeGaussian(22, scale=0.6).log_prob(z))
