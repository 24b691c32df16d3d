"""End-to-end tests of tbg.flow on a 2-atom Boltzmann distribution: training, sampling, reweighting,
resume after kill, and 2-process (gloo) runs under torchrun."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tbg
import tbg.flow
import tbg.nn.checkpoint
from tbg.flow import kish_ess, log_importance_weights, normalized_weights, weighted_mean

sys.path.insert(0, str(Path(__file__).parent))
import flow_toy  # noqa: E402

TOY = str(Path(__file__).parent / "flow_toy.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOY, *args], env=ENV, capture_output=True, text=True, timeout=300, **kw)


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TOY, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _kill_when(args: list[str], ready) -> None:
    """Start the toy CLI and SIGKILL it as soon as ready() holds (it must still be running then)."""
    proc = subprocess.Popen([sys.executable, TOY, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stdout.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("run made no progress")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _final_state(path: Path) -> dict[str, torch.Tensor]:
    return tbg.nn.checkpoint.egnn_state(torch.load(path, weights_only=True))


# A resumed process is not bit-identical to an uninterrupted one: TorchScript's profiling executor
# (used by the reference field) optimises a function after its first calls, which may change the
# last bit of a result. A resume bug (wrong RNG, optimizer state or data position) shows up as O(1e-3)
# or larger differences, so these tolerances keep the tests sharp.
EXACT = {"atol": 1e-6, "rtol": 1e-5}


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **EXACT, msg=k)


def test_train_sample_reweight_double_well(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = flow_toy.model()
    loader = tbg.flow.RaggedLoader(flow_toy.items(4000), 128, collate=flow_toy.collate)
    val = tbg.flow.RaggedLoader(flow_toy.items(256, seed=1), 128, shuffle=False, collate=flow_toy.collate)
    cfg = tbg.flow.TrainConfig(n_steps=300, lr=3e-3, lr_milestones=(200,), checkpoint_every=100, validate_every=50,
                               log_every=50, progress=False)

    def val_loss() -> float:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            return float(torch.cat([tbg.flow.flow_matching_loss(model, b, generator=g) for b in val]).mean())

    untrained = val_loss()
    res = tbg.flow.train(model, loader, tmp_path / "train", cfg, val_data=val)
    trained = val_loss()
    rows = list(csv.DictReader((tmp_path / "train" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200, 250, 300]
    losses = [float(r["loss"]) for r in rows]
    vals = [float(r["val_loss"]) for r in rows]
    # the flow-matching loss has a large irreducible part: about 0.73 here against 0.9 untrained
    assert trained < 0.85 * untrained and losses[-1] < 0.85 * untrained, (untrained, trained, losses)
    assert vals[-1] == pytest.approx(res.val_loss) and vals[-1] < 0.85 * untrained, vals
    assert res.step == 300 and res.model_path.exists()

    # The brute-force trace (6 backward passes) is exact and, for 2 atoms in batches of 1500, much
    # faster on CPU than EGNN.divergence's tangent engine; the engine itself is tested in
    # test_flow.py and tests/test_divergence.py.
    dyn = tbg.flow.AutogradDivergence(tbg.nn.BoundDynamics(tbg.nn.load_egnn(res.model_path), flow_toy.FEATURES))
    out = tbg.flow.sample(dyn, 2, tmp_path / "sample", tbg.flow.SampleConfig(n_samples=3000, batch_size=1500,
                                                                             progress=False))
    data = np.load(out)
    assert data["samples"].shape == (3000, 6) and data["latents"].shape == (3000, 6) and data["dlogp"].shape == (3000,)
    r = flow_toy.distances(data["samples"])
    log_w = log_importance_weights(torch.tensor(flow_toy.reduced_energy(r)), torch.tensor(data["prior_energy"]),
                                   torch.tensor(data["dlogp"]))
    assert kish_ess(log_w) > 0.3
    # the reweighted distance histogram reproduces the target's (unweighted samples visibly do not)
    density = flow_toy.distance_density()
    edges = np.linspace(0.5, 3.5, 13)
    target = np.array([np.trapezoid(density[(flow_toy.R_GRID >= lo) & (flow_toy.R_GRID < hi)],
                                    flow_toy.R_GRID[(flow_toy.R_GRID >= lo) & (flow_toy.R_GRID < hi)])
                       for lo, hi in zip(edges[:-1], edges[1:])])
    w = normalized_weights(log_w).numpy()
    weighted = np.histogram(r, edges, weights=w)[0]
    raw = np.histogram(r, edges)[0] / len(r)
    tv_weighted, tv_raw = 0.5 * np.abs(weighted - target).sum(), 0.5 * np.abs(raw - target).sum()
    assert tv_weighted < 0.06 and tv_weighted < tv_raw, (tv_weighted, tv_raw)
    mean_target = np.trapezoid(flow_toy.R_GRID * density, flow_toy.R_GRID)
    mu, se = weighted_mean(torch.tensor(r), log_w)
    assert abs(mu - mean_target) < 4 * se + 0.01, (mu, se, mean_target)


def test_ema_warms_up(tmp_path: Path) -> None:
    """The EMA's decay starts at 1/10, not at 0.999: after one step it is 0.1 initial + 0.9 trained weights
    (a fixed 0.999 would leave a short run's model.pt almost the random initial weights)."""
    initial = {k: v.clone() for k, v in flow_toy.model().state_dict().items()}
    config = flow_toy.train_config(1, 1)
    config.ema_decay = 0.999
    loader = tbg.flow.RaggedLoader(flow_toy.items(64), 32, collate=flow_toy.collate)
    tbg.flow.train(flow_toy.model(), loader, tmp_path, config)
    state = torch.load(tmp_path / "checkpoints" / "step_00000001.pt", weights_only=True)
    trained, ema = tbg.nn.checkpoint.egnn_state(state), state["tbg"]["train_state"]["ema"]
    assert not torch.equal(trained["embedding.weight"], initial["embedding.weight"])
    for k, v in ema.items():
        torch.testing.assert_close(v, initial[k].lerp(trained[k], 0.9), rtol=1e-6, atol=1e-7, msg=k)


def test_training_resumes_after_kill(tmp_path: Path) -> None:
    steps = ["--steps", "40", "--checkpoint-every", "10"]
    full = tmp_path / "full"
    done = _run(["train", str(full), *steps])
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    _kill_when(["train", str(killed), *steps, "--sleep", "0.05"],
               lambda: (killed / "checkpoints" / "step_00000020.pt").exists())
    assert not (killed / "model.pt").exists()
    resumed = _run(["train", str(killed), *steps])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_state(full / "model.pt", killed / "model.pt")
    # Adam and the EMA restart exactly too: the last checkpoints agree in every tensor
    a = torch.load(full / "checkpoints" / "step_00000040.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "step_00000040.pt", weights_only=True)
    torch.testing.assert_close(a["optimizer_state_dict"], b["optimizer_state_dict"], **EXACT)
    torch.testing.assert_close(a["tbg"]["train_state"]["ema"], b["tbg"]["train_state"]["ema"], **EXACT)
    log_full = list(csv.DictReader((full / "train_log.csv").open()))
    log_resumed = list(csv.DictReader((killed / "train_log.csv").open()))
    assert [r["step"] for r in log_resumed] == [r["step"] for r in log_full] == ["10", "20", "30", "40"]
    np.testing.assert_allclose([float(r["loss"]) for r in log_resumed], [float(r["loss"]) for r in log_full],
                               rtol=1e-5)


def test_sampling_resumes_after_kill(tmp_path: Path) -> None:
    args = ["--n-samples", "60", "--batch", "6"]
    full = tmp_path / "full"
    done = _run(["sample", str(full), *args])
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    _kill_when(["sample", str(killed), *args, "--sleep", "0.02"],
               lambda: len(list((killed / "chunks").glob("chunk_*.npz"))) >= 3)
    assert not (killed / "samples.npz").exists()
    resumed = _run(["sample", str(killed), *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(full / "samples.npz"), np.load(killed / "samples.npz")
    np.testing.assert_array_equal(a["latents"], b["latents"])  # drawn from per-chunk seeds: exact
    for key in ("samples", "dlogp"):
        np.testing.assert_allclose(a[key], b[key], **EXACT)
    assert len(np.unique(b["latents"], axis=0)) == 60


def test_two_process_gloo_sampling_and_training(tmp_path: Path) -> None:
    one = _run(["sample", str(tmp_path / "one"), "--n-samples", "40", "--batch", "6"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(["sample", str(tmp_path / "two"), "--n-samples", "40", "--batch", "6"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert len(np.unique(b["latents"], axis=0)) == len(np.unique(a["latents"], axis=0)) == 40
    np.testing.assert_allclose(b["samples"], a["samples"], atol=1e-6)  # same chunks, same seeds
    np.testing.assert_allclose(b["dlogp"], a["dlogp"], atol=1e-5)

    ddp = _torchrun(["train", str(tmp_path / "ddp"), "--steps", "20", "--checkpoint-every", "10"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000020.pt", weights_only=True)
    ts = ckpt["tbg"]["train_state"]
    assert ts["world_size"] == 2 and len(ts["rng"]) == 2 and not torch.equal(ts["rng"][0], ts["rng"][1])
    rows = list(csv.DictReader((tmp_path / "ddp" / "train_log.csv").open()))
    assert [r["step"] for r in rows] == ["10", "20"] and all(np.isfinite(float(r["loss"])) for r in rows)


def test_shipped_alanine_dipeptide_train_and_sample(tmp_path: Path) -> None:
    """Integration with tbg.chem: ragged batches of the shipped frames (tbg.chem.data.collate_ragged), then
    a short joint sampling run of the trained field."""
    from tbg.chem.data import PeptideDataset, collate_ragged

    data = Path(tbg.__file__).parent / "data" / "alanine-dipeptide"
    ds = PeptideDataset(data, encoding="atoms", max_frames=64)
    feats = ds.features[ds.names[0]]
    egnn = tbg.EGNN(feats.shape[1], hidden=8, n_layers=2)
    loader = tbg.flow.RaggedLoader(ds, 16, collate=collate_ragged)
    res = tbg.flow.train(egnn, loader, tmp_path / "train", tbg.flow.TrainConfig(n_steps=4, checkpoint_every=2,
                                                                               progress=False))
    assert res.step == 4 and np.isfinite(res.train_loss)
    # Calling train again on a finished run resumes at its last step: nothing to do, same result.
    again = tbg.flow.train(egnn, loader, tmp_path / "train", tbg.flow.TrainConfig(n_steps=4, checkpoint_every=2,
                                                                                 progress=False))
    assert again.step == 4 and again.train_loss == res.train_loss and again.history == res.history
    dyn = tbg.nn.BoundDynamics(tbg.nn.load_egnn(res.model_path), feats)
    cfg = tbg.flow.SampleConfig(n_samples=4, batch_size=4, solver=tbg.flow.SolverConfig(method="midpoint", n_steps=2),
                                progress=False)
    out = np.load(tbg.flow.sample(dyn, feats.shape[0], tmp_path / "sample", cfg))
    assert out["samples"].shape == (4, 66) and np.isfinite(out["dlogp"]).all()
