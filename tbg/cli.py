"""The `tbg` command line: one entry point, one subcommand per job.

Every subcommand takes its options from flags and, optionally, from a TOML config file
(`--config run.toml`, keys named like the long flags with dashes or underscores); flags win over
the file, the file wins over the built-in defaults. Values from the file go through the same parsing
as flags (types, ranges, choices). Jobs that produce files write them into `--out` together with the
options in force (config.json), once the job is known to go ahead. The jobs themselves live in the
library (tbg.chem, tbg.flow, tbg.evaluate); this module only turns options into calls, and errors into one
line on stderr: bad input exits with status 2, other failures with 1, an interrupt with 130; `--debug`
(or TBG_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tbg.chem.data import ALANINE_DIPEPTIDE_DIR
from tbg.chem.trajectory import WRITE_FORMATS
from tbg.chem.units import SCALE
from tbg.errors import InputError
from tbg.flow.ode import ADAPTIVE, FIXED
from tbg.flow.sample import LIKELIHOOD_CHECK_TOL
from tbg.runfolder import write_json

if TYPE_CHECKING:
    from tbg.chem.trajectory import MDData
    from tbg.evaluate import EvaluationOptions
    from tbg.flow.refine.runs import RefineOptions
    from tbg.flow.runs import SamplingOptions, TrainingOptions

log = logging.getLogger("tbg")

ALA2_DATA = ALANINE_DIPEPTIDE_DIR  # the shipped MD data, default of --data


class UsageError(InputError):
    """Bad input from the user, found by the command line itself: one line, exit status 2."""


class _ParseError(Exception):
    """argparse's complaint about the command line (or a config file's value), raised instead of exiting."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ParseError(self, message)


def _checked(convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text and check it with ``valid``; the error says what is ``expected``."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value

    parse.__name__ = expected
    return parse


POSITIVE_INT = _checked(int, lambda v: v >= 1, "an integer >= 1")
NONNEGATIVE_INT = _checked(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_FLOAT = _checked(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
NONNEGATIVE_FLOAT = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
OPEN_UNIT = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")
ABOVE_ONE = _checked(float, lambda v: math.isfinite(v) and v > 1, "a number > 1")
HALF_OPEN_UNIT = _checked(float, lambda v: 0 <= v < 1, "a number >= 0 and < 1")
QUANTILE = _checked(float, lambda v: 0 < v <= 1, "a number > 0 and <= 1")
UNIT = _checked(float, lambda v: 0 <= v <= 1, "a number between 0 and 1")
AT_LEAST_TWO = _checked(int, lambda v: v >= 2, "an integer >= 2")
HYDROGEN_MASS = _checked(float, lambda v: 1 <= v <= 4, "a mass between 1 and 4 amu")


# ---------------------------------------------------------------------------------------------------
# Options. Every option's default lives in DEFAULTS (the published alanine-dipeptide settings where
# the paper fixes them); argparse defaults are None so that "not given" can be told apart from
# "given with the default value" when a config file or a demo preset fills in the rest.
DEFAULTS: dict[str, Any] = {
    # model and training (published alanine dipeptide: H = 64, L = 5, Adam 5e-4, batch 256)
    "hidden": 64, "layers": 5, "steps": 1000, "epochs": None, "batch_size": 256, "lr": 5e-4,
    "lr_milestones": [], "ema": None, "coupling": "independent", "val_fraction": 0.1, "checkpoint_every": 100,
    "keep_checkpoints": 3, "encoding": "auto",
    "backend": "auto",
    # sampling (published: dopri5, atol = rtol = 1e-4, batches of 500)
    "n": 1000, "sample_batch_size": 500, "likelihood": "joint", "method": "dopri5", "atol": 1e-4, "rtol": 1e-4,
    "ode_steps": 20, "quadrature": 16, "quadrature_panels": [], "prior_scale": 1.0, "dtype": "float32",
    "trajectory": ["pdb", "dcd"], "memory_budget": None, "profile": False,
    # `tbg profile`: the batch-size sweep
    "batch_sizes": [16, 64, 256], "likelihoods": ["joint", "decoupled"], "min_samples": 0, "min_seconds": 0.0,
    # evaluation
    "md_frames": 5000, "temperature": None, "bins": 60, "bootstrap": 200,
    # tail treatments, each reported beside plain importance sampling; point-set W2 size
    "clip_quantile": [0.999], "energy_cutoff": [20.0], "w2_points": 1000,
    # refinement (tbg.flow.refine): SMC on the flow's samples and/or independence MH; the demo's stage is off
    # unless a preset or --refine turns it on
    "scheme": "resample-move", "particles": None, "n_moves": 5, "step_size": 1e-3, "target_cess": 0.9,
    "resample_threshold": 0.5, "mcmc_chains": 10, "mcmc_burn_in": 10, "mcmc_local_steps": 0,
    "checkpoint_interval": 60.0, "refine": "off",
    # `tbg demo`: samples whose likelihood is checked against a tight joint solve
    "likelihood_check": 16,
    # simulation (published: 0.5 fs Langevin, frames every 10000 steps)
    "frames": 1000, "frame_interval": 10000, "equilibration": 20000, "timestep_fs": 0.5,
}

# `tbg demo` presets, applied over DEFAULTS. "default" samples the shipped alanine-dipeptide model (its
# training stage is a short demonstration of the shipped model's recipe) and is sized to finish within
# ~15 minutes on a 2-core CPU (see README); "quick" is a one-minute smoke test of the same stages; "full"
# trains the published alanine-dipeptide model from scratch (meant for a GPU) and samples it.
SHIPPED_RECIPE: dict[str, Any] = {"hidden": 32, "layers": 5, "batch_size": 128, "lr": 5e-4, "ema": 0.999,
                                  "coupling": "aligned"}
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"model": "shipped", **SHIPPED_RECIPE, "steps": 20, "checkpoint_every": 10, "n": 64,
              "sample_batch_size": 64, "likelihood": "decoupled", "quadrature": 4, "method": "rk4", "ode_steps": 8,
              "md_frames": 300, "bootstrap": 20, "likelihood_check": 2, "out": "tbg-demo-quick"},
    "default": {"model": "shipped", **SHIPPED_RECIPE, "steps": 200, "checkpoint_every": 100, "n": 2000,
                "sample_batch_size": 500, "likelihood": "decoupled", "quadrature": 48, "quadrature_panels": [0.1, 0.3],
                "atol": 1e-5, "rtol": 1e-5,
                "md_frames": 2000, "out": "tbg-demo"},
    # 1e5 samples as a multi-model PDB would take ~200 MB: DCD (with sample/topology.pdb) only.
    "full": {"model": "train", "epochs": 1000, "n": 100_000, "md_frames": 20_000, "trajectory": ["dcd"],
             "out": "tbg-demo-full"},
}


def _opt(p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, help: str, **kw: Any) -> None:
    """Add an option whose default lives in DEFAULTS, quoting that default in the help text."""
    key = flag.lstrip("-").replace("-", "_")
    if key in DEFAULTS and DEFAULTS[key] not in (None, []):
        help = f"{help} (default: {DEFAULTS[key]})"
    p.add_argument(flag, default=None, help=help, **kw)


TORCH_DEVICE_HELP = "torch device: cpu, cuda, cuda:1 (default: cuda if available, else cpu)"
OPENMM_DEVICE_HELP = ("device of the OpenMM energies: cpu, cuda or cuda:N (OpenMM's CUDA platform, else its OpenCL "
                      "platform; refused when neither can run) (default: the fastest platform available)")
DEMO_DEVICE_HELP = ("torch device of training and sampling: cpu, cuda, cuda:1 (default: cuda if available, else cpu); "
                    "the evaluation's OpenMM energies run on the matching platform when OpenMM has one (else on the "
                    "fastest available, with a warning)")


def _common(p: argparse.ArgumentParser, out_help: str | None, device_help: str = TORCH_DEVICE_HELP) -> None:
    if out_help is not None:
        p.add_argument("--out", metavar="DIR", help=out_help)
    p.add_argument("--device", metavar="DEV", default=None, help=device_help)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=None, help="random seed, an integer >= 0 (default: 0)")
    p.add_argument("--no-progress", action="store_true", default=None, help="hide progress bars")


