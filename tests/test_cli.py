"""The `tbg` command end to end on tiny settings: every subcommand's help, bad input, the
simulate -> train -> sample -> evaluate chain, resuming, `demo --quick`, and published checkpoints."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch

import tbg
from tbg.chem.energy import EnergyModel
from tbg.chem.trajectory import layout_source, write_trajectory
from tbg.chem.units import SCALE
from tbg.cli import COMMANDS, main
from tbg.evaluate.runs import thin_evenly
from tbg.flow.runs import held_out_record, split_frames
from tbg.runfolder import file_sha256

from cli_helpers import FAST_SAMPLE, random_egnn, run, simulate_md


@pytest.fixture(scope="module")
def md_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short alanine-dipeptide trajectory made by `tbg simulate` (seconds)."""
    return simulate_md(tmp_path_factory.mktemp("md"))


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(([command] if command else []) + ["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: tbg")
    if command:
        assert COMMANDS[command][0].split()[0] in out.lower()  # the command's own description


def test_python_dash_m(tmp_path: Path) -> None:
    """`python -m tbg` is the same command: a usage error is one line with exit status 2."""
    bad = subprocess.run([sys.executable, "-m", "tbg", "sample", "--out", str(tmp_path / "s")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("tbg sample: error:") and "--checkpoint" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["nonsense"], "invalid choice"),
    (["train", "--steps", "many"], "argument --steps: invalid value 'many': expected an integer >= 0"),
    (["train", "--hidden", "8"], "--out DIR is required"),
    (["sample", "--out", "{tmp}/s"], "--checkpoint"),
    (["sample", "--checkpoint", "{tmp}/missing.pt", "--peptide", "AY", "--out", "{tmp}/s"], "not found"),
    (["sample", "--published", "{tmp}/x.pt", "--checkpoint", "{tmp}/y", "--out", "{tmp}/s"], "not allowed"),
    (["evaluate", "--out", "{tmp}/e"], "--samples"),
    (["evaluate", "--samples", "{tmp}/none.npz", "--data", "{tmp}", "--out", "{tmp}/e"], "no *-traj-arrays.npz"),
    (["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/t"], "--data"),
    (["bench", "no_such_benchmark"], "no benchmark 'no_such_benchmark'"),
    (["info", "--config", "{tmp}/missing.toml"], "config file not found"),
    (["demo", "--quick", "--full"], "not allowed with"),
])
def test_bad_arguments(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code != 0
    assert message in err


def test_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('hiden = 8\n')
    code, _, err = run(["train", "--config", bad, "--out", tmp_path / "t"], capsys)
    assert code == 2 and "unknown option 'hiden'" in err
    broken = tmp_path / "broken.toml"
    broken.write_text('hidden = \n')
    code, _, err = run(["train", "--config", broken, "--out", tmp_path / "t"], capsys)
    assert code == 2 and "not valid TOML" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path: Path, md_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["train", "--data", md_dir, "--out", tmp_path / "t", "--device", "cuda"], capsys)
    assert code == 2 and "--device cpu" in err


