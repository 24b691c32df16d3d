"""How far is a flow from the Boltzmann distribution, in nats, without knowing log Z?

The ESS of one draw of a few thousand samples jumps from draw to draw when the log-weights spread over many
nats, so it cannot rank two close models. The two KL divergences can, each up to the same unknown log Z:

    R = E_q[u(x) + log q(x)]      = KL(q || p) - log Z    (the flow's samples: u by OpenMM, log q from the
                                                           sampler's likelihood)
    F = E_p[u(x) + log q(x)]      = -KL(p || q) - log Z   (held-out MD frames: log q by an accurate back
                                                           solve from each frame to the prior, exact divergence)
    J = R - F = KL(q || p) + KL(p || q)                    (the symmetric KL, Jeffreys divergence: no log Z)

R is what the reverse-KL fine-tuning lowers and -F what maximum likelihood of MD frames lowers; J counts
both, with error bars of a fraction of a nat where the ESS has a factor of two. A third column is what the
ESS itself measures, on the same frames:

    Q = log E_p[exp(-u(x) - log q(x))] = D_2(p || q) + log Z   (the large-sample Kish ESS fraction is
                                                                exp(-D_2(p || q)) = Z exp(-Q))

Q of two models on the same frames differ by minus the log of their ESS ratio. It rests on the frames the
flow covers worst, so its error bar (a bootstrap over the frames) is wide and itself uncertain: a frame the
64 do not hold can raise it. The script names the frames it rests on, with their share of its mean.
u = U / kT at the molecule's temperature, p = exp(-u) / Z. The MD frames are those no stage of the model's
training has seen, as its checkpoint records them (`tbg.flow.runs.held_out_record`; for a checkpoint
without the record, the validation frames `tbg train --seed 0` holds out).

    python bench/bench_model_kl.py --checkpoint tbg/data/models/alanine-dipeptide --samples SAMPLE_DIR \
        [--frames 64] [--data tbg/data/alanine-dipeptide] [--threads 2] [--save per_point.npz]

SAMPLE_DIR: `tbg sample` of the same checkpoint with --likelihood (decoupled or joint).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from common import machine

from tbg.chem import ALANINE_DIPEPTIDE_DIR
from tbg.chem.data import PeptideDataset
from tbg.chem.energy import EnergyModel
from tbg.flow import SolverConfig
from tbg.flow.ode import integrate
from tbg.flow.prior import MeanFreeGaussian
from tbg.flow.runs import (checkpoint_dynamics, find_run_model, held_out_record, molecule_topology, split_frames,
                           split_recorded_frames)
from tbg.flow.sample import flow_record
from tbg.runfolder import arrays_sha256

NEEDS_ARGUMENTS = True  # it measures a checkpoint the caller names: `tbg bench` runs it by name only


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def log_mean_exp_and_se(values: np.ndarray, n_boot: int = 2000) -> tuple[float, float]:
    """log mean exp(values) and its bootstrap standard error over the values."""
    boot = np.random.default_rng(0).choice(values, size=(n_boot, len(values)))
    lme = logsumexp(np.vstack([values, boot]), axis=1) - np.log(len(values))
    return float(lme[0]), float(lme[1:].std(ddof=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a `tbg train` / `tbg finetune` folder or .pt file")
    p.add_argument("--samples", required=True, help="folder of `tbg sample` of this checkpoint, with likelihood")
    p.add_argument("--data", default=str(ALANINE_DIPEPTIDE_DIR), help="MD data in the published layout")
    p.add_argument("--frames", type=int, default=64, help="held-out MD frames")
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol of the back solves")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--save", help="write the per-frame and per-sample u + log q here (.npz), for paired comparisons")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, topology = find_run_model(Path(a.checkpoint))
    if topology is None:
        sys.exit(f"{a.checkpoint}: no topology.pdb beside the model")
    samples = Path(a.samples)
    dyn = checkpoint_dynamics(model, topology)
    if json.loads((samples / "run.json").read_text())["defines"].get("flow") != flow_record(dyn):
        sys.exit(f"{samples} was not sampled from the weights and atom features of {model}")
    energy = EnergyModel(molecule_topology(topology))
    prior = MeanFreeGaussian(dyn.features.shape[0])
    t0 = time.perf_counter()

    data = PeptideDataset(a.data, encoding="atoms")
    frames = data.frames_of(data.names[0])
    split = split_recorded_frames(held_out_record(model), arrays_sha256(frames.numpy()), len(frames), 0.1, 0)
    if split is None:
        print(f"{model} does not record which frames its training held out: taking those of seed 0")
        split = split_frames(len(frames), 0.1, 0)
    held_out = split[1]  # in the order of seed 0
    x = frames[torch.as_tensor(held_out[:a.frames])].reshape(min(a.frames, len(held_out)), -1)
    with torch.no_grad():
        back = integrate(dyn, x, t0=1.0, t1=0.0,
                         solver=SolverConfig(method="dopri5", atol=a.tol, rtol=a.tol))
        frame_terms = (energy.torch_reduced_energy(x.double())
                       + (prior.log_prob(back.x) + back.dlogp).double()).numpy()

    npz = np.load(samples / "samples.npz")
    z = torch.as_tensor(npz["latents"], dtype=torch.float64)
    log_normaliser = prior.log_prob(z[:1]) + prior.energy(z[:1])  # log q0(z) = -prior_energy(z) + this
    with torch.no_grad():
        u = energy.torch_reduced_energy(torch.as_tensor(npz["samples"], dtype=torch.float64))
    sample_terms = (u - torch.as_tensor(npz["prior_energy"]) + log_normaliser - torch.as_tensor(npz["dlogp"])).numpy()
    finite = np.isfinite(sample_terms)

    (f, f_se), (r, r_se) = mean_and_se(frame_terms), mean_and_se(sample_terms[finite])
    print(f"# {machine()}; {time.perf_counter() - t0:.0f} s\n# python {' '.join(map(shlex.quote, sys.argv))}")
    q, q_se = log_mean_exp_and_se(-frame_terms)
    print("| model | MD frames | samples | R = KL(q||p) - log Z | F = -KL(p||q) - log Z | J = R - F [nats] | "
          "Q = D_2(p||q) + log Z |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {a.checkpoint} | {len(frame_terms)} | {finite.sum()} of {len(finite)} | {r:.2f} +- {r_se:.2f} | "
          f"{f:.2f} +- {f_se:.2f} | {r - f:.2f} +- {np.hypot(r_se, f_se):.2f} | {q:.2f} +- {q_se:.2f} |")
    share = np.exp(-frame_terms - logsumexp(-frame_terms))  # each frame's part of Q's mean
    largest = np.argsort(-share)[:3]
    print("Q rests on the frames " + ", ".join(f"{held_out[i]} ({share[i]:.0%})" for i in largest)
          + " of the data (index, share of the mean)" + ("; with one frame holding most of it, more frames can "
          "raise Q and its error bar is not to be trusted" if share[largest[0]] > 0.5 else ""))
    if a.save:
        np.savez(a.save, frames=frame_terms, samples=sample_terms)


if __name__ == "__main__":
    main()