def _debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also: environment variable TBG_DEBUG=1)")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    _opt(g, "--hidden", "hidden size H of the EGNN", type=POSITIVE_INT, metavar="H")
    _opt(g, "--layers", "number of EGNN layers L", type=POSITIVE_INT, metavar="L")
    _opt(g, "--steps", "optimizer steps (a rerun continues a run up to this many; fewer than it has done is "
         "refused)", type=NONNEGATIVE_INT, metavar="N")
    _opt(g, "--epochs", "train for this many passes over the data instead of --steps", type=POSITIVE_INT, metavar="E")
    _opt(g, "--batch-size", "molecules per training batch", type=POSITIVE_INT, metavar="B")
    _opt(g, "--lr", "Adam learning rate", type=POSITIVE_FLOAT)
    _opt(g, "--lr-milestones", "steps at which the learning rate is divided by 10", type=POSITIVE_INT, nargs="*",
         metavar="STEP")
    _opt(g, "--ema", "exponential moving average of the weights, e.g. 0.999, warmed up over the first steps; "
         "validation and model.pt use it (default: off)", type=OPEN_UNIT,
         metavar="DECAY")
    _opt(g, "--coupling", "pairing of prior and data samples: independent (published) or aligned (each prior "
         "sample rotated/reflected and its interchangeable atoms relabelled to fit its data frame; shorter paths, "
         "better likelihoods; tbg.flow.coupling)", choices=["independent", "aligned"])
    _opt(g, "--val-fraction", "fraction of the MD frames held out for validation", type=HALF_OPEN_UNIT, metavar="F")
    _opt(g, "--checkpoint-every", "steps between checkpoints (the run resumes from the newest)", type=POSITIVE_INT,
         metavar="N")
    _opt(g, "--keep-checkpoints", "newest checkpoints kept on disk", type=POSITIVE_INT, metavar="N")
    _opt(g, "--encoding", "atom features: 'atoms' (one class per atom, alanine-dipeptide model), 'transfer' "
         "(76-wide transferable encoding), 'auto' = atoms for one molecule, transfer for several",
         choices=["auto", "atoms", "transfer"])
    _opt(g, "--backend", "EGNN implementation: auto (fused kernels when available), fused, reference",
         choices=["auto", "fused", "reference"])


POSITIVE_INT_OR_AUTO = _checked(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 1,
                                "an integer >= 1 or 'auto'")
MEMORY_BUDGET_HELP = ("memory budget in GiB for the working memory of sampling (above what the process holds "
                      "before: model, libraries, CUDA context)")


def _solver_args(g: argparse._ArgumentGroup) -> None:
    _opt(g, "--method", "ODE solver: dopri5 (adaptive) or a fixed-step rk4/midpoint/euler", choices=[*ADAPTIVE, *FIXED])
    _opt(g, "--atol", "absolute tolerance of adaptive solvers", type=POSITIVE_FLOAT)
    _opt(g, "--rtol", "relative tolerance of adaptive solvers", type=POSITIVE_FLOAT)
    _opt(g, "--ode-steps", "steps of fixed-step solvers", type=POSITIVE_INT, metavar="N")
    _opt(g, "--quadrature", "quadrature nodes of --likelihood decoupled", type=POSITIVE_INT, metavar="K")
    _opt(g, "--dtype", "floating-point type of the integration", choices=["float32", "float64"])


def _sample_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    _opt(g, "--n", "number of samples", type=POSITIVE_INT, metavar="N")
    _opt(g, "--sample-batch-size", "samples integrated together (one resumable chunk each); 'auto': the largest "
         "batch the memory model fits into --memory-budget, leaving at least 4 chunks per process (measure the "
         "real curve with `tbg profile`)", type=POSITIVE_INT_OR_AUTO, metavar="B")
    _opt(g, "--memory-budget", f"{MEMORY_BUDGET_HELP}; caps the batch size (default: no cap; with "
         "--sample-batch-size auto 80%% of the GPU's memory or half the RAM)", type=POSITIVE_FLOAT, metavar="GB")
    _opt(g, "--likelihood", "joint: exact dlogp on the augmented ODE (published); decoupled: x path, then "
         "Gauss-Legendre quadrature of the exact divergence (cheaper); none: samples only",
         choices=["joint", "decoupled", "none"])
    g.add_argument("--no-likelihood", action="store_true", default=None,
                   help="samples only, no dlogp (same as --likelihood none)")
    _solver_args(g)
    _opt(g, "--quadrature-panels", "split the quadrature of --likelihood decoupled into panels at these times in "
         "(0, 1), the nodes shared evenly, e.g. 0.1 0.3 for a field whose divergence changes sharply near the "
         "prior end t = 0 (default: none, one Gauss-Legendre rule)", type=OPEN_UNIT, nargs="*", metavar="T")
    _opt(g, "--prior-scale", "standard deviation of the latent Gaussian the flow maps (1: the prior it was trained "
         "with); a little below 1 draws more of the configurations the flow finds likely, and the importance "
         "weights use this Gaussian's exact density, so reweighted averages stay exact", type=POSITIVE_FLOAT,
         metavar="S")
    g.add_argument("--profile", action="store_true", default=None,
                   help="time the sampling by stages (field, divergence, solver, I/O, energies), count evaluations "
                        "per sample, measure peak memory: OUT/profile.json, a table at the end, and OUT/trace.json "
                        "(torch.profiler trace of one chunk for Perfetto / chrome://tracing; NVTX ranges on CUDA); "
                        "synchronises the GPU at stage boundaries, so the run is a little slower")
    g.add_argument("--trajectory", nargs="*", choices=WRITE_FORMATS, default=None, metavar="FORMAT",
                   help="also write the samples as samples.FORMAT beside samples.npz, for VMD, PyMOL, MDAnalysis: "
                        f"{', '.join(WRITE_FORMATS)}; positions in nm (samples / {SCALE:g}, not re-centred), atoms in "
                        "the order of topology.pdb; with a likelihood also samples_weights.csv (reduced energy, "
                        "log weight, normalised weight per frame); --trajectory alone writes none "
                        f"(default: {' '.join(DEFAULTS['trajectory'])})")


