"""The TBG prior: an isotropic standard normal on the mean-free subspace of each molecule (docs/model.md).

For a molecule of N atoms the positions live in R^{3N}, but the flow (translation invariant) only ever
sees configurations with zero centre of mass, a (N-1)*3-dimensional subspace. The prior is the standard
normal on that subspace with its own Lebesgue measure (orthonormal coordinates), so

    log q0(z) = -0.5 |z - mean z|^2 - 3 (N - 1) / 2 * log(2 pi).

Sampling draws a standard normal in R^{3N} and removes the mean: the orthogonal projection of an
isotropic Gaussian is the isotropic Gaussian of the subspace. ``prior_energy`` is the published weight
convention 0.5 |z - mean z|^2 (the constant dropped).

``MeanFreeGaussian(n, scale=s)`` is the same Gaussian with standard deviation s, a proposal for sampling:
the flow maps s z instead of z, and since its density is known exactly (prior_energy becomes
0.5 |z - mean z|^2 / s^2 + (N - 1) * 3 * log s), importance weights computed with it stay exact. With
s < 1 the flow's samples concentrate where the trained flow puts most of its mass (the latent analogue of
sampling at a lower temperature); training always uses s = 1.

Two layouts: a fixed molecule, z [B, 3N] (or [B, N, 3]); and ragged batches, z [M, 3] with mol_ptr [B + 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tbg.nn.layout import check_mol_ptr, molecule_index

__all__ = ["MeanFreeGaussian", "center_ragged", "sample_ragged", "log_prob_ragged", "prior_energy_ragged"]


class MeanFreeGaussian:
    """Normal with standard deviation ``scale`` (default: the standard normal) on the mean-free subspace of
    one molecule of ``n_atoms`` atoms; z is [B, 3N]."""

    def __init__(self, n_atoms: int, spatial_dim: int = 3, *, scale: float = 1.0) -> None:
        if n_atoms < 2:
            raise ValueError(f"the mean-free prior needs at least 2 atoms, got {n_atoms}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the prior's scale must be a positive number, got {scale}")
        self.n_atoms, self.spatial_dim, self.scale = n_atoms, spatial_dim, float(scale)

    @property
    def dim(self) -> int:
        """Ambient dimension 3N."""
        return self.n_atoms * self.spatial_dim

    @property
    def subspace_dim(self) -> int:
        """Degrees of freedom (N - 1) * 3."""
        return (self.n_atoms - 1) * self.spatial_dim

    def _atoms(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be [B, {self.dim}] for {self.n_atoms} atoms, got {tuple(z.shape)}")
        return z.reshape(z.shape[0], self.n_atoms, self.spatial_dim)

    def center(self, z: Tensor) -> Tensor:
        """z with the mean position of every sample removed, [B, 3N]."""
        a = self._atoms(z)
        return (a - a.mean(1, keepdim=True)).reshape(z.shape)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
        """n samples [n, 3N], mean-free."""
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype)
        return self.scale * self.center(z)

    def energy(self, z: Tensor) -> Tensor:
        """prior_energy(z) = 0.5 |z - mean z|^2 / scale^2 + subspace_dim * log(scale), [B]: -log q0(z) without
        the constant of the standard normal (the published weight convention when scale = 1)."""
        energy = 0.5 * self.center(z).pow(2).sum(1)
        if self.scale == 1.0:
            return energy
        return energy / self.scale ** 2 + self.subspace_dim * math.log(self.scale)

    def log_prob(self, z: Tensor) -> Tensor:
        """Normalised log-density on the (N-1)*3-dimensional subspace, [B]."""
        return -self.energy(z) - 0.5 * self.subspace_dim * math.log(2 * math.pi)


def _segment_mean(x: Tensor, mol_ptr: Tensor) -> tuple[Tensor, Tensor]:
    check_mol_ptr(mol_ptr, x.shape[0])
    sizes = mol_ptr.diff()
    if (sizes < 2).any():
        raise ValueError("every molecule needs at least 2 atoms for the mean-free prior")
    mol = molecule_index(mol_ptr)
    sums = torch.zeros(sizes.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, mol, x)
    return sums / sizes.unsqueeze(1).to(x.dtype), mol


def center_ragged(x: Tensor, mol_ptr: Tensor) -> Tensor:
    """Ragged positions [M, 3] with each molecule's mean removed."""
    mean, mol = _segment_mean(x, mol_ptr)
    return x - mean[mol]


def sample_ragged(mol_ptr: Tensor, *, spatial_dim: int = 3, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """One mean-free standard-normal sample per molecule, ragged [M, 3], on mol_ptr's device."""
    z = torch.randn(int(mol_ptr[-1]), spatial_dim, generator=generator, device=mol_ptr.device, dtype=dtype)
    return center_ragged(z, mol_ptr)


def prior_energy_ragged(z: Tensor, mol_ptr: Tensor) -> Tensor:
    """0.5 |z - mean z|^2 per molecule, [B]."""
    zc = center_ragged(z, mol_ptr)
    sq = zc.pow(2).sum(1)
    return 0.5 * torch.zeros(mol_ptr.numel() - 1, dtype=z.dtype, device=z.device).index_add_(
        0, molecule_index(mol_ptr), sq)


def log_prob_ragged(z: Tensor, mol_ptr: Tensor) -> Tensor:
    """Normalised log-density per molecule, [B]; molecule b has (n_b - 1) * 3 degrees of freedom."""
    dof = (mol_ptr.diff() - 1).to(z.dtype) * z.shape[1]
    return -prior_energy_ragged(z, mol_ptr) - 0.5 * dof * math.log(2 * math.pi)