def test_pipeline(md_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """simulate (fixture) -> train (config file + flags) -> sample -> evaluate; reruns resume."""
    assert {p.name for p in md_dir.iterdir()} >= {"ala2-traj-state0.pdb", "ala2-traj-arrays.npz", "config.json"}
    config = tmp_path / "train.toml"
    config.write_text('hidden = 8\nlayers = 1\nbatch-size = 8\ncheckpoint_every = 3\nsteps = 100\n')
    train_dir = tmp_path / "train"
    train_argv = ["train", "--config", config, "--data", md_dir, "--out", train_dir, "--steps", "3", "--no-progress"]
    code, out, err = run(train_argv, capsys)
    assert code == 0, err
    resolved = json.loads((train_dir / "config.json").read_text())
    assert (resolved["hidden"], resolved["layers"], resolved["steps"], resolved["batch_size"]) == (8, 1, 3, 8)
    assert (train_dir / "model.pt").is_file() and (train_dir / "topology.pdb").is_file()
    # More steps in the same folder continue from the newest checkpoint.
    code, _, err = run(train_argv[:-3] + ["--steps", "6", "--no-progress"], capsys)
    assert code == 0, err
    rows = (train_dir / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows][-1] == 6
    assert torch.load(train_dir / "model.pt", weights_only=True)["global_it"] == 6
    # Other model settings in the same folder are refused rather than mixed.
    code, _, err = run(train_argv[:-3] + ["--hidden", "16"], capsys)
    assert code == 2 and "hidden is 8 there but 16 now" in err

    sample_dir = tmp_path / "sample"
    code, out, err = run(["sample", "--checkpoint", train_dir, "--n", 6, "--sample-batch-size", 4, "--out",
                          sample_dir, *FAST_SAMPLE], capsys)
    assert code == 0, err
    with np.load(sample_dir / "samples.npz") as f:
        assert f["samples"].shape == f["latents"].shape == (6, 66)
        assert f["dlogp"].shape == f["prior_energy"].shape == (6,)
        first = f["samples"].copy()
        prior_energy, dlogp = f["prior_energy"], f["dlogp"]
    _check_sample_trajectories(sample_dir, first, {"dcd": 1e-6, "pdb": 5.01e-5})
    # Weights beside them: log w = -u + prior_energy + dlogp of the raw samples at 300 K (capped peptide).
    import openmm.app as app

    table = np.genfromtxt(sample_dir / "samples_weights.csv", delimiter=",", names=True)
    assert list(table["frame"]) == list(range(6))
    with EnergyModel(app.PDBFile(str(sample_dir / "topology.pdb")).topology, temperature=300.0) as energy:
        u = energy.reduced_energy(first, unit="scaled")
    np.testing.assert_allclose(table["reduced_energy"], u, rtol=1e-6)
    np.testing.assert_allclose(table["log_weight"], -u + prior_energy + dlogp, rtol=1e-6)
    finite = np.isfinite(table["log_weight"])
    expected_w = np.exp(table["log_weight"] - table["log_weight"][finite].max()) if finite.any() else np.zeros(6)
    np.testing.assert_allclose(table["weight"], expected_w / max(expected_w.sum(), 1), rtol=1e-6)
    # A rerun finds every chunk on disk and reproduces the same file.
    code, _, err = run(["sample", "--checkpoint", train_dir, "--n", 6, "--sample-batch-size", 4, "--out",
                        sample_dir, *FAST_SAMPLE], capsys)
    assert code == 0, err
    with np.load(sample_dir / "samples.npz") as f:
        np.testing.assert_array_equal(f["samples"], first)
    # After more training the chunks on disk are stale: refused, not mixed into the new model's samples.
    code, _, err = run(train_argv[:-3] + ["--steps", "7", "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = run(["sample", "--checkpoint", train_dir, "--n", 6, "--sample-batch-size", 4, "--out",
                        sample_dir, *FAST_SAMPLE], capsys)
    assert code == 2 and "checkpoint_sha256 is" in err

    eval_dir = tmp_path / "evaluate"
    code, out, err = run(["evaluate", "--samples", sample_dir, "--data", md_dir, "--out", eval_dir,
                          "--md-frames", 20, "--bootstrap", 5], capsys)
    assert code == 0, err
    report = json.loads((eval_dir / "report.json").read_text())
    assert report["n_samples"] == 6 and report["md_n_frames"] == 20
    assert 0 <= report["correct_configuration_rate"] <= 1
    assert (eval_dir / "ramachandran.png").is_file() and (eval_dir / "config.json").is_file()

    # Evaluating against a different molecule names the mismatch.
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "x-traj-arrays.npz", samples=np.zeros((2, 9)))
    code, _, err = run(["evaluate", "--samples", other / "x-traj-arrays.npz", "--data", md_dir, "--out",
                        tmp_path / "e2"], capsys)
    assert code == 2 and "22 atoms" in err