def _eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    _opt(g, "--md-frames", "MD frames compared against (evenly thinned; energies are computed for each)",
         type=POSITIVE_INT, metavar="N")
    _opt(g, "--temperature", "temperature in K for the energies (default: 300 for capped peptides such as "
         "alanine dipeptide, 310 otherwise)", type=POSITIVE_FLOAT, metavar="K")
    _opt(g, "--clip-quantile", "tail treatment of the importance weights, reported beside plain importance "
         "sampling (never instead of it): log weights clipped at quantile Q; one treatment per value, the flag "
         "alone gives none", type=QUANTILE, nargs="*", metavar="Q")
    _opt(g, "--energy-cutoff", "tail treatment reported beside plain importance sampling: weight 0 for samples "
         "whose reduced energy lies more than KT above the MD frames' mean energy; one treatment per value, the "
         "flag alone gives none", type=POSITIVE_FLOAT, nargs="*", metavar="KT")
    _opt(g, "--w2-points", "equal-mass points per method of the point-set W2 metrics (torus-W2, TICA-W2; exact "
         "optimal transport, O(M^3) time)", type=POSITIVE_INT, metavar="M")
    _opt(g, "--bins", "histogram bins of the free-energy profiles", type=POSITIVE_INT)
    _opt(g, "--bootstrap", "bootstrap resamples for the free-energy error bars", type=POSITIVE_INT, metavar="N")


def _refine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refinement (SMC and independence Metropolis-Hastings on the flow's samples, with "
                             "OpenMM energies and forces)")
    _opt(g, "--scheme", "SMC scheme: resample-move (weights, resampling, MALA moves at the target: needs no "
         "flow evaluations), adaptive (annealing from the flow to the target with MALA moves at each stage, "
         "steps by conditional ESS: one backward solve of the flow per particle and move), none (no SMC)",
         choices=["resample-move", "adaptive", "none"])
    _opt(g, "--particles", "refine the first N flow samples (default: all)", type=AT_LEAST_TWO, metavar="N")
    _opt(g, "--n-moves", "MALA moves per SMC stage", type=NONNEGATIVE_INT, metavar="K")
    _opt(g, "--step-size", f"initial MALA step size tau, in squared model units (nm x {SCALE:g})^2; adapted toward "
         "acceptance 0.57", type=POSITIVE_FLOAT, metavar="TAU")
    _opt(g, "--target-cess", "conditional ESS kept per adaptive SMC stage", type=OPEN_UNIT, metavar="F")
    _opt(g, "--resample-threshold", "resample when the ESS fraction falls below F", type=UNIT, metavar="F")
    g.add_argument("--mcmc", action="store_true", default=None,
                   help="also run independence Metropolis-Hastings with the flow's samples as proposals")
    _opt(g, "--mcmc-chains", "parallel chains of independence MH (the proposals are dealt round-robin)",
         type=POSITIVE_INT, metavar="C")
    _opt(g, "--mcmc-burn-in", "steps of each chain discarded at its start", type=NONNEGATIVE_INT, metavar="B")
    _opt(g, "--mcmc-local-steps", "MALA steps after each independence step (needs the flow's density there: one "
         "backward solve per chain and step)", type=NONNEGATIVE_INT, metavar="K")
    _opt(g, "--checkpoint-interval", "seconds between checkpoints of a running method (a rerun continues from "
         "the last one)", type=NONNEGATIVE_FLOAT, metavar="S")


DATA_HELP = ("folders in the published layout (NAME-traj-arrays.npz + NAME-traj-state0.pdb), NAME-traj-arrays.npz "
             "files, or trajectories mdtraj reads (.dcd, .xtc, .trr, .h5, multi-model .pdb ...; DCD, XTC, TRR "
             "need --topology); positions are read in nm (mdtraj converts each format's units; the network sees "
             f"them centred x {SCALE:g})")


def _topology_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", metavar="FILE", help="topology of the --data trajectory files: a PDB (or any "
                   "topology file mdtraj reads) of the molecule, atoms in the trajectory's order; not needed for "
                   "the published layout, multi-model PDB or HDF5 (.h5) trajectories")


def _resolve(args: argparse.Namespace, *presets: dict[str, Any]) -> None:
    """Fill every option still None from the presets (later wins) and then DEFAULTS."""
    for key, value in vars(args).items():
        if value is None and not key.startswith("_"):
            for source in (*reversed(presets), DEFAULTS):
                if key in source:
                    setattr(args, key, source[key])
                    break
    if args.seed is None:
        args.seed = 0
    if getattr(args, "no_likelihood", None):
        args.likelihood = "none"


# ---------------------------------------------------------------------------------------------------
# From options to the library's inputs (shared by the subcommands and `demo`).

def _device(args: argparse.Namespace):  # -> torch.device
    """The torch device of --device, checked; args.device becomes its name (as config.json records it)."""
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device ({err}); use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch has no usable CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    args.device = str(device)
    return device


def _openmm_platform(args: argparse.Namespace, *, fallback: bool = False):  # -> openmm.Platform | None
    """The OpenMM platform of --device (None: the fastest available), or a refusal naming the device
    (``fallback``: the fastest available, with a warning, when no platform drives the device)."""
    from tbg.chem.forcefield import platform_for_device

    try:
        return platform_for_device(args.device, fallback=fallback)
    except InputError as err:
        raise UsageError(f"--device: {err}") from err


def _out_dir(args: argparse.Namespace) -> Path:
    """The --out folder, checked (nothing is written: the jobs record config.json once they go ahead)."""
    if not args.out:
        raise UsageError("--out DIR is required: the folder that receives this run's files")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
    return out


def _md_data(args: argparse.Namespace, paths: list) -> list[MDData]:
    """The MD data named by --data (and --topology)."""
    from tbg.chem.trajectory import find_md_data

    if args.topology is not None and not Path(args.topology).is_file():
        raise UsageError(f"--topology {args.topology}: file not found")
    try:
        return find_md_data(paths, args.topology)
    except InputError as err:
        raise UsageError(f"--data {err}") from err


def _training_options(args: argparse.Namespace) -> TrainingOptions:
    from tbg.flow.runs import TrainingOptions

    return TrainingOptions(hidden=args.hidden, layers=args.layers, steps=args.steps, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, lr_milestones=tuple(args.lr_milestones),
                           ema=args.ema, coupling=args.coupling, val_fraction=args.val_fraction,
                           checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                           encoding=args.encoding, backend=args.backend, seed=args.seed,
                           progress=not args.no_progress)


def _increasing(times: Sequence[float], flag: str) -> tuple[float, ...]:
    """Panel boundaries as given to ``flag``, refused (naming the flag) unless they increase."""
    if list(times) != sorted(set(times)):
        raise UsageError(f"{flag} {' '.join(f'{b:g}' for b in times)}: the times must increase")
    return tuple(times)


