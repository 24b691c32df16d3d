"""Fine-tuning a trained flow toward exp(-u): by energy, or by the likelihood of MD frames (optional).

Four objectives, all differentiating the log-likelihood through the ODE solve and the divergence:

* ``"reverse_kl"``: KL(q || p) = E_z[u(x) - dlogp] + const, x = flow(z), dlogp = int div v dt. The
  gradient flows through the ODE solver (fixed-step by default), the divergence (Hutchinson probes by
  default: unbiased and cheap to differentiate) and the energy, which must be differentiable in x.
  Mode-seeking: it tightens what flow matching leaves loose but nothing in it covers what the flow misses.
* ``"importance"``: self-normalised importance-weighted maximum likelihood (forward KL): draw x from
  the flow with exact log-likelihood, weight w ~ exp(-u(x) + prior_energy(z) + dlogp) (no gradient;
  the energy may be any callable, +inf allowed), and maximise sum_i wbar_i log q(x_i), where log q(x)
  = log q0(z') - int_0^1 div v along the path integrated back from x to z'.
* ``"max_likelihood"``: maximum likelihood of equilibrium frames ``data`` (MD), the forward KL(p || q) up
  to a constant with the target's own samples in place of weights: minimise -mean log q(x) over frames
  drawn uniformly, log q by the same back solve. Mass-covering: it raises the density where the flow
  under-samples the target, which is what makes importance weights heavy-tailed. Uses no energy.
* ``"renyi"``: the Renyi divergence of order alpha = ``renyi_order`` > 1 of p from q on the same frames,
  D_alpha(p || q) = log E_p[(p / q)^(alpha - 1)] / (alpha - 1). Its gradient is maximum likelihood with
  each frame weighted by (p / q)^(alpha - 1), self-normalised over the batch (p / q from u and an exact,
  undifferentiated back solve): the frames the flow covers worst count most. alpha = 2 is the quantity
  the ESS measures (the large-sample Kish ESS fraction is exp(-D_2(p || q))); alpha -> 1 is
  max_likelihood.

Held-out frames (``validation``, any objective) are scored at the start and at every checkpoint: their mean
negative log-likelihood under the flow (exact divergence, the differentiated solve's solver, no gradient) goes
to ``validation_log.csv``. For the data objectives it is the loss on frames no step has drawn: falling, the
flow generalises; rising while the loss falls, it over-fits the training frames.

Checkpoints every ``checkpoint_every`` steps (published layout + optimizer + RNG + step, the newest
``keep_checkpoints`` kept; ``tbg.flow.checkpointing``); a restarted run continues from the newest one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tbg.flow.checkpointing import Checkpoints, CsvLog
from tbg.flow.ode import SolverConfig, integrate
from tbg.flow.prior import MeanFreeGaussian
from tbg.flow.reweight import kish_ess, log_importance_weights, normalized_weights
from tbg.nn.checkpoint import egnn_state, save_published
from tbg.nn.egnn import EGNN, BoundDynamics

log = logging.getLogger("tbg")

__all__ = ["OBJECTIVES", "DATA_OBJECTIVES", "EnergyTrainConfig", "train_by_energy"]

OBJECTIVES = ("reverse_kl", "importance", "max_likelihood", "renyi")
DATA_OBJECTIVES = ("max_likelihood", "renyi")  # the objectives that fit MD frames


@dataclass
class EnergyTrainConfig:
    """Options of ``train_by_energy``. ``divergence``: "hutchinson" (``n_probes`` Rademacher probes) or
    "exact" for the differentiated log-det; the importance objective's weights always use the exact one."""

    objective: Literal["reverse_kl", "importance", "max_likelihood", "renyi"] = "reverse_kl"
    renyi_order: float = 2.0  # alpha of the renyi objective
    n_steps: int = 100
    batch_size: int = 64
    micro_batch_size: int | None = None  # differentiated solves of this many samples, gradients summed per step
    lr: float = 1e-5
    grad_clip: float | None = 1.0
    divergence: Literal["hutchinson", "exact"] = "hutchinson"
    n_probes: int = 1
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(method="rk4", n_steps=10))
    sample_solver: SolverConfig = field(default_factory=SolverConfig)  # importance: drawing x and its weight
    seed: int = 0
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    backend: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not (math.isfinite(self.renyi_order) and self.renyi_order > 1):
            raise ValueError(f"renyi_order must be a number above 1, got {self.renyi_order}")
        if self.divergence not in ("hutchinson", "exact"):
            raise ValueError(f"divergence must be 'hutchinson' or 'exact', got {self.divergence!r}")
        if self.n_steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("need n_steps >= 0, batch_size >= 1, checkpoint_every >= 1")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1
                                                  or self.batch_size % self.micro_batch_size):
            raise ValueError(f"micro_batch_size must divide batch_size ({self.batch_size}), "
                             f"got {self.micro_batch_size}")

    @property
    def n_micro_batches(self) -> int:
        return 1 if self.micro_batch_size is None else self.batch_size // self.micro_batch_size


