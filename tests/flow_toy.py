"""A 2-atom Boltzmann distribution with a known energy, for the flow tests (importable and a CLI).

Two atoms in 3D with a double-well pair potential u(r) = A (r - 1.5)^2 (r - 2.5)^2 (reduced units, model
coordinates). On the 3-dimensional mean-free subspace the target is exp(-u), so the distance r has
density ~ r^2 exp(-u(r)), computed here by quadrature; training data is drawn from it exactly.

CLI (used by the kill/resume and torchrun tests):
    python tests/flow_toy.py train OUT --steps S --checkpoint-every K [--sleep SEC]
    python tests/flow_toy.py sample OUT --n N --batch B [--model PATH] [--sleep SEC]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

import tbg
import tbg.flow
import tbg.nn
from tbg.nn.layout import mol_ptr_from_sizes

A = 16.0
R_GRID = np.linspace(1e-3, 5.0, 20001)


def reduced_energy(r: np.ndarray) -> np.ndarray:
    return A * (r - 1.5) ** 2 * (r - 2.5) ** 2


def distance_density() -> np.ndarray:
    """Normalised density of r on R_GRID."""
    p = R_GRID**2 * np.exp(-reduced_energy(R_GRID))
    return p / np.trapezoid(p, R_GRID)


def draw(n: int, seed: int) -> torch.Tensor:
    """n exact samples of the target, [n, 2, 3], mean-free."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(distance_density())
    r = np.interp(rng.random(n), cdf / cdf[-1], R_GRID)
    d = rng.normal(size=(n, 3))
    d *= (r / np.linalg.norm(d, axis=1))[:, None]
    return torch.tensor(np.stack([d / 2, -d / 2], 1), dtype=torch.float32)


def distances(samples: np.ndarray) -> np.ndarray:
    x = samples.reshape(-1, 2, 3)
    return np.linalg.norm(x[:, 0] - x[:, 1], axis=1)


@dataclass
class ToyBatch:
    x: torch.Tensor
    features: torch.Tensor
    mol_ptr: torch.Tensor

    def to(self, device: torch.device | str) -> "ToyBatch":
        return ToyBatch(self.x.to(device), self.features.to(device), self.mol_ptr.to(device))


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> ToyBatch:
    return ToyBatch(torch.cat([x for x, _ in items]), torch.cat([f for _, f in items]),
                    mol_ptr_from_sizes([len(x) for x, _ in items]))


FEATURES = torch.ones(2, 1)


def items(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, FEATURES) for x in draw(n, seed)]


def model(seed: int = 0) -> tbg.EGNN:
    torch.manual_seed(seed)
    return tbg.EGNN(1, hidden=16, n_layers=2)


class SlowLoader:
    """A loader that sleeps before each batch, so that a test can kill a run mid-way."""

    def __init__(self, loader: tbg.flow.RaggedLoader, sleep: float) -> None:
        self.loader, self.sleep = loader, sleep

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.sleep)
            yield batch


class SlowDynamics:
    """A field that sleeps before each evaluation, so that a test can kill a sampling run mid-way."""

    def __init__(self, dyn: tbg.flow.Dynamics, sleep: float) -> None:
        self.dyn, self.sleep = dyn, sleep

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.sleep)
        return self.dyn(t, x)

    def divergence(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.sleep)
        return self.dyn.divergence(t, x)


def train_config(steps: int, checkpoint_every: int) -> tbg.flow.TrainConfig:
    return tbg.flow.TrainConfig(n_steps=steps, lr=3e-3, lr_milestones=(steps * 2 // 3,), checkpoint_every=checkpoint_every,
                                validate_every=checkpoint_every, log_every=10, ema_decay=0.9, grad_clip=10.0,
                                progress=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "sample"])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model")
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.mode == "train":
        loader = SlowLoader(tbg.flow.RaggedLoader(items(512), 32, collate=collate), a.sleep)
        val = tbg.flow.RaggedLoader(items(64, seed=1), 32, shuffle=False, collate=collate)
        tbg.flow.train(model(), loader, a.out, train_config(a.steps, a.checkpoint_every), val_data=val)
    else:
        egnn = tbg.nn.load_egnn(a.model) if a.model else model()
        dyn = SlowDynamics(tbg.flow.as_dynamics(tbg.nn.BoundDynamics(egnn, FEATURES)), a.sleep)
        cfg = tbg.flow.SampleConfig(n_samples=a.n_samples, batch_size=a.batch, likelihood="joint", progress=False,
                                    solver=tbg.flow.SolverConfig(method="rk4", n_steps=4))
        tbg.flow.sample(dyn, 2, a.out, cfg)


if __name__ == "__main__":
    main()