def _sampling_options(args: argparse.Namespace, device, encoding: str) -> SamplingOptions:  # noqa: ANN001
    from tbg.flow import SampleConfig, SolverConfig
    from tbg.flow.runs import SamplingOptions

    solver = SolverConfig(method=args.method, atol=args.atol, rtol=args.rtol, n_steps=args.ode_steps)
    config = SampleConfig(n_samples=args.n, batch_size=args.sample_batch_size, likelihood=args.likelihood,
                          solver=solver, n_quadrature=args.quadrature,
                          quadrature_panels=_increasing(args.quadrature_panels, "--quadrature-panels"),
                          prior_scale=args.prior_scale,
                          memory_budget_gb=args.memory_budget,
                          seed=args.seed, dtype=args.dtype, device=str(device), progress=not args.no_progress,
                          profile=bool(args.profile))
    return SamplingOptions(config, encoding=encoding, backend=args.backend, trajectory_formats=args.trajectory,
                           temperature=args.temperature)


def _refine_options(args: argparse.Namespace, device) -> RefineOptions:  # noqa: ANN001
    from tbg.flow.refine import MCMCConfig, SMCConfig
    from tbg.flow.refine.runs import RefineOptions

    if args.scheme == "none" and not args.mcmc:
        raise UsageError("--scheme none without --mcmc: nothing to refine")
    smc = None if args.scheme == "none" else SMCConfig(
        schedule=args.scheme.replace("-", "_"), n_moves=args.n_moves, step_size=args.step_size,
        target_cess=args.target_cess, resample_threshold=args.resample_threshold, seed=args.seed)
    mcmc = MCMCConfig(n_chains=args.mcmc_chains, burn_in=args.mcmc_burn_in, local_steps=args.mcmc_local_steps,
                      step_size=args.step_size, seed=args.seed) if args.mcmc else None
    return RefineOptions(smc, mcmc, particles=args.particles, temperature=args.temperature, device=str(device),
                         backend=args.backend, trajectory_formats=args.trajectory,
                         checkpoint_every_s=args.checkpoint_interval, progress=not args.no_progress)


def _evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    from tbg.evaluate import EvaluationOptions

    return EvaluationOptions(clip_quantiles=args.clip_quantile, energy_cutoffs=args.energy_cutoff, bins=args.bins,
                             n_bootstrap=args.bootstrap, w2_points=args.w2_points, seed=args.seed)


# ---------------------------------------------------------------------------------------------------
# Subcommands.

def _configure_simulate(p: argparse.ArgumentParser) -> None:
    _common(p, "folder for NAME-traj-state0.pdb and NAME-traj-arrays.npz (required)", OPENMM_DEVICE_HELP)
    p.add_argument("--peptide", metavar="SEQ", help="'ala2' (Ace-Ala-Nme, 300 K) or a zwitterionic sequence "
                   "such as AY (310 K) (default: ala2)")
    g = p.add_argument_group("simulation (published settings by default)")
    _opt(g, "--frames", "frames to write (a rerun resumes or extends; fewer than on disk is refused)",
         type=POSITIVE_INT, metavar="N")
    _opt(g, "--frame-interval", "MD steps between frames", type=POSITIVE_INT, metavar="STEPS")
    _opt(g, "--equilibration", "MD steps before the first frame", type=NONNEGATIVE_INT, metavar="STEPS")
    _opt(g, "--timestep-fs", "Langevin time step in fs", type=POSITIVE_FLOAT, metavar="FS")
    _opt(g, "--temperature", "temperature in K (default: 300 for ala2, 310 otherwise)", type=POSITIVE_FLOAT,
         metavar="K")
    g.add_argument("--hydrogen-mass", type=HYDROGEN_MASS, metavar="AMU", default=None,
                   help="hydrogen mass repartitioning: hydrogens get this mass (3-4 usual), taken from their heavy "
                        "atom; the sampled ensemble is unchanged and longer time steps stay stable (default: off)")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from tbg.chem.md import simulate
    from tbg.chem.peptides import validate_sequence

    _resolve(args, {"peptide": "ala2"})
    if args.peptide != "ala2":
        try:
            validate_sequence(args.peptide, capped=False)
        except InputError as err:
            raise UsageError(f"--peptide {args.peptide!r}: {err}") from err
    out = _out_dir(args)
    path = simulate(args.peptide, out, n_frames=args.frames, frame_interval_steps=args.frame_interval,
                    equilibration_steps=args.equilibration, timestep_fs=args.timestep_fs,
                    temperature=args.temperature, hydrogen_mass_amu=args.hydrogen_mass, seed=args.seed,
                    platform=_openmm_platform(args), progress=not args.no_progress,
                    record=partial(write_resolved_config, args, out))
    print(f"MD data: {path}")


