"""`tbg` against hostile but realistic use: bad input of every kind and every documented option ends with one
line naming the input and a non-zero exit, never a traceback, and leaves every folder as it was; run
folders refuse a resume with other inputs (the molecule mix-up), are held by one process at a time (two
real processes racing), and survive corrupt files (an unreadable newest checkpoint, a broken sample chunk);
evaluation goes on past non-finite numbers; --device is honoured or refused.

The cases run `tbg.cli.main` in this process (stderr captured); a subset also runs as real processes,
which is what a user sees."""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tbg
from tbg.chem.forcefield import choose_platform
from tbg.cli import COMMANDS
from tbg.errors import InputError
from tbg.nn.checkpoint import egnn_state
from tbg.runfolder import FolderInUse, exclusive, temporary_path, write_atomically

from cli_helpers import FAST_SAMPLE, TINY_TRAIN, random_egnn, run, run_process, simulate_md, tbg_process

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def md_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_md(tmp_path_factory.mktemp("md"))


@pytest.fixture(scope="module")
def work(md_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs and run folders the refused commands point at: a trained run (4 steps), a sampling folder, a
    published transfer checkpoint, and broken files of every kind."""
    root = tmp_path_factory.mktemp("work")
    paths = {"md": md_dir, "root": root}
    paths["run"] = root / "run"
    assert tbg.cli.main(["train", "--data", str(md_dir), "--out", str(paths["run"]), "--steps", "4",
                         *TINY_TRAIN]) == 0
    paths["t76"] = root / "t76.pt"
    tbg.save_published(paths["t76"], random_egnn(76))
    paths["sample"] = root / "sample"
    assert tbg.cli.main(["sample", "--published", str(paths["t76"]), "--peptide", "AS", "--n", "4", "--out",
                         str(paths["sample"]), *FAST_SAMPLE]) == 0

    bad = root / "bad"
    bad.mkdir()
    arrays, pdb = md_dir / "ala2-traj-arrays.npz", md_dir / "ala2-traj-state0.pdb"
    for name in ("trunc", "nopos", "nan"):
        shutil.copy(pdb, bad / f"{name}-traj-state0.pdb")
    data = arrays.read_bytes()
    (bad / "trunc-traj-arrays.npz").write_bytes(data[: len(data) // 2])
    np.savez(bad / "nopos-traj-arrays.npz", step=np.arange(3))
    with np.load(arrays) as f:
        positions = f["positions"].copy()
    positions[3, 5, 1] = np.nan
    np.savez(bad / "nan-traj-arrays.npz", positions=positions)

    checkpoint = paths["t76"].read_bytes()
    (bad / "trunc.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    (bad / "text.pt").write_text("model weights\n")
    (bad / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"payload": _Payload(str(bad / "pwned"))}, bad / "evil.pt")
    corrupt_run = bad / "corrupt_run"
    shutil.copytree(paths["run"], corrupt_run)
    model = (corrupt_run / "model.pt").read_bytes()
    (corrupt_run / "model.pt").write_bytes(model[:100])
    (bad / "garbage.pdb").write_text("this is not a PDB file\n")

    (bad / "trunc_samples.npz").write_bytes((paths["sample"] / "samples.npz").read_bytes()[:200])
    np.savez(bad / "nosamples.npz", positions=np.zeros((2, 66)))

    for name, text in {"hidden_word": 'hidden = "sixteen"\n', "hidden_float": "hidden = 16.5\n",
                       "data_path": 'data = "/nonexistent/md"\n', "table": "[hidden]\nsize = 8\n",
                       "switch": "no-progress = 3\n", "unknown": "hiden = 8\n", "broken": "hidden = \n"}.items():
        (bad / f"{name}.toml").write_text(text)

    md_corrupt = root / "md_corrupt"
    shutil.copytree(md_dir, md_corrupt)
    checkpoint_npz = md_corrupt / "ala2-traj-checkpoint.npz"
    checkpoint_npz.write_bytes(checkpoint_npz.read_bytes()[:300])
    bad_manifest = root / "bad_manifest"
    shutil.copytree(paths["sample"], bad_manifest)
    (bad_manifest / "run.json").write_text('{"kind": "sampling", "defines": ')
    no_manifest = root / "no_manifest"
    shutil.copytree(paths["sample"], no_manifest)
    (no_manifest / "run.json").unlink()
    two_molecules = root / "two_molecules"
    two_molecules.mkdir()
    for name in ("a", "b"):
        shutil.copy(pdb, two_molecules / f"{name}-traj-state0.pdb")
        shutil.copy(arrays, two_molecules / f"{name}-traj-arrays.npz")
    paths.update(bad=bad, md_corrupt=md_corrupt, bad_manifest=bad_manifest, no_manifest=no_manifest,
                 two_molecules=two_molecules)
    return paths


class _Payload:
    """A pickle that would create a file when loaded unrestricted."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the folders (a missing folder has none)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(command: str, code: int, err: str) -> str:
    """The error line of a refused command, after checking the common form: non-zero exit, no traceback, the
    last line of stderr is `tbg COMMAND: error: ...`."""
    assert code != 0
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tbg {command}: error: " if command else "tbg: error: "), err
    return last


# --------------------------------------------------------------------------------------------------- the table
# (argv, what the error line must say); {name} is a path from `work`, {out} a fresh folder. Every case must
# leave the folders it names (and the inputs) exactly as they were, and create no --out folder.
ISSUE_CASES = {
    "quadrature panels out of order": (["demo", "--quick", "--out", "{out}/demo", "--quadrature-panels", "0.3", "0.1"],
                                       "--quadrature-panels 0.3 0.1: the times must increase"),
    "ode panels out of order": (["finetune", "--checkpoint", "{run}", "--out", "{out}", "--ode-panels", "0.3", "0.1"],
                                "--ode-panels 0.3 0.1: the times must increase"),
    "micro-batch not dividing the batch": (["finetune", "--checkpoint", "{run}", "--out", "{out}", "--batch-size", "16",
                                            "--micro-batch-size", "6"],
                                           "--micro-batch-size 6 must divide --batch-size 16"),
    "ode panels of an adaptive solver": (["finetune", "--checkpoint", "{run}", "--out", "{out}", "--method", "dopri5",
                                          "--ode-panels", "0.1"], "--ode-panels sets the steps of a fixed-step"),
    "finetune data without max-likelihood": (["finetune", "--checkpoint", "{run}", "--out", "{out}", "--data", "{md}"],
                                             "--data and --topology name the MD frames of --objective max-likelihood"),
    "renyi order of another objective": (["finetune", "--checkpoint", "{run}", "--out", "{out}", "--renyi-order", "2"],
                                         "--renyi-order is the order of --objective renyi only"),
    "validation frames of another objective": (["finetune", "--checkpoint", "{run}", "--out", "{out}",
                                                "--validation-frames", "8"],
                                               "--validation-frames scores held-out MD frames of --objective"),
    # corrupt or foreign inputs, reported by path
    "data truncated npz": (["train", "--data", "{bad}/trunc-traj-arrays.npz", "--out", "{out}"],
                           "trunc-traj-arrays.npz: not a readable .npz file"),
    "data without positions": (["train", "--data", "{bad}/nopos-traj-arrays.npz", "--out", "{out}"],
                               "nopos-traj-arrays.npz has no 'positions' array"),
    "data with NaN": (["train", "--data", "{bad}/nan-traj-arrays.npz", "--out", "{out}"],
                      "nan-traj-arrays.npz: positions contain NaN/inf"),
    "checkpoint truncated": (["sample", "--published", "{bad}/trunc.pt", "--peptide", "AS", "--out", "{out}"],
                             "trunc.pt: not a readable PyTorch checkpoint"),
    "checkpoint text": (["sample", "--published", "{bad}/text.pt", "--peptide", "AS", "--out", "{out}"],
                        "text.pt: not a readable PyTorch checkpoint"),
    "checkpoint random bytes": (["sample", "--published", "{bad}/random.pt", "--peptide", "AS", "--out", "{out}"],
                                "random.pt: not a readable PyTorch checkpoint"),
    "checkpoint malicious pickle": (["sample", "--published", "{bad}/evil.pt", "--peptide", "AS", "--out", "{out}"],
                                    "evil.pt: not a readable PyTorch checkpoint (corrupt, or holding objects other "
                                    "than tensors and plain containers, which tbg refuses to load)"),
    "run with truncated model.pt": (["sample", "--checkpoint", "{bad}/corrupt_run", "--out", "{out}"],
                                    "model.pt: not a readable PyTorch checkpoint"),
    "simulate checkpoint corrupt": (["simulate", "--out", "{md_corrupt}", "--frames", "41", "--frame-interval", "50",
                                     "--equilibration", "0"],
                                    "ala2-traj-checkpoint.npz: not a readable simulation checkpoint"),
    "run.json invalid": (["sample", "--published", "{t76}", "--peptide", "AS", "--n", "4", "--out", "{bad_manifest}",
                          *FAST_SAMPLE], "run.json: not a readable run manifest"),
    "chunks without run.json": (["sample", "--published", "{t76}", "--peptide", "AS", "--n", "4", "--out",
                                 "{no_manifest}", *FAST_SAMPLE], "holds chunks, samples.npz but no run.json"),
    "samples truncated": (["evaluate", "--samples", "{bad}/trunc_samples.npz", "--data", "{md}", "--out", "{out}"],
                          "trunc_samples.npz: not a readable .npz file"),
    "samples without samples": (["evaluate", "--samples", "{bad}/nosamples.npz", "--data", "{md}", "--out", "{out}"],
                                "nosamples.npz has no 'samples' array"),
    "encoding does not fit the checkpoint": (["sample", "--checkpoint", "{run}", "--encoding", "transfer", "--out",
                                              "{out}"], "the transfer encoding gives 76 atom features, but"),
    "training data twice": (["train", "--data", "{md}", "{md}", "--out", "{out}"], "peptide 'ala2' given twice"),
    "sample batch size word": (["sample", "--published", "{t76}", "--peptide", "AS", "--out", "{out}",
                                "--sample-batch-size", "automatic"],
                               "argument --sample-batch-size: invalid value 'automatic': expected an integer >= 1 or "
                               "'auto'"),
    "profile without a molecule": (["profile", "--out", "{out}", "--hidden", "8"],
                                   "name the molecule with --peptide SEQ or --pdb FILE"),
    "profile batch sizes list": (["profile", "--peptide", "ala2", "--out", "{out}", "--batch-sizes", "16,64"],
                                 "argument --batch-sizes: invalid value '16,64': expected an integer >= 1"),
    "pdb garbage": (["sample", "--published", "{t76}", "--pdb", "{bad}/garbage.pdb", "--out", "{out}"],
                    "garbage.pdb: "),
    # config files: values parsed like flags
    "toml word for int": (["train", "--config", "{bad}/hidden_word.toml", "--out", "{out}"],
                          "hidden_word.toml: argument --hidden: invalid value 'sixteen': expected an integer >= 1"),
    "toml float for int": (["train", "--config", "{bad}/hidden_float.toml", "--out", "{out}"],
                           "argument --hidden: invalid value '16.5'"),
    "toml path string": (["train", "--config", "{bad}/data_path.toml", "--out", "{out}"],
                         "--data /nonexistent/md: no such file or folder"),
    "toml table": (["train", "--config", "{bad}/table.toml", "--out", "{out}"], "hidden is a table"),
    "toml switch with a value": (["train", "--config", "{bad}/switch.toml", "--out", "{out}"],
                                 "argument --no-progress: ignored explicit argument '3'"),
    "toml unknown key": (["train", "--config", "{bad}/unknown.toml", "--out", "{out}"], "unknown option 'hiden'"),
    "toml broken": (["train", "--config", "{bad}/broken.toml", "--out", "{out}"], "is not valid TOML"),
    # a resume with other inputs: refused, naming the field
    "sample other molecule": (["sample", "--published", "{t76}", "--peptide", "SA", "--n", "4", "--out", "{sample}",
                               *FAST_SAMPLE], "molecule.sequence is \"ALA-SER\" there but \"SER-ALA\" now"),
    "sample other n": (["sample", "--published", "{t76}", "--peptide", "AS", "--n", "5", "--out", "{sample}",
                        *FAST_SAMPLE], "n_samples is 4 there but 5 now"),
    "sample bad peptide into a run": (["sample", "--published", "{t76}", "--peptide", "AX", "--n", "999", "--out",
                                       "{sample}"], "--peptide 'AX': unknown residue letter(s) 'X'"),
    "sample into a training run": (["sample", "--checkpoint", "{run}", "--out", "{run}", *FAST_SAMPLE],
                                   "holds a training run, not a sampling run"),
    "train other lr": (["train", "--data", "{md}", "--out", "{run}", "--steps", "6", *TINY_TRAIN, "--lr", "0.1"],
                       "lr is 0.0005 there but 0.1 now"),
    "train other hidden": (["train", "--data", "{md}", "--out", "{run}", "--steps", "6", *TINY_TRAIN,
                            "--hidden", "16"], "hidden is 8 there but 16 now"),
    "train fewer steps than done": (["train", "--data", "{md}", "--out", "{run}", "--steps", "2", *TINY_TRAIN],
                                    "holds a training run at step 4, past the 2 steps asked for"),
    "train init of another size": (["train", "--data", "{md}", "--out", "{out}", "--init", "{t76}", *TINY_TRAIN],
                                   "t76.pt: its model does not fit this run: n_features 76 (this run: 22)"),
    "train other init": (["train", "--data", "{md}", "--out", "{run}", "--steps", "6", *TINY_TRAIN, "--init",
                          "{run}/model.pt"], "init_sha256 is \"(absent)\" there but"),
    "train other data": (["train", "--data", "{two_molecules}/a-traj-arrays.npz", "--out", "{run}", "--steps", "6",
                          *TINY_TRAIN], "molecules[0].name is \"ala2\" there but \"a\" now"),
    "refine samples of a training run": (["refine", "--samples", "{run}", "--out", "{out}"],
                                         "samples.npz not found: --samples names the folder of a `tbg sample` run"),
    # quietly ignored before
    "empty peptide": (["sample", "--published", "{t76}", "--peptide", "", "--out", "{out}"],
                      "--peptide '': sequence must be a non-empty string"),
    "out is a file": (["train", "--data", "{md}", "--out", "{t76}"], "exists and is not a folder"),
}

# One bad value per documented option of every command (the walk through `tbg <command> --help`).
OPTION_CASES = {
    ("simulate", "--out"): (["simulate", "--out", "{t76}"], "exists and is not a folder"),
    ("simulate", "--device"): (["simulate", "--out", "{out}", "--device", "gpu"],
                               "--device: unknown device 'gpu': expected cpu, cuda or cuda:N"),
    ("simulate", "--seed"): (["simulate", "--out", "{out}", "--seed", "-1"], "argument --seed: invalid value '-1'"),
    ("simulate", "--config"): (["simulate", "--config", "{out}/none.toml"], "config file not found"),
    ("simulate", "--peptide"): (["simulate", "--out", "{out}", "--peptide", "AX"],
                                "--peptide 'AX': unknown residue letter(s) 'X'"),
    ("simulate", "--frames"): (["simulate", "--out", "{out}", "--frames", "0"], "argument --frames: invalid value '0'"),
    ("simulate", "--frame-interval"): (["simulate", "--out", "{out}", "--frame-interval", "0"],
                                       "argument --frame-interval"),
    ("simulate", "--equilibration"): (["simulate", "--out", "{out}", "--equilibration", "-1"],
                                      "argument --equilibration: invalid value '-1': expected an integer >= 0"),
    ("simulate", "--timestep-fs"): (["simulate", "--out", "{out}", "--timestep-fs", "-1"],
                                    "argument --timestep-fs: invalid value '-1': expected a number > 0"),
    ("simulate", "--temperature"): (["simulate", "--out", "{out}", "--temperature", "-5"],
                                    "argument --temperature: invalid value '-5'"),
    ("simulate", "--hydrogen-mass"): (["simulate", "--out", "{out}", "--hydrogen-mass", "9"],
                                      "argument --hydrogen-mass: invalid value '9': expected a mass between 1 and 4"),
    ("train", "--out"): (["train", "--data", "{md}"], "--out DIR is required"),
    ("train", "--device"): (["train", "--out", "{out}", "--device", "gpu"], "--device 'gpu' is not a torch device"),
    ("train", "--seed"): (["train", "--out", "{out}", "--seed", "x"], "argument --seed: invalid value 'x'"),
    ("train", "--config"): (["train", "--config", "{out}/none.toml"], "config file not found"),
    ("train", "--data"): (["train", "--data", "{out}/nowhere", "--out", "{out}"], "nowhere: no such file or folder"),
    ("train", "--topology"): (["train", "--data", "{md}", "--topology", "{out}/none.pdb", "--out", "{out}"],
                              "--topology {out}/none.pdb: file not found"),
    ("train", "--hidden"): (["train", "--out", "{out}", "--hidden", "0"], "argument --hidden: invalid value '0'"),
    ("train", "--layers"): (["train", "--out", "{out}", "--layers", "0"], "argument --layers: invalid value '0'"),
    ("train", "--steps"): (["train", "--out", "{out}", "--steps", "-1"], "argument --steps: invalid value '-1'"),
    ("train", "--epochs"): (["train", "--out", "{out}", "--epochs", "0"], "argument --epochs: invalid value '0'"),
    ("train", "--batch-size"): (["train", "--out", "{out}", "--batch-size", "0"], "argument --batch-size"),
    ("train", "--init"): (["train", "--out", "{out}", "--init", "{out}/none.pt"], "--init {out}/none.pt: file not found"),
    ("train", "--lr"): (["train", "--out", "{out}", "--lr", "nan"], "argument --lr: invalid value 'nan'"),
    ("train", "--lr-milestones"): (["train", "--out", "{out}", "--lr-milestones", "10", "-5"],
                                   "argument --lr-milestones: invalid value '-5'"),
    ("train", "--ema"): (["train", "--out", "{out}", "--ema", "1.5"],
                         "argument --ema: invalid value '1.5': expected a number between 0 and 1"),
    ("train", "--val-fraction"): (["train", "--out", "{out}", "--val-fraction", "1"], "argument --val-fraction"),
    ("train", "--checkpoint-every"): (["train", "--out", "{out}", "--checkpoint-every", "0"],
                                      "argument --checkpoint-every"),
    ("train", "--coupling"): (["train", "--out", "{out}", "--coupling", "optimal"],
                              "argument --coupling: invalid choice"),
    ("train", "--keep-checkpoints"): (["train", "--out", "{out}", "--keep-checkpoints", "0"],
                                      "argument --keep-checkpoints: invalid value '0'"),
    ("train", "--encoding"): (["train", "--out", "{out}", "--encoding", "onehot"],
                              "argument --encoding: invalid choice"),
    ("train", "--backend"): (["train", "--out", "{out}", "--backend", "cuda"], "argument --backend: invalid choice"),
    ("sample", "--out"): (["sample", "--published", "{t76}", "--peptide", "AS"], "--out DIR is required"),
    ("sample", "--device"): (["sample", "--published", "{t76}", "--peptide", "AS", "--out", "{out}", "--device",
                              "tpu"], "--device 'tpu' is not a torch device"),
    ("sample", "--seed"): (["sample", "--out", "{out}", "--seed", "1.5"], "argument --seed"),
    ("sample", "--config"): (["sample", "--config", "{out}/none.toml"], "config file not found"),
    ("sample", "--checkpoint"): (["sample", "--checkpoint", "{out}/none", "--peptide", "AS", "--out", "{out}"],
                                 "not found"),
    ("sample", "--published"): (["sample", "--published", "{out}/none.pt", "--peptide", "AS", "--out", "{out}"],
                                "checkpoint file not found"),
    ("sample", "--peptide"): (["sample", "--published", "{t76}", "--peptide", "AX", "--out", "{out}"],
                              "--peptide 'AX': unknown residue letter(s) 'X'"),
    ("sample", "--pdb"): (["sample", "--published", "{t76}", "--pdb", "{out}/none.pdb", "--out", "{out}"],
                          "topology file not found"),
    ("sample", "--encoding"): (["sample", "--out", "{out}", "--encoding", "x"], "argument --encoding: invalid choice"),
    ("sample", "--backend"): (["sample", "--out", "{out}", "--backend", "x"], "argument --backend: invalid choice"),
    ("sample", "--n"): (["sample", "--out", "{out}", "--n", "0"], "argument --n: invalid value '0'"),
    ("sample", "--sample-batch-size"): (["sample", "--out", "{out}", "--sample-batch-size", "-4"],
                                        "argument --sample-batch-size"),
    ("sample", "--memory-budget"): (["sample", "--out", "{out}", "--memory-budget", "0"],
                                    "argument --memory-budget: invalid value '0': expected a number > 0"),
    ("sample", "--likelihood"): (["sample", "--out", "{out}", "--likelihood", "exact"],
                                 "argument --likelihood: invalid choice"),
    ("sample", "--method"): (["sample", "--out", "{out}", "--method", "rk45"], "argument --method: invalid choice"),
    ("sample", "--atol"): (["sample", "--out", "{out}", "--atol", "0"], "argument --atol: invalid value '0'"),
    ("sample", "--rtol"): (["sample", "--out", "{out}", "--rtol", "inf"], "argument --rtol: invalid value 'inf'"),
    ("sample", "--ode-steps"): (["sample", "--out", "{out}", "--ode-steps", "0"], "argument --ode-steps"),
    ("sample", "--quadrature"): (["sample", "--out", "{out}", "--quadrature", "0"], "argument --quadrature"),
    ("sample", "--quadrature-panels"): (["sample", "--out", "{out}", "--quadrature-panels", "0.1", "1"],
                                        "argument --quadrature-panels: invalid value '1'"),
    ("sample", "--prior-scale"): (["sample", "--out", "{out}", "--prior-scale", "0"],
                                  "argument --prior-scale: invalid value '0': expected a number > 0"),
    ("sample", "--dtype"): (["sample", "--out", "{out}", "--dtype", "float16"], "argument --dtype: invalid choice"),
    ("sample", "--trajectory"): (["sample", "--out", "{out}", "--trajectory", "gro"],
                                 "argument --trajectory: invalid choice"),
    ("sample", "--temperature"): (["sample", "--out", "{out}", "--temperature", "0"], "argument --temperature"),
    ("evaluate", "--out"): (["evaluate", "--samples", "{sample}", "--data", "{md}"], "--out DIR is required"),
    ("evaluate", "--device"): (["evaluate", "--samples", "{sample}", "--data", "{md}", "--out", "{out}", "--device",
                                "gpu"], "expected cpu, cuda or cuda:N"),
    ("evaluate", "--seed"): (["evaluate", "--out", "{out}", "--seed", "-3"], "argument --seed"),
    ("evaluate", "--config"): (["evaluate", "--config", "{out}/none.toml"], "config file not found"),
    ("evaluate", "--samples"): (["evaluate", "--samples", "{out}/none.npz", "--data", "{md}", "--out", "{out}"],
                                "samples file not found"),
    ("evaluate", "--data"): (["evaluate", "--samples", "{sample}", "--data", "{two_molecules}", "--out", "{out}"],
                             "holds 2 molecules"),
    ("evaluate", "--topology"): (["evaluate", "--samples", "{sample}", "--data", "{md}", "--topology",
                                  "{out}/none.pdb", "--out", "{out}"], "--topology {out}/none.pdb: file not found"),
    ("evaluate", "--md-frames"): (["evaluate", "--out", "{out}", "--md-frames", "0"], "argument --md-frames"),
    ("evaluate", "--temperature"): (["evaluate", "--out", "{out}", "--temperature", "-1"], "argument --temperature"),
    ("evaluate", "--clip-quantile"): (["evaluate", "--out", "{out}", "--clip-quantile", "2"],
                                      "argument --clip-quantile: invalid value '2': expected a number > 0 and <= 1"),
    ("evaluate", "--energy-cutoff"): (["evaluate", "--out", "{out}", "--energy-cutoff", "20", "-1"],
                                      "argument --energy-cutoff: invalid value '-1': expected a number > 0"),
    ("evaluate", "--w2-points"): (["evaluate", "--out", "{out}", "--w2-points", "0"], "argument --w2-points"),
    ("evaluate", "--bins"): (["evaluate", "--out", "{out}", "--bins", "0"], "argument --bins"),
    ("evaluate", "--bootstrap"): (["evaluate", "--out", "{out}", "--bootstrap", "0"], "argument --bootstrap"),
    ("refine", "--out"): (["refine", "--samples", "{sample}"], "--out DIR is required"),
    ("refine", "--device"): (["refine", "--samples", "{sample}", "--out", "{out}", "--device", "gpu"],
                             "expected cpu, cuda or cuda:N"),
    ("refine", "--seed"): (["refine", "--out", "{out}", "--seed", "-1"], "argument --seed"),
    ("refine", "--config"): (["refine", "--config", "{out}/none.toml"], "config file not found"),
    ("refine", "--samples"): (["refine", "--samples", "{run}", "--out", "{out}"], "samples.npz not found"),
    ("refine", "--checkpoint"): (["refine", "--samples", "{sample}", "--checkpoint", "{out}/none.pt", "--out",
                                  "{out}"], "checkpoint file not found"),
    ("refine", "--temperature"): (["refine", "--out", "{out}", "--temperature", "0"], "argument --temperature"),
    ("refine", "--backend"): (["refine", "--out", "{out}", "--backend", "x"], "argument --backend: invalid choice"),
    ("refine", "--trajectory"): (["refine", "--out", "{out}", "--trajectory", "gro"],
                                 "argument --trajectory: invalid choice"),
    **{("refine", flag): (["refine", "--samples", "{sample}", "--out", "{out}", flag, value], f"argument {flag}: invalid")
       for flag, value in [("--scheme", "smc"), ("--particles", "1"), ("--n-moves", "-1"), ("--step-size", "0"),
                           ("--target-cess", "1"), ("--resample-threshold", "1.5"), ("--mcmc-chains", "0"),
                           ("--mcmc-burn-in", "-1"), ("--mcmc-local-steps", "x"), ("--checkpoint-interval", "-1")]},
    ("finetune", "--out"): (["finetune", "--checkpoint", "{run}"], "--out DIR is required"),
    ("finetune", "--device"): (["finetune", "--checkpoint", "{run}", "--out", "{out}", "--device", "gpu"],
                               "expected cpu, cuda or cuda:N"),
    ("finetune", "--seed"): (["finetune", "--out", "{out}", "--seed", "-1"], "argument --seed"),
    ("finetune", "--config"): (["finetune", "--config", "{out}/none.toml"], "config file not found"),
    ("finetune", "--checkpoint"): (["finetune", "--checkpoint", "{out}/none.pt", "--out", "{out}"],
                                   "checkpoint file not found"),
    ("finetune", "--published"): (["finetune", "--published", "{bad}/text.pt", "--pdb", "{md}/ala2-traj-state0.pdb",
                                   "--out", "{out}"], "text.pt: not a readable PyTorch checkpoint"),
    ("finetune", "--pdb"): (["finetune", "--checkpoint", "{run}", "--pdb", "{bad}/garbage.pdb", "--out", "{out}"],
                            "garbage.pdb: "),
    ("finetune", "--data"): (["finetune", "--checkpoint", "{run}", "--objective", "max-likelihood", "--data",
                              "{two_molecules}", "--out", "{out}"], "holds 2 molecules"),
    ("finetune", "--topology"): (["finetune", "--checkpoint", "{run}", "--objective", "max-likelihood", "--data",
                                  "{md}", "--topology", "{out}/none.pdb", "--out", "{out}"],
                                 "--topology {out}/none.pdb: file not found"),
    **{("finetune", flag): (["finetune", "--checkpoint", "{run}", "--out", "{out}", flag, value],
                            f"argument {flag}: invalid")
       for flag, value in [("--encoding", "x"), ("--backend", "x"), ("--temperature", "0"), ("--objective", "kl"),
                           ("--renyi-order", "1"), ("--steps", "0"), ("--batch-size", "0"), ("--lr", "0"),
                           ("--grad-clip", "-1"), ("--divergence", "x"), ("--probes", "0"), ("--method", "x"),
                           ("--ode-steps", "0"), ("--ode-panels", "1"), ("--micro-batch-size", "0"),
                           ("--checkpoint-every", "0"), ("--keep-checkpoints", "0"),
                           ("--validation-frames", "-1")]},
    ("demo", "--out"): (["demo", "--out", "{t76}", "--data", "{md}"], "exists and is not a folder"),
    ("demo", "--device"): (["demo", "--out", "{out}", "--device", "gpu"], "expected cpu, cuda or cuda:N"),
    ("demo", "--seed"): (["demo", "--out", "{out}", "--seed", "-1"], "argument --seed"),
    ("demo", "--config"): (["demo", "--config", "{out}/none.toml"], "config file not found"),
    ("demo", "--quick"): (["demo", "--quick", "--full", "--out", "{out}"], "argument --full: not allowed with"),
    ("demo", "--data"): (["demo", "--data", "{two_molecules}", "--out", "{out}"], "the demo trains on one molecule"),
    ("demo", "--topology"): (["demo", "--data", "{md}", "--topology", "{out}/none.pdb", "--out", "{out}"],
                             "--topology {out}/none.pdb: file not found"),
    **{("demo", flag): (["demo", "--out", "{out}", flag, value], f"argument {flag}: invalid")
       for flag, value in [("--hidden", "0"), ("--layers", "-2"), ("--steps", "-1"), ("--epochs", "0"),
                           ("--batch-size", "0"), ("--lr", "-1"), ("--lr-milestones", "x"), ("--ema", "0"),
                           ("--coupling", "x"), ("--keep-checkpoints", "-1"), ("--model", "mine"),
                           ("--val-fraction", "-0.1"), ("--checkpoint-every", "0"), ("--encoding", "x"),
                           ("--backend", "x"), ("--n", "0"), ("--sample-batch-size", "0"), ("--memory-budget", "-1"),
                           ("--likelihood", "x"),
                           ("--method", "x"), ("--atol", "-1"), ("--rtol", "0"), ("--ode-steps", "0"),
                           ("--quadrature", "0"), ("--quadrature-panels", "x"), ("--prior-scale", "-1"),
                           ("--dtype", "half"),
                           ("--trajectory", "x"), ("--md-frames", "0"),
                           ("--temperature", "0"), ("--clip-quantile", "0"), ("--energy-cutoff", "x"),
                           ("--w2-points", "0"), ("--bins", "0"), ("--bootstrap", "0"), ("--model", "x"),
                           ("--refine", "maybe"),
                           ("--scheme", "x"), ("--particles", "0"), ("--n-moves", "x"), ("--step-size", "-1"),
                           ("--target-cess", "0"), ("--resample-threshold", "-1"), ("--mcmc-chains", "-1"),
                           ("--mcmc-burn-in", "x"), ("--mcmc-local-steps", "-2"), ("--checkpoint-interval", "x"),
                           ("--likelihood-check", "-1")]},
    ("profile", "--out"): (["profile", "--peptide", "ala2"], "--out DIR is required"),
    ("profile", "--device"): (["profile", "--peptide", "ala2", "--out", "{out}", "--device", "tpu"],
                              "--device 'tpu' is not a torch device"),
    ("profile", "--seed"): (["profile", "--out", "{out}", "--seed", "-1"], "argument --seed"),
    ("profile", "--config"): (["profile", "--config", "{out}/none.toml"], "config file not found"),
    ("profile", "--checkpoint"): (["profile", "--checkpoint", "{out}/none", "--peptide", "AS", "--out", "{out}"],
                                  "not found"),
    ("profile", "--published"): (["profile", "--published", "{bad}/text.pt", "--peptide", "AS", "--out", "{out}"],
                                 "text.pt: not a readable PyTorch checkpoint"),
    ("profile", "--peptide"): (["profile", "--peptide", "AX", "--out", "{out}"],
                               "--peptide 'AX': unknown residue letter(s) 'X'"),
    ("profile", "--pdb"): (["profile", "--pdb", "{bad}/garbage.pdb", "--out", "{out}"], "garbage.pdb: "),
    **{("profile", flag): (["profile", "--out", "{out}", flag, value], f"argument {flag}: invalid")
       for flag, value in [("--hidden", "0"), ("--layers", "x"), ("--encoding", "x"), ("--backend", "x"),
                           ("--batch-sizes", "0"), ("--likelihoods", "exact"), ("--min-samples", "-1"),
                           ("--min-seconds", "nan"), ("--memory-budget", "0"), ("--method", "x"), ("--atol", "0"),
                           ("--rtol", "-1"), ("--ode-steps", "0"), ("--quadrature", "0"), ("--dtype", "half")]},
    ("bench", "NAME"): (["bench", "no_such_benchmark"], "no benchmark 'no_such_benchmark'"),
    ("bench", "--args"): (["bench", "--args='unclosed"], "--args \"'unclosed\": No closing quotation"),
    ("bench", "--config"): (["bench", "--config", "{out}/none.toml"], "config file not found"),
    ("info", "--config"): (["info", "--config", "{out}/none.toml"], "config file not found"),
}
# Switches (a bad value is a config-file matter: "toml switch with a value") and help.
SWITCHES = {"--no-progress", "--no-likelihood", "--profile", "--quick", "--full", "--list", "--debug", "--help",
            "--mcmc"}


def _fill(argv: list[str], work: dict[str, Path], out: Path) -> list[str]:
    return [a.format(out=out, **work) for a in argv]


def _refused(argv: list[str], work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    out = tmp_path / "out"
    argv = _fill(argv, work, out)
    named = [Path(a) for a in argv if Path(a).is_dir()]
    before = snapshot(work["md"], work["run"], work["sample"], *named)
    code, _, err = run(argv, capsys)
    last = error_line(argv[0], code, err)
    assert snapshot(work["md"], work["run"], work["sample"], *named) == before, "a refused run changed a folder"
    assert not out.exists() or not any(out.iterdir()), "a refused run wrote into --out"
    return last


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_refused_input(case: str, work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv, expected = ISSUE_CASES[case]
    last = _refused(argv, work, tmp_path, capsys)
    assert expected.format(**work) in last
    assert "weights_only" not in last  # never advise loading a checkpoint unrestricted
    assert not (work["bad"] / "pwned").exists()  # the malicious pickle never ran


@pytest.mark.parametrize("option", list(OPTION_CASES), ids=lambda key: " ".join(key))
def test_bad_option_value(option: tuple[str, str], work: dict[str, Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    argv, expected = OPTION_CASES[option]
    last = _refused(argv, work, tmp_path, capsys)
    assert expected.format(out=tmp_path / "out", **work) in last


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_documented_option_is_walked(command: str, capsys: pytest.CaptureFixture) -> None:
    """Every flag in `tbg COMMAND --help` has a bad-value case above (or is a switch)."""
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    flags = set(re.findall(r"^ {2}(?:-\w, )?(--[a-z][a-z0-9-]*)", out, re.MULTILINE))
    covered = {flag for (cmd, flag) in OPTION_CASES if cmd == command}
    assert flags - SWITCHES - covered == set()


# Two of the cases (each real process spends seconds importing torch); the two-process tests below see the
# refusal of a busy folder in real processes as well.
REAL_PROCESS_CASES = ["checkpoint random bytes", "toml word for int"]


def test_refused_input_in_real_processes(work: dict[str, Path], tmp_path: Path) -> None:
    """What a user sees: exactly one line on stderr (no log lines precede these refusals), exit status 2. The
    processes run side by side (each spends seconds importing torch)."""
    procs = {case: subprocess.Popen(tbg_process(_fill(ISSUE_CASES[case][0], work, tmp_path / case)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for case in REAL_PROCESS_CASES}
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err, (case, err)
        assert len(err.strip().splitlines()) == 1, (case, err)
        command, expected = ISSUE_CASES[case][0][0], ISSUE_CASES[case][1]
        assert err.startswith(f"tbg {command}: error: ") and expected.format(**work) in err, (case, err)


def test_unexpected_errors_point_to_debug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, md_dir: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """An error nobody planned for is one line with a pointer to --debug; --debug or TBG_DEBUG=1 show the
    traceback; a full disk is one line without it."""
    import tbg.flow.runs

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(tbg.flow.runs, "train_on_md", boom)
    argv = ["train", "--data", md_dir, "--out", tmp_path / "t"]
    code, _, err = run(argv, capsys)
    assert code == 1
    assert error_line("train", code, err) == ("tbg train: error: RuntimeError: boom second line (unexpected; rerun "
                                              "with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="boom"):
        tbg.cli.main([str(a) for a in argv] + ["--debug"])
    monkeypatch.setenv("TBG_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        tbg.cli.main([str(a) for a in argv])
    monkeypatch.delenv("TBG_DEBUG")

    def full_disk(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "t" / "model.pt"))

    monkeypatch.setattr(tbg.flow.runs, "train_on_md", full_disk)
    code, _, err = run(argv, capsys)
    assert code == 1 and error_line("train", code, err).endswith(f"No space left on device: '{tmp_path}/t/model.pt'")


# --------------------------------------------------------------------------------------------------- run folders
def test_molecule_mix_up_is_refused(work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """AS then SA into one folder: the second is refused and the folder keeps AS (samples and topology); after
    an interruption, SA is refused as well and the AS run resumes to the same samples."""
    def sample(peptide: str, out: Path) -> tuple[int, str]:
        code, _, err = run(["sample", "--published", work["t76"], "--peptide", peptide, "--n", 8,
                            "--sample-batch-size", 4, "--out", out, *FAST_SAMPLE], capsys)
        return code, err

    mix = tmp_path / "mix"
    code, err = sample("AS", mix)
    assert code == 0, err
    with np.load(mix / "samples.npz") as f:
        reference = f["samples"].copy()
    before = snapshot(mix)
    code, err = sample("SA", mix)
    assert "molecule.sequence is \"ALA-SER\" there but \"SER-ALA\" now" in error_line("sample", code, err)
    assert snapshot(mix) == before

    interrupted = tmp_path / "interrupted"
    assert sample("AS", interrupted)[0] == 0
    (interrupted / "chunks" / "chunk_000001.npz").unlink()  # killed after the first chunk
    (interrupted / "samples.npz").unlink()
    code, err = sample("SA", interrupted)
    assert "molecule.sequence" in error_line("sample", code, err)
    assert sorted(p.name for p in (interrupted / "chunks").iterdir()) == ["chunk_000000.npz"]
    assert sample("AS", interrupted)[0] == 0
    with np.load(interrupted / "samples.npz") as f:
        np.testing.assert_array_equal(f["samples"], reference)


def test_config_json_records_the_values_in_force(work: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """config.json is written once a run goes ahead, with what it runs with: a resume may change the number of
    steps and the checkpoint interval (not recorded in run.json), and config.json follows."""
    out = tmp_path / "run"
    shutil.copytree(work["run"], out)
    code, _, err = run(["train", "--data", work["md"], "--out", out, "--steps", "6", *TINY_TRAIN,
                        "--checkpoint-every", "3"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["checkpoint_every"], config["lr"], config["device"]) == (6, 3, 5e-4, "cpu")
    assert torch.load(out / "model.pt", weights_only=True)["global_it"] == 6
    steps = [int(row.split(",")[0]) for row in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_corrupt_newest_checkpoint_falls_back(md_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Training resumes from the newest readable checkpoint, names the one it skipped, keeps it as .corrupt, and
    ends bit-identical to a run never interrupted."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(["train", "--data", md_dir, "--out", straight, "--steps", 6, *TINY_TRAIN], capsys)[0] == 0
    assert run(["train", "--data", md_dir, "--out", resumed, "--steps", 4, *TINY_TRAIN], capsys)[0] == 0
    newest = resumed / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a copy cut short
    with caplog.at_level("WARNING", logger="tbg"):
        code, _, err = run(["train", "--data", md_dir, "--out", resumed, "--steps", 6, *TINY_TRAIN], capsys)
    assert code == 0, err
    assert "skipping an unreadable checkpoint" in caplog.text and "step_00000004.pt" in caplog.text
    assert newest.with_name("step_00000004.pt.corrupt").is_file()
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    for key, value in egnn_state(a).items():
        torch.testing.assert_close(egnn_state(b)[key], value, rtol=0, atol=0)
    loss = [row.split(",")[:4] for row in (straight / "train_log.csv").read_text().splitlines()]
    assert [row.split(",")[:4] for row in (resumed / "train_log.csv").read_text().splitlines()] == loss


def test_corrupt_sample_chunk_is_sampled_again(work: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "sample"
    shutil.copytree(work["sample"], out)
    with np.load(out / "samples.npz") as f:
        reference = f["samples"].copy()
    chunk = out / "chunks" / "chunk_000000.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    (out / "samples.npz").unlink()
    with caplog.at_level("WARNING", logger="tbg"):
        code, _, err = run(["sample", "--published", work["t76"], "--peptide", "AS", "--n", 4, "--out", out,
                            *FAST_SAMPLE], capsys)
    assert code == 0, err
    assert "chunk_000000.npz: unreadable sample chunk" in caplog.text
    assert chunk.with_name("chunk_000000.npz.corrupt").is_file()
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["samples"], reference)


# --------------------------------------------------------------------------------------------------- two processes
def _wait_for(condition, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_train_processes_in_one_folder(md_dir: Path, tmp_path: Path) -> None:
    """Two `tbg train` started together into one folder: one trains, the other is refused at once, naming the
    folder and the process that holds it; the log of the one that trains has every step once."""
    out = tmp_path / "run"
    argv = ["train", "--data", md_dir, "--out", out, "--steps", 100_000, *TINY_TRAIN]
    # A shell's background job inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # restore the default so that the interrupt below works however the suite was started.
    procs = [subprocess.Popen(tbg_process(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) for _ in range(2)]
    try:
        _wait_for(lambda: any(p.poll() is not None for p in procs))
        refused = next(p for p in procs if p.poll() is not None)
        training = next(p for p in procs if p is not refused)
        err = refused.stderr.read()
        assert refused.returncode == 2 and "Traceback" not in err, err
        command = shlex.join([Path(sys.executable).name, *tbg_process(argv)[1:]])
        assert err.strip().splitlines()[-1] == (f"tbg train: error: {out} is in use by process {training.pid} "
                                                f"({command}); wait for it to finish, or choose another output folder")
        _wait_for(lambda: (out / "checkpoints").is_dir() or training.poll() is not None)  # it goes on training
        assert training.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    _, err = training.communicate(timeout=60)
    assert training.returncode == 130 and err.strip().endswith("interrupted; rerun the same command to resume")
    steps = [int(row.split(",")[0]) for row in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps and steps == sorted(set(steps))


class Contracting(torch.nn.Module):
    """dx/dt = -x: a flow that needs no model."""

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -x


RACE_CONFIG = dict(n_samples=200, batch_size=25, likelihood="none", progress=False)
RACE = f"""
import sys, time, pathlib, torch
from tbg.errors import InputError
from tbg.flow import SampleConfig, SolverConfig, sample
out, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
class Contracting(torch.nn.Module):
    def forward(self, t, x):
        return -x
config = SampleConfig(**{RACE_CONFIG!r}, solver=SolverConfig(method="rk4", n_steps=600))
ready.touch()
while not go.exists():
    time.sleep(0.005)
try:
    sample(Contracting(), 4, out, config)
except InputError as err:
    print(err)
    sys.exit(3)
"""


def test_two_sample_processes_race(tmp_path: Path) -> None:
    """Two processes released at the same moment call tbg.flow.sample into one folder: one samples, the other
    is refused at once; the samples equal those of a single process, and no temporary file is left."""
    from tbg.flow import SampleConfig, SolverConfig, sample

    folder, go = tmp_path / "race", tmp_path / "go"
    readies = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [(ready, subprocess.Popen([sys.executable, "-c", RACE, str(folder), str(ready), str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for ready in readies]
    reference = sample(Contracting(), 4, tmp_path / "reference",
                       SampleConfig(**RACE_CONFIG, solver=SolverConfig(method="rk4", n_steps=600)))
    _wait_for(lambda: all(ready.exists() for ready, _ in procs))
    go.touch()
    results = []
    for _, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert "Traceback" not in err, err
        results.append((proc.returncode, out))
    assert sorted(code for code, _ in results) == [0, 3], results
    assert f"{folder} is in use by process" in next(out for code, out in results if code == 3)
    with np.load(reference) as expected, np.load(folder / "samples.npz") as got:
        np.testing.assert_array_equal(got["samples"], expected["samples"])
    assert not [p for p in folder.rglob(".*") if p.name != ".tbg.lock"], "temporary files left behind"


def test_lock_names_its_holder_and_is_released_on_crash(tmp_path: Path) -> None:
    """The lock of a killed process is gone (the kernel drops it); the message names a live holder."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tbg.runfolder import exclusive\n"
                               "with exclusive(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        held_by = rf"{re.escape(str(tmp_path))} is in use by process {holder.pid} \(python"
        with pytest.raises(FolderInUse, match=held_by):
            with exclusive(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path):  # killed: the lock went with it
        pass


def test_lock_is_reentrant_per_thread(tmp_path: Path) -> None:
    with exclusive(tmp_path), exclusive(tmp_path):  # a job calling another job on its folder
        errors = []

        def other() -> None:
            try:
                with exclusive(tmp_path):
                    pass
            except FolderInUse as err:
                errors.append(str(err))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert errors and "this process (another thread)" in errors[0]
    with exclusive(tmp_path):
        pass


def test_atomic_write_on_a_full_disk(tmp_path: Path) -> None:
    """A write that fails (a full disk) leaves the file as it was and no temporary file behind."""
    path = tmp_path / "config.json"
    path.write_text("old")
    assert temporary_path(path) == tmp_path / f".config.{os.getpid()}.tmp.json"

    def fill_disk(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, fill_disk)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


# --------------------------------------------------------------------------------------------------- evaluation
def test_evaluation_counts_non_finite_numbers(md_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One NaN dlogp and one NaN prior energy among valid samples: evaluation goes on, gives them weight 0
    and counts them in report.json and the summary."""
    from tbg.chem.units import SCALE

    with np.load(md_dir / "ala2-traj-arrays.npz") as f:
        frames = f["positions"][:30]
    rng = np.random.default_rng(0)
    x = (frames - frames.mean(axis=1, keepdims=True)).reshape(30, -1) * SCALE
    dlogp, prior_energy = rng.normal(0, 1, 30), rng.normal(30, 1, 30)
    dlogp[3], prior_energy[7] = np.nan, np.inf
    np.savez(tmp_path / "samples.npz", samples=x.astype(np.float32), dlogp=dlogp, prior_energy=prior_energy)
    code, _, err = run(["evaluate", "--samples", tmp_path / "samples.npz", "--data", md_dir, "--out",
                        tmp_path / "e", "--md-frames", 20, "--bootstrap", 5], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["n_nonfinite"] == {"dlogp": 1, "prior_energy": 1, "energy": 0}
    assert report["n_valid"] == 30 and report["ess"]["n_weighted"] == 28
    assert report["ess"]["kish_fraction"] is not None
    from tbg.evaluate.report import summary_table

    assert re.search(r"non-finite dlogp/prior/u\s+1/1/0", summary_table(report))


# --------------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device, usable, expected", [
    (None, ["Reference", "CPU"], (None, None)),
    ("cpu", ["Reference", "CPU", "CUDA"], ("CPU", None)),
    ("cpu", ["Reference"], ("Reference", None)),
    ("cuda", ["Reference", "CPU", "OpenCL", "CUDA"], ("CUDA", None)),
    ("cuda:1", ["Reference", "CPU", "CUDA"], ("CUDA", "1")),
    ("cuda", ["Reference", "CPU", "OpenCL"], ("OpenCL", None)),
    ("cuda", ["Reference", "CPU"], "no usable CUDA or OpenCL platform"),
    ("cuda:x", ["CUDA"], "expected cpu, cuda or cuda:N"),
    ("gpu", ["CUDA"], "expected cpu, cuda or cuda:N"),
])
def test_openmm_platform_choice(device: str | None, usable: list[str], expected) -> None:  # noqa: ANN001
    if isinstance(expected, str):
        with pytest.raises(InputError, match=expected):
            choose_platform(device, usable)
    else:
        assert choose_platform(device, usable) == expected


def test_openmm_platform_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The demo's evaluation falls back to the fastest platform (with a warning) where OpenMM drives no GPU;
    unknown devices are refused either way."""
    import tbg.chem.forcefield as forcefield

    monkeypatch.setattr(forcefield, "usable_platforms", lambda: ["Reference", "CPU"])
    with pytest.raises(InputError, match="no usable CUDA or OpenCL platform"):
        forcefield.platform_for_device("cuda")
    with caplog.at_level("WARNING", logger="tbg"):
        assert forcefield.platform_for_device("cuda", fallback=True) is None
    assert "the OpenMM energies run on the fastest platform available" in caplog.text
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        forcefield.platform_for_device("gpu", fallback=True)


@pytest.mark.parametrize("command", ["simulate", "evaluate"])
def test_openmm_device_reaches_the_job(command: str, monkeypatch: pytest.MonkeyPatch, work: dict[str, Path],
                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--device cuda:1 with a (mocked) CUDA platform: the job gets that platform, set to device 1."""
    import tbg.chem.forcefield as forcefield
    import tbg.chem.md
    import tbg.evaluate.runs

    class FakePlatform:
        def __init__(self, name: str) -> None:
            self.name, self.defaults = name, {}

        def setPropertyDefaultValue(self, key: str, value: str) -> None:  # noqa: N802 - OpenMM's name
            self.defaults[key] = value

    got = {}
    monkeypatch.setattr(forcefield, "usable_platforms", lambda: ["Reference", "CPU", "CUDA"])
    monkeypatch.setattr(forcefield.openmm.Platform, "getPlatformByName", staticmethod(FakePlatform))
    monkeypatch.setattr(forcefield, "_usable", lambda plat, index=None: True)
    monkeypatch.setattr(tbg.chem.md, "simulate", lambda *a, **kw: got.update(kw) or tmp_path)
    monkeypatch.setattr(tbg.evaluate.runs, "evaluate_samples_file", lambda *a, **kw: got.update(kw))
    argv = ({"simulate": ["simulate", "--out", tmp_path / "md"],
             "evaluate": ["evaluate", "--samples", work["sample"], "--data", work["md"], "--out", tmp_path / "e"]}
            [command])
    code, _, err = run([*argv, "--device", "cuda:1"], capsys)
    assert code == 0, err
    assert (got["platform"].name, got["platform"].defaults) == ("CUDA", {"DeviceIndex": "1"})


@pytest.mark.skipif(CUDA, reason="checks the refusals on a machine without a GPU")
@pytest.mark.parametrize("command", ["simulate", "evaluate", "sample", "train", "demo"])  # demo: torch refuses
def test_cuda_refused_without_a_gpu(command: str, work: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    argv = {"simulate": ["simulate", "--out", "{out}"],
            "evaluate": ["evaluate", "--samples", "{sample}", "--data", "{md}", "--out", "{out}"],
            "sample": ["sample", "--published", "{t76}", "--peptide", "AS", "--out", "{out}"],
            "train": ["train", "--data", "{md}", "--out", "{out}"],
            "demo": ["demo", "--data", "{md}", "--out", "{out}"]}[command]
    last = _refused([*argv, "--device", "cuda"], work, tmp_path, capsys)
    assert last.startswith(f"tbg {command}: error: --device") and "cuda" in last
    assert "no usable CUDA or OpenCL platform" in last or "no usable CUDA device" in last


# --------------------------------------------------------------------------------------------------- the library
def test_egnn_refuses_nan_features_and_time() -> None:
    model = tbg.EGNN(4, hidden=8, n_layers=2)
    x, features = torch.randn(2, 5, 3), torch.randn(5, 4)
    model(0.5, x, features)
    bad = features.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="features contain NaN"):
        model(0.5, x, bad)
    with pytest.raises(ValueError, match="t contains NaN"):
        model(torch.tensor([0.5, float("nan")]), x, features)
    with pytest.raises(ValueError, match="features contain NaN"):
        model.divergence(0.5, x, bad)


def test_load_published_checks_features(tmp_path: Path) -> None:
    tbg.save_published(tmp_path / "m.pt", tbg.EGNN(4, hidden=8, n_layers=2))
    with pytest.raises(ValueError, match=r"features must be a floating-point tensor .* got torch.float32 \(4,\)"):
        tbg.load_published(tmp_path / "m.pt", torch.randn(4))
    with pytest.raises(ValueError, match="features contain NaN"):
        tbg.load_published(tmp_path / "m.pt", torch.full((5, 4), float("nan")))
    assert tbg.load_published(tmp_path / "m.pt", torch.randn(5, 4)).n_atoms == 5


def test_library_sample_refuses_another_flow(tmp_path: Path) -> None:
    """tbg.flow.sample alone (no identity from the caller) records the network and the atom features: chunks of
    another molecule with the same atom count are not reused."""
    from tbg.flow import SampleConfig, SolverConfig, sample
    from tbg.nn import BoundDynamics

    config = SampleConfig(n_samples=4, batch_size=2, likelihood="none", solver=SolverConfig(method="rk4", n_steps=2),
                          progress=False)
    model = tbg.EGNN(3, hidden=8, n_layers=1)
    sample(BoundDynamics(model, torch.eye(3)[[0, 1, 2, 0]]), 4, tmp_path, config)
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match="flow.features_sha256 is"):
        sample(BoundDynamics(model, torch.eye(3)[[0, 1, 2, 1]]), 4, tmp_path, config)
    with pytest.raises(InputError, match="flow.parameters_sha256 is"):
        sample(BoundDynamics(tbg.EGNN(3, hidden=8, n_layers=1), torch.eye(3)[[0, 1, 2, 0]]), 4, tmp_path, config)
    assert snapshot(tmp_path) == before


def test_lock_on_a_file_system_without_locks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Where flock is not supported (some network file systems) the job runs, with a warning that nothing keeps
    a second process out; other lock errors are raised."""
    import tbg.runfolder

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tbg.runfolder.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="tbg"), exclusive(tmp_path):
        pass
    assert "the file system offers no locks" in caplog.text

    def denied(fd: int, operation: int) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tbg.runfolder.fcntl, "flock", denied)
    with pytest.raises(PermissionError):
        with exclusive(tmp_path):
            pass
