"""Shared by the `tbg` command tests (test_cli.py, test_robustness.py): running the command in this process
or in a real one, tiny settings, MD data made by `tbg simulate`, random models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tbg
from tbg.cli import main

# Tiny sampling: fixed-step solver, decoupled likelihood with few quadrature nodes.
FAST_SAMPLE = ["--method", "rk4", "--ode-steps", "2", "--likelihood", "decoupled", "--quadrature", "2",
               "--no-progress"]
# Tiny training: checkpoints every 2 steps.
TINY_TRAIN = ["--hidden", "8", "--layers", "2", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress"]


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `tbg argv` run in this process (--help exits through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def tbg_process(argv: list) -> list[str]:
    """The command line of `tbg argv` as a separate process (python -m tbg of this interpreter)."""
    return [sys.executable, "-m", "tbg", *map(str, argv)]


def run_process(argv: list, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tbg argv` in a real process: exit status, stdout and stderr."""
    return subprocess.run(tbg_process(argv), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def random_egnn(n_features: int) -> tbg.EGNN:
    """A small EGNN whose weights are all random, so that the field is far from zero."""
    torch.manual_seed(1)
    model = tbg.EGNN(n_features, hidden=8, n_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def simulate_md(out: Path) -> Path:
    """A short alanine-dipeptide trajectory made by `tbg simulate` into out (seconds)."""
    assert main(["simulate", "--out", str(out), "--peptide", "ala2", "--frames", "40", "--frame-interval", "50",
                 "--equilibration", "0", "--no-progress"]) == 0
    return out