def _configure_train(p: argparse.ArgumentParser) -> None:
    _common(p, "run folder: checkpoints/, model.pt, train_log.csv (required; a rerun resumes)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=f"MD data: {DATA_HELP} (default: the shipped alanine "
                   f"dipeptide data, {ALA2_DATA})")
    _topology_arg(p)
    _model_args(p)
    p.add_argument("--init", type=Path, metavar="CKPT", help="start from the weights of this checkpoint (published "
                   "layout or ours, the same size as --hidden/--layers) instead of a random initialisation: a further "
                   "stage of training, e.g. at a new learning rate; optimizer, schedule and EMA start afresh")


def _cmd_train(args: argparse.Namespace) -> None:
    from tbg.flow.runs import train_on_md

    _resolve(args)
    device = _device(args)
    data = _md_data(args, args.data or [ALA2_DATA])
    if args.init is not None and not args.init.is_file():
        raise UsageError(f"--init {args.init}: file not found")
    out = _out_dir(args)
    options = dataclasses.replace(_training_options(args), init_from=args.init)
    model = train_on_md(data, out, options, device, record=partial(write_resolved_config, args))
    print(f"model: {model}")


def _configure_sample(p: argparse.ArgumentParser) -> None:
    _common(p, f"folder for samples.npz (latents, samples [n, 3N] in model units = nm x {SCALE:g}, centred; dlogp, "
               "prior_energy), topology.pdb, the samples as trajectories (--trajectory) (required; a rerun resumes)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="a `tbg train` run folder or one of its .pt files")
    src.add_argument("--published", metavar="CKPT", help="a checkpoint trained with the published TBG code")
    mol = p.add_mutually_exclusive_group()
    mol.add_argument("--peptide", metavar="SEQ", help="molecule to sample: 'ala2' or a zwitterionic sequence "
                     "such as AY (built with tbg.chem)")
    mol.add_argument("--pdb", metavar="FILE", help="molecule to sample, as a PDB file (atom order of the output)")
    p.add_argument("--encoding", choices=["auto", "atoms", "transfer"], default=None,
                   help="atom features; auto picks by the checkpoint's input width: 76 = transfer, N atoms = "
                        "atoms, 21 = published alanine dipeptide (default: auto)")
    p.add_argument("--backend", choices=["auto", "fused", "reference"], default=None,
                   help="EGNN implementation (default: auto)")
    _sample_args(p)
    p.add_argument("--temperature", type=POSITIVE_FLOAT, metavar="K", help="temperature in K of samples_weights.csv "
                   "(default: 300 for capped peptides such as alanine dipeptide, 310 otherwise)")


def _checkpoint_source(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(checkpoint file, default topology) from --checkpoint (a run folder or file) or --published."""
    from tbg.flow.runs import find_run_model

    if args.published:
        checkpoint, topology = Path(args.published), None
    elif args.checkpoint:
        try:
            checkpoint, topology = find_run_model(Path(args.checkpoint))
        except InputError as err:
            raise UsageError(f"--checkpoint {err}") from err
    else:
        raise UsageError("give --checkpoint RUN (a `tbg train` folder or .pt file) or --published CKPT")
    if not checkpoint.is_file():
        raise UsageError(f"checkpoint file not found: {checkpoint}")
    return checkpoint, topology


def _molecule(args: argparse.Namespace, default: Path | None):  # -> Path | tbg.chem.Peptide
    """The molecule to sample: --pdb, --peptide (built with tbg.chem), or the training run's topology."""
    from tbg.chem.md import resolve_peptide

    if args.pdb is not None:
        return Path(args.pdb)
    if args.peptide is not None:
        try:
            return resolve_peptide(args.peptide)
        except InputError as err:
            raise UsageError(f"--peptide {args.peptide!r}: {err}") from err
    if default is None:
        raise UsageError("name the molecule with --peptide SEQ or --pdb FILE")
    return default


def _cmd_sample(args: argparse.Namespace) -> None:
    from tbg.flow.runs import sample_checkpoint

    _resolve(args)
    checkpoint, default_topology = _checkpoint_source(args)
    out = _out_dir(args)
    options = _sampling_options(args, _device(args), args.encoding)
    path = sample_checkpoint(checkpoint, _molecule(args, default_topology), out, options,
                             record=partial(write_resolved_config, args))
    print(f"samples: {path}\ntopology: {out / 'topology.pdb'}")


# `tbg finetune` has its own defaults: a few hundred small steps on a trained flow, not a training run.
FINETUNE_DEFAULTS: dict[str, Any] = {"objective": "reverse-kl", "steps": 100, "batch_size": 16, "lr": 1e-4,
                                     "grad_clip": 1.0, "divergence": "hutchinson", "probes": 1, "method": "rk4",
                                     "ode_steps": 8, "ode_panels": [], "micro_batch_size": None, "checkpoint_every": 10,
                                     "keep_checkpoints": 3, "validation_frames": 64}


def _configure_finetune(p: argparse.ArgumentParser) -> None:
    _common(p, "run folder for model.pt, energy_log.csv, validation_log.csv, checkpoints/ and topology.pdb "
               "(required; a rerun continues up to --steps)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="the flow to start from: a `tbg train` run folder or one "
                     "of its .pt files")
    src.add_argument("--published", metavar="CKPT", help="the flow to start from: a checkpoint trained with the "
                     "published TBG code (with --pdb)")
    p.add_argument("--pdb", metavar="FILE", help="the molecule, as a PDB file (default: the run's topology.pdb)")
    p.add_argument("--encoding", choices=["auto", "atoms", "transfer"], default=None,
                   help="atom features; auto picks by the checkpoint's input width (default: auto)")
    p.add_argument("--backend", choices=["auto", "fused", "reference"], default=None,
                   help="EGNN implementation (default: auto)")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, metavar="K", help="temperature in K of the target "
                   "(default: 300 for capped peptides such as alanine dipeptide, 310 otherwise)")
    d = FINETUNE_DEFAULTS
    g = p.add_argument_group("objective (tbg.flow.energy)")
    g.add_argument("--objective", choices=["reverse-kl", "importance", "max-likelihood", "renyi"], default=None,
                   help="reverse-kl: E_q[u + log q] on the flow's samples, backpropagated through the ODE solve; "
                        "importance: importance-weighted maximum likelihood of the flow's own samples; "
                        "max-likelihood: maximum likelihood of MD frames (--data), which covers what the "
                        "mode-seeking reverse KL leaves under-sampled; renyi: the Renyi divergence of order "
                        "--renyi-order of the MD frames' distribution from the flow's, maximum likelihood with "
                        "each frame weighted by (p/q)^(order - 1): order 2 is what the ESS measures "
                        f"(default: {d['objective']})")
    g.add_argument("--renyi-order", type=ABOVE_ONE, metavar="ALPHA", help="order of --objective renyi "
                   "(default: 2, the order the ESS measures)")
    g.add_argument("--data", metavar="PATH", help=f"MD data of the molecule for --objective max-likelihood or renyi: "
                   f"{DATA_HELP}; the frames the checkpoint records as unseen by its training are left out "
                   "(a checkpoint without that record: the 10%% `tbg train` would hold out with --seed) "
                   f"(default: the shipped alanine dipeptide data, {ALA2_DATA})")
    _topology_arg(p)
    g.add_argument("--steps", type=POSITIVE_INT, metavar="N", help="optimizer steps (a rerun continues up to this "
                   f"many) (default: {d['steps']})")
    g.add_argument("--batch-size", type=POSITIVE_INT, metavar="B", help="flow samples (MD frames for "
                   f"max-likelihood and renyi) per step (default: {d['batch_size']})")
    g.add_argument("--micro-batch-size", type=POSITIVE_INT, metavar="M", help="differentiate the solves of M "
                   "samples at a time and sum their gradients: the whole batch's gradient in a fraction of the "
                   "memory (must divide --batch-size; default: the whole batch at once)")
    g.add_argument("--lr", type=POSITIVE_FLOAT, help=f"Adam learning rate (default: {d['lr']})")
    g.add_argument("--grad-clip", type=POSITIVE_FLOAT, metavar="NORM", help="gradient norm clipped to "
                   f"(default: {d['grad_clip']})")
    g.add_argument("--divergence", choices=["hutchinson", "exact"], default=None,
                   help="divergence in the differentiated log-likelihood: an unbiased Hutchinson estimate or the "
                        f"exact one (3N times the cost) (default: {d['divergence']})")
    g.add_argument("--probes", type=POSITIVE_INT, metavar="P", help="Hutchinson probes per sample "
                   f"(default: {d['probes']})")
    g.add_argument("--method", choices=[*ADAPTIVE, *FIXED], default=None,
                   help=f"ODE solver of the differentiated solve (default: {d['method']})")
    g.add_argument("--ode-steps", type=POSITIVE_INT, metavar="N", help="steps of a fixed-step solver "
                   f"(default: {d['ode_steps']})")
    g.add_argument("--ode-panels", type=OPEN_UNIT, nargs="*", metavar="T", help="split the fixed-step solve into "
                   "panels at these times in (0, 1), the steps shared evenly, e.g. 0.1 0.3 for a field that changes "
                   "sharply near the prior end t = 0, where equal steps leave an error the objective can fit "
                   "instead of the flow (default: none, equal steps)")
    g.add_argument("--checkpoint-every", type=POSITIVE_INT, metavar="N", help="steps between checkpoints "
                   f"(default: {d['checkpoint_every']})")
    g.add_argument("--keep-checkpoints", type=POSITIVE_INT, metavar="N", help="newest checkpoints kept on disk "
                   f"(default: {d['keep_checkpoints']})")
    g.add_argument("--validation-frames", type=NONNEGATIVE_INT, metavar="N", help="max-likelihood and renyi: score "
                   "N of the held-out frames at the start and at every checkpoint, their mean negative "
                   "log-likelihood into validation_log.csv, to see whether the flow generalises (0: none) "
                   f"(default: {d['validation_frames']})")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from tbg.flow import EnergyTrainConfig, SolverConfig
    from tbg.flow.energy import DATA_OBJECTIVES
    from tbg.flow.runs import FinetuneOptions, finetune_checkpoint

    validation_given = args.validation_frames is not None
    _resolve(args, FINETUNE_DEFAULTS)
    checkpoint, default_topology = _checkpoint_source(args)
    if args.pdb is None and default_topology is None:
        raise UsageError(f"{checkpoint} has no topology.pdb beside it; name the molecule with --pdb FILE")
    molecule = Path(args.pdb) if args.pdb is not None else default_topology
    if args.micro_batch_size is not None and args.batch_size % args.micro_batch_size:
        raise UsageError(f"--micro-batch-size {args.micro_batch_size} must divide --batch-size {args.batch_size}")
    if args.ode_panels and args.method not in FIXED:
        raise UsageError(f"--ode-panels sets the steps of a fixed-step --method ({', '.join(FIXED)}); "
                         f"{args.method} chooses its own")
    objective = args.objective.replace("-", "_")
    data = None
    if objective in DATA_OBJECTIVES:
        data = _one_molecule(args, _md_data(args, [args.data or ALA2_DATA]))
    elif args.data is not None or args.topology is not None:
        raise UsageError("--data and --topology name the MD frames of --objective max-likelihood or renyi only")
    if args.renyi_order is not None and args.objective != "renyi":
        raise UsageError("--renyi-order is the order of --objective renyi only")
    if validation_given and objective not in DATA_OBJECTIVES:
        raise UsageError("--validation-frames scores held-out MD frames of --objective max-likelihood or renyi only")
    platform = _openmm_platform(args, fallback=True)  # before _device names the default device
    device = _device(args)
    config = EnergyTrainConfig(objective=objective, n_steps=args.steps,
                               batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                               lr=args.lr, grad_clip=args.grad_clip,
                               renyi_order=args.renyi_order or EnergyTrainConfig.renyi_order,
                               divergence=args.divergence, n_probes=args.probes,
                               solver=SolverConfig(args.method, n_steps=args.ode_steps,
                                                   panels=_increasing(args.ode_panels, "--ode-panels")),
                               seed=args.seed,
                               checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                               backend=args.backend, progress=not args.no_progress)
    options = FinetuneOptions(config, encoding=args.encoding, temperature=args.temperature, data=data,
                              validation_frames=args.validation_frames)
    path = finetune_checkpoint(checkpoint, molecule, _out_dir(args), options, device=device, platform=platform,
                               record=partial(write_resolved_config, args))
    print(f"fine-tuned model: {path}")


def _configure_profile(p: argparse.ArgumentParser) -> None:
    _common(p, "folder for sweep.json, sweep.csv and sweep.png (required)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="a `tbg train` run folder or one of its .pt files "
                     "(default: a randomly initialised model of --hidden, --layers)")
    src.add_argument("--published", metavar="CKPT", help="a checkpoint trained with the published TBG code")
    mol = p.add_mutually_exclusive_group()
    mol.add_argument("--peptide", metavar="SEQ", help="molecule: 'ala2' or a zwitterionic sequence such as AY "
                     "(built with tbg.chem)")
    mol.add_argument("--pdb", metavar="FILE", help="molecule, as a PDB file")
    g = p.add_argument_group("model (random initialisation, when no checkpoint is given)")
    _opt(g, "--hidden", "hidden size H", type=POSITIVE_INT, metavar="H")
    _opt(g, "--layers", "number of EGNN layers L", type=POSITIVE_INT, metavar="L")
    g.add_argument("--encoding", choices=["auto", "atoms", "transfer"], default=None,
                   help="atom features: of a checkpoint by its input width (auto); of a random model 'atoms' "
                        "(auto) or 'transfer' (76 wide) (default: auto)")
    g.add_argument("--backend", choices=["auto", "fused", "reference"], default=None,
                   help="EGNN implementation (default: auto)")
    g = p.add_argument_group("sweep")
    _opt(g, "--batch-sizes", "batch sizes to measure, e.g. 16 64 256 1024", type=POSITIVE_INT, nargs="+",
         metavar="B")
    _opt(g, "--likelihoods", "likelihood modes to measure", nargs="+", choices=["joint", "decoupled", "none"],
         metavar="MODE")
    _opt(g, "--min-samples", "samples per point at least (whole chunks; at least one chunk)", type=NONNEGATIVE_INT,
         metavar="N")
    _opt(g, "--min-seconds", "seconds per point at least (whole chunks)", type=NONNEGATIVE_FLOAT, metavar="S")
    _opt(g, "--memory-budget", f"{MEMORY_BUDGET_HELP}: the best batch is the fastest whose measured peak fits it "
         "(default: no limit)", type=POSITIVE_FLOAT, metavar="GB")
    _solver_args(p.add_argument_group("solver"))


def _cmd_profile(args: argparse.Namespace) -> None:
    import torch

    from tbg.flow import SolverConfig
    from tbg.flow.runs import checkpoint_dynamics, random_dynamics
    from tbg.flow.sweep import SweepConfig, format_sweep, profile_sampling

    _resolve(args)
    out = _out_dir(args)
    device = _device(args)
    dtype = getattr(torch, args.dtype)
    if args.checkpoint or args.published:
        checkpoint, default_topology = _checkpoint_source(args)
        dyn = checkpoint_dynamics(checkpoint, _molecule(args, default_topology), encoding=args.encoding or "auto",
                                  backend=args.backend or "auto", device=device, dtype=dtype)
    else:
        dyn = random_dynamics(_molecule(args, None), hidden=args.hidden, layers=args.layers,
                              encoding=args.encoding or "auto", backend=args.backend or "auto", device=device,
                              dtype=dtype, seed=args.seed)
    solver = SolverConfig(method=args.method, atol=args.atol, rtol=args.rtol, n_steps=args.ode_steps)
    config = SweepConfig(batch_sizes=args.batch_sizes, likelihoods=args.likelihoods, solver=solver,
                         n_quadrature=args.quadrature, min_samples=args.min_samples, min_seconds=args.min_seconds,
                         memory_budget_gb=args.memory_budget, dtype=args.dtype, seed=args.seed,
                         progress=not args.no_progress)
    result, paths = profile_sampling(dyn, dyn.n_atoms, config, device, out,
                                     record=partial(write_resolved_config, args))
    print(f"{format_sweep(result)}\n" + "\n".join(f"{kind}: {path}" for kind, path in paths.items()))


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    _common(p, "folder for report.json and the plots (required)", OPENMM_DEVICE_HELP)
    p.add_argument("--samples", metavar="PATH", help="samples.npz of `tbg sample`, or its folder, or a `tbg refine` "
                   "folder (then the refined samples are evaluated beside importance sampling of the samples they "
                   "came from) (required)")
    p.add_argument("--data", metavar="PATH", help=f"MD data of the same molecule: {DATA_HELP} (default: the shipped "
                   f"alanine dipeptide data, {ALA2_DATA})")
    _topology_arg(p)
    _eval_args(p)


def _one_molecule(args: argparse.Namespace, data: list[MDData]) -> MDData:
    if len(data) != 1:
        raise UsageError(f"--data {args.data} holds {len(data)} molecules; name one NAME-traj-arrays.npz or "
                         "trajectory file")
    return data[0]


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from tbg.evaluate.runs import evaluate_samples_file

    _resolve(args)
    if not args.samples:
        raise UsageError("--samples PATH is required (samples.npz written by `tbg sample`)")
    samples = Path(args.samples)
    md = _one_molecule(args, _md_data(args, [args.data or ALA2_DATA]))
    out = _out_dir(args)
    evaluate_samples_file(samples, md, out, _evaluation_options(args), md_frames=args.md_frames,
                          temperature=args.temperature, platform=_openmm_platform(args),
                          record=partial(write_resolved_config, args))  # logs the summary table
    print(f"report: {out / 'report.json'}")


def _configure_refine(p: argparse.ArgumentParser) -> None:
    _common(p, "folder for smc.npz / mcmc.npz (refined samples in the layout of samples.npz, with weights, "
               "ancestors, per-stage log and costs), refine.json, trajectories (required; a rerun resumes)",
            "torch device of the flow's density (cpu, cuda, cuda:1; default: cuda if available, else cpu); the "
            "OpenMM energies run on the matching platform when OpenMM has one (else on the fastest, with a warning)")
    p.add_argument("--samples", metavar="DIR", help="folder of `tbg sample` (samples.npz with the likelihood, its "
                   "run.json names the checkpoint) (required)")
    p.add_argument("--checkpoint", metavar="PATH", help="the checkpoint that made the samples, where it is no longer "
                   "at the path the samples' run.json records (a `tbg train` folder or .pt; checked by SHA-256); "
                   "only loaded when a method needs the flow's density (--scheme adaptive, --mcmc-local-steps)")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, metavar="K", help="temperature in K of the target "
                   "(default: 300 for capped peptides such as alanine dipeptide, 310 otherwise)")
    p.add_argument("--backend", choices=["auto", "fused", "reference"], default=None,
                   help="EGNN implementation of the flow's density (default: auto)")
    p.add_argument("--trajectory", nargs="*", choices=WRITE_FORMATS, default=None, metavar="FORMAT",
                   help=f"also write the refined samples as smc.FORMAT / mcmc.FORMAT for viewers: "
                        f"{', '.join(WRITE_FORMATS)} (nm, atoms of topology.pdb); --trajectory alone writes none "
                        f"(default: {' '.join(DEFAULTS['trajectory'])})")
    _refine_args(p)


def _cmd_refine(args: argparse.Namespace) -> None:
    from tbg.flow.refine.runs import refine_samples
    from tbg.flow.runs import find_run_model

    _resolve(args)
    if not args.samples:
        raise UsageError("--samples DIR is required (a `tbg sample` folder)")
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint, _ = find_run_model(Path(args.checkpoint))
        except InputError as err:
            raise UsageError(f"--checkpoint {err}") from err
        if not checkpoint.is_file():
            raise UsageError(f"checkpoint file not found: {checkpoint}")
    platform = _openmm_platform(args, fallback=True)  # before _device names the default device
    options = _refine_options(args, _device(args))
    out = _out_dir(args)
    path = refine_samples(Path(args.samples), out, options, checkpoint=checkpoint, platform=platform,
                          record=partial(write_resolved_config, args))
    print(f"refined: {path.parent}\nsummary: {path}")


def _configure_demo(p: argparse.ArgumentParser) -> None:
    _common(p, "run folder (default: tbg-demo, tbg-demo-quick or tbg-demo-full); rerunning continues",
            DEMO_DEVICE_HELP)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None,
                      help="tiny settings (about a minute on a CPU; a smoke test, not a result)")
    size.add_argument("--full", action="store_true", default=None,
                      help="published alanine-dipeptide settings (H 64, L 5, 1000 epochs, 1e5 samples with the "
                           "joint exact likelihood at dopri5 1e-4); meant for a GPU")
    p.add_argument("--data", metavar="PATH", help=f"MD data of one molecule: {DATA_HELP} (default: shipped alanine "
                   f"dipeptide, {ALA2_DATA})")
    p.add_argument("--model", choices=["shipped", "train"], default=None,
                   help="shipped: sample the model shipped for this molecule (the training stage is then a short "
                        "demonstration of its recipe); train: train the model that is sampled (default: shipped, "
                        "train with --full or when no shipped model fits the molecule)")
    _topology_arg(p)
    _model_args(p)
    _sample_args(p)
    p.add_argument("--refine", choices=["on", "off"], default=None,
                   help="refine the samples (SMC, and independence MH with --mcmc) before the evaluation, which then "
                        "shows the refined numbers beside the reweighted ones (default: off)")
    _refine_args(p)
    _eval_args(p)
    _opt(p, "--likelihood-check", "samples whose likelihood is measured against a tight joint solve (dopri5 at "
         f"atol = rtol = {LIKELIHOOD_CHECK_TOL:g}, exact divergence): the summary reports the mean |dlogp error| "
         "(0: no check; --quick: 2)", type=NONNEGATIVE_INT, metavar="N")