def train_by_energy(model: EGNN, features: Tensor, reduced_energy: Callable[[Tensor], Tensor],
                    out_dir: str | Path, config: EnergyTrainConfig | None = None, *,
                    data: Tensor | None = None, validation: Tensor | None = None,
                    meta: Mapping[str, Any] | None = None) -> list[dict[str, float]]:
    """Fine-tune ``model`` for the molecule encoded by ``features`` [N, F] toward exp(-u).

    ``reduced_energy(x [B, 3N] model units) -> u [B]`` (U / kT). ``data`` [M, 3N] (model units): the
    equilibrium frames of the data objectives (``DATA_OBJECTIVES``: required by them, refused by the
    others); ``validation`` [V, 3N]: held-out equilibrium frames to score at the start and at every checkpoint
    into ``validation_log.csv`` (step, frames, mean negative log-likelihood and its standard error). Writes
    ``energy_log.csv`` (for the data objectives the energy column is the frames' mean and the ESS column the
    Kish ESS of the frames' weights, NaN for max_likelihood's equal ones), checkpoints under ``checkpoints/``
    and the final ``model.pt`` to out_dir, each with ``meta`` added to its "tbg" metadata; returns this
    call's log rows.
    """
    cfg = config or EnergyTrainConfig()
    device, dtype = model.embedding.weight.device, model.embedding.weight.dtype
    features = features.to(device=device, dtype=dtype)
    prior = MeanFreeGaussian(features.shape[0])
    if data is None and cfg.objective in DATA_OBJECTIVES:
        raise ValueError(f"the {cfg.objective} objective needs data (equilibrium frames)")
    if data is not None and cfg.objective not in DATA_OBJECTIVES:
        raise ValueError(f"the {cfg.objective} objective takes no data (only {', '.join(DATA_OBJECTIVES)} do)")
    for name, frames in (("data", data), ("validation", validation)):
        if frames is not None and (frames.dim() != 2 or frames.shape[0] == 0 or frames.shape[1] != prior.dim):
            raise ValueError(f"{name} must be [M >= 1, {prior.dim}] frames of this molecule, got {tuple(frames.shape)}")
    if data is not None:
        data = prior.center(data.to(device=device, dtype=dtype))
    if validation is not None:
        validation = prior.center(validation.to(device=device, dtype=dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step = 0
    checkpoints = Checkpoints(out, "energy_state", "an energy-training checkpoint", keep=cfg.keep_checkpoints,
                              meta=meta)
    if (found := checkpoints.load_latest()) is not None:
        ckpt, state = found
        model.load_state_dict(egnn_state(state))
        optimizer.load_state_dict(state["optimizer_state_dict"])
        gen.set_state(state["tbg"]["energy_state"]["rng"])
        step = state["tbg"]["energy_state"]["step"]
        log.info("resuming energy training from %s at step %d", ckpt, step)
    # The field for the trained objective (divergence of the config) and, for the importance weights,
    # the same field with the exact divergence.
    field_ = BoundDynamics(model, features, backend=cfg.backend,
                           divergence_options={"method": cfg.divergence, "n_probes": cfg.n_probes, "generator": gen})
    exact = BoundDynamics(model, features, backend=cfg.backend, divergence_options={"method": "exact"})
    csv_log = CsvLog(out / "energy_log.csv", ("step", "loss", "mean_energy", "ess"), step)
    rows: list[dict[str, float]] = []
    # A step's differentiated solves run micro_batch_size samples at a time (their graphs are what costs
    # memory); the gradients of the parts add up to the whole batch's.
    parts, size = cfg.n_micro_batches, cfg.batch_size // cfg.n_micro_batches
    validation_log = None
    if validation is not None:
        validation_log = CsvLog(out / "validation_log.csv", ("step", "frames", "nll", "nll_stderr"), step,
                                int_fields=("step", "frames"))

    def validate() -> None:
        if validation_log is not None:
            nll, stderr = _mean_nll(exact, prior, validation, cfg.solver, size)
            validation_log.write({"step": step, "frames": len(validation), "nll": nll, "nll_stderr": stderr})
            log.info("step %d: held-out frames' mean -log q %.3f +- %.3f nats", step, nll, stderr)

    def checkpoint() -> None:
        validate()  # first: a restart from this checkpoint finds the step's row written
        checkpoints.save(step, model, optimizer, {"step": step, "rng": gen.get_state(), "config": asdict(cfg)})

    if step == 0:
        validate()  # the starting point, on the same scale
    model.train()
    for _ in tqdm(range(step, cfg.n_steps), disable=not cfg.progress, desc=f"energy ({cfg.objective})"):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        if cfg.objective == "reverse_kl":
            us, log_ws = [], []
            for _ in range(parts):
                z = prior.sample(size, generator=gen, device=device, dtype=dtype)
                res = integrate(field_, z, solver=cfg.solver, differentiable=True)
                u = reduced_energy(res.x)
                if not torch.isfinite(u).all():
                    raise FloatingPointError("reverse KL needs finite energies on the flow's samples; "
                                             "start from a trained flow or use objective='importance'")
                part = (u - res.dlogp).mean() / parts
                part.backward()
                loss += float(part.detach())
                us.append(u.detach())
                log_ws.append((-u + prior.energy(z) + res.dlogp).detach())
            u, log_w = torch.cat(us), torch.cat(log_ws)
        else:
            if cfg.objective == "importance":
                z = prior.sample(cfg.batch_size, generator=gen, device=device, dtype=dtype)
                fwd = integrate(exact, z, solver=cfg.sample_solver)
                u = reduced_energy(fwd.x).detach()
                log_w = log_importance_weights(u, prior.energy(z), fwd.dlogp)
                x, weights = fwd.x, normalized_weights(log_w).to(dtype)
            else:
                x = data[torch.randint(len(data), (cfg.batch_size,), generator=gen, device=device)]
                if cfg.objective == "renyi":
                    u = reduced_energy(x).detach()
                    with torch.no_grad():
                        log_q = _log_q(exact, prior, x, cfg.solver)
                    # log of each frame's weight (p / q)^(alpha - 1), up to a constant (log Z)
                    log_w = (cfg.renyi_order - 1) * (-u - log_q)
                    weights = normalized_weights(log_w).to(dtype)
                else:
                    weights = torch.full((cfg.batch_size,), 1 / cfg.batch_size, device=device, dtype=dtype)
                    u = log_w = None
            for xs, ws in zip(x.split(size), weights.split(size)):
                part = -(ws * _log_q(field_, prior, xs, cfg.solver, differentiable=True)).sum()
                part.backward()
                loss += float(part.detach())
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        mean_energy, ess = math.nan, math.nan  # max_likelihood: frames of equal weight, no energy
        if u is not None:
            finite = torch.isfinite(u)
            ess = kish_ess(log_w) if torch.isfinite(log_w).any() else 0.0
            mean_energy = float(u[finite].mean()) if finite.any() else math.inf
        row = {"step": step, "loss": loss, "mean_energy": mean_energy, "ess": ess}
        rows.append(row)
        csv_log.write(row)
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    if step % cfg.checkpoint_every != 0:
        checkpoint()
    save_published(out / "model.pt", model, global_it=step, tbg=dict(meta or {}))
    return rows


def _log_q(field_: BoundDynamics, prior: MeanFreeGaussian, x: Tensor, solver: SolverConfig, *,
           differentiable: bool = False) -> Tensor:
    """log q(x) [B] of the flow: the prior's log-density where the back solve from t = 1 to 0 lands, plus its
    dlogp (= -int_0^1 div v dt)."""
    back = integrate(field_, x, t0=1.0, t1=0.0, solver=solver, differentiable=differentiable)
    return prior.log_prob(back.x) + back.dlogp


def _mean_nll(field_: BoundDynamics, prior: MeanFreeGaussian, frames: Tensor, solver: SolverConfig,
              chunk: int) -> tuple[float, float]:
    """Mean and standard error of -log q over ``frames``, by back solves of ``chunk`` frames without gradient."""
    with torch.no_grad():
        nll = -torch.cat([_log_q(field_, prior, xs, solver) for xs in frames.split(chunk)])
    stderr = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else math.nan
    return float(nll.mean()), stderr