def _check_sample_trajectories(sample_dir: Path, samples: np.ndarray, precision: dict[str, float]) -> None:
    """samples.FORMAT read back with mdtraj: one frame per sample, atoms of topology.pdb in order, positions =
    samples.npz / SCALE in nm up to each format's precision."""
    top = mdtraj.load_topology(str(sample_dir / "topology.pdb"))
    for fmt, atol in precision.items():
        traj = mdtraj.load(str(sample_dir / f"samples.{fmt}"), **({} if fmt in ("pdb", "h5") else {"top": top}))
        assert [(a.name, a.residue.name) for a in traj.topology.atoms] == [(a.name, a.residue.name) for a in top.atoms]
        np.testing.assert_allclose(traj.xyz, samples.reshape(len(samples), top.n_atoms, 3) / SCALE, atol=atol, rtol=0)


def test_train_from_initial_weights(md_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--init starts a run from a checkpoint's weights (a second stage), recorded in run.json."""
    tiny = ["--data", md_dir, "--hidden", "8", "--layers", "2", "--batch-size", "8", "--no-progress"]
    first = tmp_path / "first"
    assert run(["train", "--out", first, "--steps", "3", *tiny], capsys)[0] == 0
    second = tmp_path / "second"
    code, _, err = run(["train", "--out", second, "--steps", "0", "--init", first / "model.pt", *tiny], capsys)
    assert code == 0, err
    state = [torch.load(d / "model.pt", weights_only=True)["model_state_dict"] for d in (first, second)]
    torch.testing.assert_close(state[1], state[0], rtol=0, atol=0)  # no step taken: the initial weights
    record = json.loads((second / "run.json").read_text())["defines"]
    assert record["init_sha256"] == file_sha256(first / "model.pt")
    # two steps at a tiny learning rate move the weights a little, from there
    code, _, err = run(["train", "--out", tmp_path / "moved", "--steps", "2", "--lr", "1e-6", "--init",
                        first / "model.pt", *tiny], capsys)
    assert code == 0, err
    moved = torch.load(tmp_path / "moved" / "model.pt", weights_only=True)["model_state_dict"]
    delta = max(float((moved[k] - state[0][k]).abs().max()) for k in moved)
    assert 0 < delta < 1e-4


def test_training_records_the_frames_it_held_out(md_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every checkpoint names the frames no stage of its training has seen; a stage from --init with
    another seed trains on some of them, which then no longer count as unseen."""
    tiny = ["--data", md_dir, "--hidden", "8", "--layers", "1", "--batch-size", "8", "--checkpoint-every", "1",
            "--no-progress"]
    first = tmp_path / "first"
    assert run(["train", "--out", first, "--steps", "1", *tiny], capsys)[0] == 0
    (molecule,) = json.loads((first / "run.json").read_text())["defines"]["molecules"]
    n = molecule["frames"]

    def unseen(checkpoint: Path) -> list[int]:
        record = held_out_record(checkpoint)
        assert list(record) == [molecule["positions_sha256"]] and record[molecule["positions_sha256"]]["frames"] == n
        return record[molecule["positions_sha256"]]["indices"].tolist()

    seed0, seed1 = (set(split_frames(n, 0.1, seed)[1]) for seed in (0, 1))
    assert len(seed0) == n // 10 and seed0 != seed1
    assert unseen(first / "model.pt") == unseen(first / "checkpoints" / "step_00000001.pt") == sorted(seed0)
    second = tmp_path / "second"
    assert run(["train", "--out", second, "--steps", "1", "--seed", "1", "--init", first / "model.pt", *tiny],
               capsys)[0] == 0
    assert unseen(second / "model.pt") == sorted(seed0 & seed1)


@pytest.fixture(scope="module")
def tiny_samples(md_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """samples.npz of a model trained for 2 steps on md_dir."""
    tmp = tmp_path_factory.mktemp("tiny")
    assert main(["train", "--data", str(md_dir), "--out", str(tmp / "t"), "--steps", "2", "--hidden", "8", "--layers",
                 "1", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress"]) == 0
    assert main(["sample", "--checkpoint", str(tmp / "t"), "--n", "6", "--out", str(tmp / "s"), "--trajectory",
                 *FAST_SAMPLE]) == 0
    return tmp / "s" / "samples.npz"


@pytest.mark.parametrize("fmt", ["dcd", "xtc", "trr", "h5", "pdb"])
def test_md_trajectory_formats(fmt: str, md_dir: Path, tiny_samples: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    """MD frames written in another format train and evaluate like the published layout: DCD/XTC/TRR with
    --topology, HDF5 and multi-model PDB on their own."""
    shipped = layout_source(md_dir, "ala2")
    topology, frames = shipped.load()
    path = write_trajectory(frames, topology, tmp_path / f"md.{fmt}")
    top = ["--topology", shipped.topology] if fmt in ("dcd", "xtc", "trr") else []
    if top:
        code, _, err = run(["train", "--data", path, "--out", tmp_path / "t"], capsys)
        assert code == 2 and "holds no topology" in err
    code, out, err = run(["train", "--data", path, *top, "--out", tmp_path / "t", "--steps", 2, "--hidden", 8,
                          "--layers", 1, "--batch-size", 8, "--checkpoint-every", 2, "--no-progress"], capsys)
    assert code == 0, err
    assert [m["name"] for m in json.loads((tmp_path / "t" / "run.json").read_text())["defines"]["molecules"]] == ["md"]
    assert mdtraj.load(str(tmp_path / "t" / "topology.pdb")).n_atoms == 22
    code, _, err = run(["evaluate", "--samples", tiny_samples, "--data", path, *top, "--out", tmp_path / "e",
                        "--md-frames", 20, "--bootstrap", 5], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["n_samples"] == 6 and report["md_n_frames"] == 20 and report["md_correct_configuration_rate"] == 1.0
    # The MD energies are those of the file's frames (20 of them, evenly thinned), at 300 K.
    read_back = mdtraj.load(str(path), **({"top": topology} if top else {})).xyz
    with EnergyModel(topology, temperature=300.0) as energy:
        expected = energy.reduced_energy(thin_evenly(read_back, 20), unit="nm").mean()
        exact = energy.reduced_energy(thin_evenly(frames, 20), unit="nm").mean()
    assert report["energy"]["md_mean"] == pytest.approx(expected, rel=1e-6)
    if fmt in ("trr", "h5"):  # stored without rounding: the energies of the published layout's frames
        assert report["energy"]["md_mean"] == pytest.approx(exact, rel=1e-6)


def test_demo_quick(md_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The quick demo runs all three stages and summarises; a rerun continues instead of redoing."""
    data = tbg.cli.ALA2_DATA if (tbg.cli.ALA2_DATA / "ala2-traj-arrays.npz").is_file() else md_dir
    argv = ["demo", "--quick", "--data", data, "--out", tmp_path / "demo", "--no-progress"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "demo" / "evaluate" / "report.json").read_text())
    # The headline lines, parsed, say what report.json says.
    correct = re.search(r"correct configurations\s+([\d.]+)%", out)
    assert correct and float(correct[1]) == pytest.approx(100 * report["correct_configuration_rate"], abs=0.05)
    ess = report["ess"]
    if ess["kish_fraction"] is not None:
        line = re.search(r"ESS \(Kish\)\s+([\d.]+)% \((\d+) effective samples of (\d+)\)", out)
        assert line and float(line[1]) == pytest.approx(100 * ess["kish_fraction"], abs=0.005)
        assert int(line[2]) == round(ess["kish_n"]) and int(line[3]) == ess["n_weighted"]
        spread = re.search(r"log-weights\s+std ([\d.]+) nats, largest weight (\d+)% of the total", out)
        assert spread and float(spread[1]) == pytest.approx(ess["log_weight_std"], abs=0.05)
        assert int(spread[2]) == round(100 * ess["largest_weight"])
        tail = re.search(r"tail of the weights\s+Pareto k (-?[\d.]+) \((.+)\)", out)
        assert tail and float(tail[1]) == pytest.approx(ess["pareto_k"], abs=0.005)
    w1 = re.search(r"energy W1 to MD\s+model (\S+)( kT)?, reweighted (\S+)", out)
    assert w1 is not None
    if report["energy"]["wasserstein_model"] is not None:
        assert float(w1[1]) == pytest.approx(report["energy"]["wasserstein_model"], abs=0.005)
    assert re.search(r"likelihood\s+decoupled: x by rk4", out)
    # The likelihood check (2 samples in --quick) is reported as measured.
    check = json.loads((tmp_path / "demo" / "likelihood_check.json").read_text())
    assert check["n"] == 2 and check["tol"] == 1e-6 and 0 <= check["mean"] <= check["max"]
    error = re.search(r"likelihood error\s+mean ([\d.]+) \+- ([\d.]+), max ([\d.]+) nats on (\d+) samples "
                      r"\(\|dlogp - joint dopri5 at 1e-06\|\)", out)
    assert error and int(error[4]) == 2
    assert [float(error[i]) for i in (1, 2, 3)] == pytest.approx([check["mean"], check["stderr"], check["max"]],
                                                                abs=5e-4)
    assert re.search(r"training( demonstration)?\s+(not the sampled model.*\n\s+)?20 steps in", out)
    # The summary names each basin and, where MD defines Delta F (alpha_R vs beta/PII on the shipped data),
    # prints MD, model and reweighted values with the differences to MD.
    for entry in report["delta_f"].values():
        assert entry["definition"]["label"] in out
        if entry["MD"]["value"] is not None:
            assert f"MD          {entry['MD']['value']:+.2f}" in out
            for label in ("model", "reweighted"):
                if entry[label] is not None and entry[label]["minus_md"]["value"] is not None:
                    assert f"{label} - MD" in out and f"{entry[label]['minus_md']['value']:+.2f}" in out
    if data == tbg.cli.ALA2_DATA:
        assert report["delta_f"]["alphaR_beta"]["MD"]["value"] is not None
    assert report["n_samples"] == 64
    assert (tmp_path / "demo" / "summary.txt").is_file()
    stamp = (tmp_path / "demo" / "sample" / "samples.npz").stat().st_mtime_ns
    chunks = sorted((tmp_path / "demo" / "sample" / "chunks").iterdir())
    chunk_stamps = [c.stat().st_mtime_ns for c in chunks]
    check_stamp = (tmp_path / "demo" / "likelihood_check.json").stat().st_mtime_ns
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert [c.stat().st_mtime_ns for c in chunks] == chunk_stamps  # no chunk was sampled again
    assert (tmp_path / "demo" / "likelihood_check.json").stat().st_mtime_ns == check_stamp  # nor checked again
    assert (tmp_path / "demo" / "sample" / "samples.npz").stat().st_mtime_ns >= stamp


def test_published_checkpoint_transfer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 76-feature checkpoint in the published layout samples AY through the CLI; the result equals
    the library's flow of the same latents with the transfer encoding of the same topology."""
    from tbg.chem import encode_transfer
    from tbg.flow import SolverConfig, decoupled_likelihood
    from tbg.nn.checkpoint import PREFIX

    model = random_egnn(76)
    ckpt = tmp_path / "published.pt"
    tbg.save_published(ckpt, model)
    assert any(k.startswith(PREFIX) for k in torch.load(ckpt, weights_only=True)["model_state_dict"])
    out = tmp_path / "ay"
    code, _, err = run(["sample", "--published", ckpt, "--peptide", "AY", "--n", 5, "--out", out, "--trajectory",
                        "xtc", "trr", "h5", *FAST_SAMPLE], capsys)
    assert code == 0, err
    assert not (out / "samples.pdb").exists() and (out / "samples_weights.csv").is_file()
    import openmm.app as app

    topology = app.PDBFile(str(out / "topology.pdb")).topology
    n_atoms = topology.getNumAtoms()
    with np.load(out / "samples.npz") as f:
        assert set(f.files) >= {"latents", "samples", "dlogp"}
        assert f["latents"].shape == f["samples"].shape == (5, 3 * n_atoms)
        assert f["dlogp"].shape == (5,)
        z, x, dlogp = (torch.from_numpy(f[k]) for k in ("latents", "samples", "dlogp"))
    assert np.isfinite(dlogp.numpy()).all() and dlogp.abs().max() > 0
    _check_sample_trajectories(out, x.numpy(), {"xtc": 5.01e-4, "trr": 0.0, "h5": 0.0})
    dyn = tbg.load_published(ckpt, encode_transfer(topology))
    expected = decoupled_likelihood(dyn, z, n_nodes=2, solver=SolverConfig(method="rk4", n_steps=2))
    torch.testing.assert_close(x, expected.x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dlogp, expected.dlogp, rtol=1e-4, atol=1e-4)

    # --no-likelihood: samples only.
    code, _, err = run(["sample", "--published", ckpt, "--pdb", out / "topology.pdb", "--n", 3, "--out",
                        tmp_path / "nolik", "--method", "rk4", "--ode-steps", "2", "--no-likelihood",
                        "--no-progress"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "nolik" / "samples.npz") as f:
        assert f["samples"].shape == (3, 3 * n_atoms) and "dlogp" not in f.files
        _check_sample_trajectories(tmp_path / "nolik", f["samples"], {"pdb": 5.01e-5, "dcd": 1e-6})
    assert not (tmp_path / "nolik" / "samples_weights.csv").exists()  # no likelihood, no weights


def test_published_checkpoint_atom_encoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint whose width is the molecule's atom count takes the per-atom encoding; a width that
    fits no encoding is refused with the numbers in the message."""
    pdb = tbg.cli.ALA2_DATA / "ala2-traj-state0.pdb"
    if not pdb.is_file():
        pytest.skip("shipped alanine dipeptide data missing")
    tbg.save_published(tmp_path / "ala2.pt", random_egnn(22))
    code, _, err = run(["sample", "--published", tmp_path / "ala2.pt", "--pdb", pdb, "--n", 2, "--out",
                        tmp_path / "a", *FAST_SAMPLE], capsys)
    assert code == 0, err
    with np.load(tmp_path / "a" / "samples.npz") as f:
        assert f["samples"].shape == (2, 66) and f["dlogp"].shape == (2,)
    tbg.save_published(tmp_path / "odd.pt", random_egnn(30))
    code, _, err = run(["sample", "--published", tmp_path / "odd.pt", "--pdb", pdb, "--n", 2, "--out",
                        tmp_path / "b", *FAST_SAMPLE], capsys)
    assert code == 2 and "expects 30 atom features" in err and "76" in err


def test_info_and_bench_list(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "torch.ops.tbg.egnn_forward" in out and "cpu: C++ CPU kernel" in out
    code, out, _ = run(["bench", "--list"], capsys)
    assert code == 0 and "validity" in out.splitlines()
    needs = {"model_kl", "refine", "finetune_solver"}  # they measure a checkpoint the caller names
    assert {line.split()[0] for line in out.splitlines() if "needs arguments" in line} == needs


def test_bench_runs_every_script_that_needs_no_arguments(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: ran.append(Path(argv[1]).stem) or
                        subprocess.CompletedProcess(argv, 0))
    code, out, _ = run(["bench"], capsys)
    assert code == 0 and "bench_validity" in ran and "bench_model_kl" not in ran
    assert "not run, they need arguments (run each by name): finetune_solver, model_kl, refine" in out
    ran.clear()
    assert run(["bench", "model_kl", "--args=--help"], capsys)[0] == 0 and ran == ["bench_model_kl"]