def _cmd_demo(args: argparse.Namespace) -> None:
    from tbg.evaluate.demo import run_demo
    from tbg.flow.runs import find_shipped_model

    preset = "quick" if args.quick else "full" if args.full else "default"
    _resolve(args, DEMO_PRESETS[preset])
    args.preset = preset
    platform = _openmm_platform(args, fallback=True)  # before _device names the default device
    device = _device(args)
    data = _md_data(args, [args.data or ALA2_DATA])
    if len(data) != 1:
        raise UsageError(f"the demo trains on one molecule; --data {args.data} holds {len(data)}")
    out = _out_dir(args)
    # Every option is checked before anything is written into out.
    training, sampling, evaluation = _training_options(args), _sampling_options(args, device, "auto"), \
        _evaluation_options(args)
    refinement = _refine_options(args, device) if args.refine == "on" else None
    model = find_shipped_model(data[0], out) if args.model == "shipped" else None
    log.info("== tbg demo (%s) on %s -> %s", preset, data[0].name, out)
    summary = run_demo(data[0], out, training, sampling, evaluation, device=device, md_frames=args.md_frames,
                       platform=platform, model=model, refinement=refinement, likelihood_check=args.likelihood_check,
                       record=partial(write_resolved_config, args))
    print(summary)


def _bench_dir() -> Path:
    bench = Path(__file__).resolve().parent.parent / "bench"
    if not bench.is_dir():
        raise UsageError(f"no bench/ folder at {bench}: `tbg bench` runs the scripts of a source checkout "
                         "(pip install -e . from the repository)")
    return bench


def _needs_arguments(script: Path) -> bool:
    """Whether a bench script sets NEEDS_ARGUMENTS = True (read from its source, without importing it): it
    measures what the caller names (a checkpoint, samples), so a run of every script leaves it out."""
    for node in ast.parse(script.read_text(), filename=str(script)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NEEDS_ARGUMENTS"
                                                for t in node.targets):
            return isinstance(node.value, ast.Constant) and node.value.value is True
    return False


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="scripts to run: bench_NAME.py or NAME.py in bench/ (default: every bench_*.py that "
                        "runs without arguments; --list marks the others)")
    p.add_argument("--list", action="store_true", help="list the benchmark scripts and exit")
    p.add_argument("--args", metavar="'ARGS'", default="",
                   help="arguments passed on to the script(s), quoted and with '=': --args='--n-samples 8'")


def _cmd_bench(args: argparse.Namespace) -> None:
    try:
        script_args = shlex.split(args.args)
    except ValueError as err:
        raise UsageError(f"--args {args.args!r}: {err}; quote the arguments as a shell would") from err
    bench = _bench_dir()
    scripts = sorted(bench.glob("bench_*.py"))
    if args.list:
        print("\n".join(s.stem.removeprefix("bench_") + ("  (needs arguments: `tbg bench NAME --args=...`)"
                                                         if _needs_arguments(s) else "") for s in scripts))
        return
    if args.names:
        chosen = []
        for name in args.names:
            match = [s for s in (bench / f"bench_{name}.py", bench / f"{name}.py", bench / name) if s.is_file()]
            if not match:
                raise UsageError(f"no benchmark {name!r}; available: "
                                 f"{', '.join(s.stem.removeprefix('bench_') for s in scripts)}")
            chosen.append(match[0])
        scripts = chosen
    else:
        needs = {s for s in scripts if _needs_arguments(s)}
        if needs:
            print("== not run, they need arguments (run each by name): "
                  + ", ".join(s.stem.removeprefix("bench_") for s in sorted(needs)), flush=True)
        scripts = [s for s in scripts if s not in needs]
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script), *script_args], cwd=bench.parent).returncode:
            failed.append(script.name)
    if failed:
        raise RuntimeError(f"benchmark(s) failed: {', '.join(failed)}")


def _cmd_info(args: argparse.Namespace) -> None:
    import torch

    import tbg
    from tbg.nn import dispatch

    info = tbg.build_info()
    rows = [("tbg", tbg.__version__), ("torch (built against)", info["torch"]),
            ("torch (running)", torch.__version__), ("CUDA compiled", info["cuda"] or "no"),
            ("CUDA archs", ", ".join(info["cuda_arch"]) or "-"), ("compiler", info["compiler"]),
            ("library", info["library"]), ("ops", ", ".join(f"torch.ops.tbg.{op}" for op in info["ops"]))]
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    rows.append(("devices", ", ".join(devices)))
    rows += dispatch.describe()
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


# Subcommands: name -> (help, configure-parser, run).
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: dict[str, Command] = {
    "simulate": ("run MD of a peptide with OpenMM into the published data layout (resumable)",
                 _configure_simulate, _cmd_simulate),
    "train": ("train the EGNN flow by flow matching on MD data (resumable)", _configure_train, _cmd_train),
    "sample": ("sample a trained or published model with exact likelihood into samples.npz and trajectory files "
               "for molecular viewers (resumable)",
               _configure_sample, _cmd_sample),
    "finetune": ("fine-tune a trained flow toward the Boltzmann distribution: by energy (reverse KL or "
                 "importance-weighted, OpenMM energies and forces) or by maximum likelihood of MD frames "
                 "(resumable)", _configure_finetune, _cmd_finetune),
    "refine": ("refine a model's samples toward the Boltzmann distribution with SMC and/or independence "
               "Metropolis-Hastings (OpenMM energies and forces): weighted refined samples, per-stage log, costs "
               "(resumable)", _configure_refine, _cmd_refine),
    "profile": ("measure sampling throughput and peak memory against the batch size on this device (joint and "
                "decoupled likelihood): the best batch within a memory budget, sweep.json/.csv/.png",
                _configure_profile, _cmd_profile),
    "evaluate": ("check validity, reweight and compare samples with MD: report.json, plots, summary",
                 _configure_evaluate, _cmd_evaluate),
    "demo": ("the main job: train, sample, validate, reweight and evaluate on the shipped alanine dipeptide "
             "data (resumable)", _configure_demo, _cmd_demo),
    "bench": ("run the benchmark scripts in bench/ and print their tables", _configure_bench, _cmd_bench),
    "info": ("show how tbg was built, which devices and kernels are available", lambda p: None, _cmd_info),
}


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {file}")
    try:
        with file.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {file} is not valid TOML: {err}") from err
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tbg",
        description="Transferable Boltzmann Generators with fused EGNN and exact-divergence kernels.",
        epilog="Run `tbg <command> --help` for a command's options. Quick start: `tbg demo`.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _debug_arg(parser)
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (help_text, configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           epilog="Options can also come from a TOML file: --config run.toml with keys named "
                                  "like the long flags (hidden = 32, sample-batch-size = 100); flags win.")
        p.add_argument("--config", metavar="FILE", help="TOML file with options (flags override it)")
        configure(p)
        _debug_arg(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def _config_tokens(key: str, value: Any, file: str) -> list[str]:
    """The command-line tokens that say what ``key = value`` in a config file says, so that the value is
    parsed (and checked) exactly as the flag would be."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):  # a switch: true gives the flag, false leaves it out
        return [flag] if value else []
    if isinstance(value, list):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        raise UsageError(f"config file {file}: {key} is a table; expected a value as for {flag}")
    return [f"{flag}={value}"]


def _apply_config(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill options not given on the command line from the config file, parsed like flags; reject unknown
    keys and values the flag would not take."""
    config = _load_config(getattr(args, "config", None))
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    tokens: list[str] = []
    for key, value in config.items():
        if not hasattr(args, key) or key.startswith("_") or key in ("command", "config", "debug"):
            raise UsageError(f"unknown option '{key}' in config file {args.config}; see `tbg {args.command} --help`")
        if key not in given:
            tokens += _config_tokens(key, value, args.config)
    try:
        parsed = args._parser.parse_args(tokens)
    except _ParseError as err:
        raise UsageError(f"config file {args.config}: {err.message}") from None
    for key in config:
        if key not in given:
            setattr(args, key, getattr(parsed, key))


def write_resolved_config(args: argparse.Namespace, out_dir: Path) -> None:
    """Record the options in force in out_dir/config.json (called by the jobs once they go ahead)."""
    resolved = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    write_json(Path(out_dir) / "config.json", json.loads(json.dumps(resolved, default=str)))


def _error_line(err: Exception) -> tuple[int, str]:
    """(exit status, message) of an error: bad input 2, anything else 1; unexpected errors point to --debug."""
    if isinstance(err, InputError):
        return 2, str(err)
    if isinstance(err, (OSError, FloatingPointError)):  # a full disk, a missing permission; a diverged loss
        return 1, str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, f"out of memory ({err}); lower the batch size (--batch-size, --sample-batch-size)"
    return 1, f"{type(err).__name__}: {err} (unexpected; rerun with --debug for the traceback)"


def _fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("TBG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParseError as err:
        return _fail(err.parser.prog, f"{err.message} (see `{err.parser.prog} --help`)", 2)
    debug = debug or getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        _apply_config(args, argv)
        args._run(args)
    except KeyboardInterrupt:
        return _fail(f"tbg {args.command}", "interrupted; rerun the same command to resume", 130)
    except Exception as err:  # noqa: BLE001 - every error ends as one line (the traceback with --debug)
        if debug:
            raise
        status, message = _error_line(err)
        return _fail(f"tbg {args.command}", message, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
