"""Batched reduced potential energies u(x) = U(x)/kT and forces with OpenMM.

One OpenMM Context per process is created once and reused for every configuration (setPositions +
getState). With ``n_workers > 1`` a pool of spawned processes (each with its own single-threaded CPU
context, built from the serialised System) evaluates chunks of the batch. Wild samples never crash a
batch: non-finite positions, atoms closer than ``min_distance_nm`` and configurations whose energy is not
finite (or that OpenMM rejects) get u = +inf, NaN forces and ``invalid = True``.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from typing import Literal

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import torch

from tbg.chem.forcefield import (ALANINE_DIPEPTIDE_TEMPERATURE, DEFAULT_FORCEFIELD_FILES, DIPEPTIDE_TEMPERATURE,
                                 create_system, default_temperature, platform as pick_platform,
                                 platform_properties)
from tbg.chem.peptides import Peptide
from tbg.chem.units import SCALE, kT as thermal_energy, to_nm

logger = logging.getLogger("tbg")

Unit = Literal["nm", "scaled"]

# Per-process evaluation context (worker processes and the main process each hold their own).
_CONTEXTS: dict[int, openmm.Context] = {}


def _make_context(system: openmm.System, plat: openmm.Platform, properties: dict[str, str]) -> openmm.Context:
    return openmm.Context(system, openmm.VerletIntegrator(0.001 * u.picoseconds), plat, properties)


def _worker_init(key: int, system_xml: str, platform_name: str, properties: dict[str, str]) -> None:
    system = openmm.XmlSerializer.deserialize(system_xml)
    _CONTEXTS[key] = _make_context(system, openmm.Platform.getPlatformByName(platform_name), properties)


def _evaluate(key: int, positions_nm: np.ndarray, want_forces: bool,
              min_distance_nm: float | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Energies [n] (kJ/mol), forces [n, N, 3] (kJ/mol/nm) or None, invalid flags [n]."""
    context = _CONTEXTS[key]
    n, n_atoms = positions_nm.shape[:2]
    energies = np.full(n, np.inf)
    forces = np.full((n, n_atoms, 3), np.nan) if want_forces else None
    invalid = ~np.isfinite(positions_nm).all(axis=(1, 2))
    if min_distance_nm is not None and n_atoms > 1:
        iu = np.triu_indices(n_atoms, 1)
        block = max(1, 2**22 // (n_atoms * n_atoms * 3))  # ~32 MB of pair vectors at a time
        with np.errstate(invalid="ignore"):  # NaN samples are already flagged
            for s in range(0, n, block):
                d = positions_nm[s:s + block, :, None, :] - positions_nm[s:s + block, None, :, :]
                r2 = np.einsum("bijk,bijk->bij", d, d)[:, iu[0], iu[1]]
                invalid[s:s + block] |= (r2 < min_distance_nm**2).any(axis=1)
    for i in np.flatnonzero(~invalid):
        try:
            context.setPositions(positions_nm[i])
            state = context.getState(getEnergy=True, getForces=want_forces)
            e = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        except Exception as err:  # OpenMM refuses e.g. coordinates that overflow its grids
            logger.debug("OpenMM rejected configuration %d: %s", i, err)
            invalid[i] = True
            continue
        if not np.isfinite(e):
            invalid[i] = True
            continue
        energies[i] = e
        if want_forces:
            f = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
            if np.isfinite(f).all():
                forces[i] = f
            else:
                invalid[i], energies[i] = True, np.inf
    return energies, forces, invalid


class EnergyModel:
    """Reduced energies u = U/kT and forces of one molecule for batches of configurations.

    ``temperature`` defaults to 300 K for capped peptides (ACE/NME present: the alanine dipeptide setting)
    and 310 K otherwise
    (the dipeptide setting). ``system`` overrides the default one from ``create_system``. Use as a context
    manager (or call ``close``) to shut down the worker pool when ``n_workers > 1``.
    """

    def __init__(self, peptide_or_topology: Peptide | app.Topology | mdtraj.Topology, *, temperature: float | None = None,
                 system: openmm.System | None = None, platform: openmm.Platform | str | None = None,
                 n_workers: int = 1, forcefield_files: tuple[str, ...] = DEFAULT_FORCEFIELD_FILES,
                 min_distance_nm: float | None = 0.01, chunk_size: int = 64) -> None:
        if isinstance(peptide_or_topology, Peptide):
            topology = peptide_or_topology.topology
            default_t = ALANINE_DIPEPTIDE_TEMPERATURE if peptide_or_topology.capped else DIPEPTIDE_TEMPERATURE
        elif isinstance(peptide_or_topology, (app.Topology, mdtraj.Topology)):
            topology = (peptide_or_topology.to_openmm() if isinstance(peptide_or_topology, mdtraj.Topology)
                        else peptide_or_topology)
            default_t = default_temperature(topology)
        else:
            raise TypeError(f"expected a Peptide, an openmm.app.Topology or an mdtraj.Topology, got "
                            f"{type(peptide_or_topology).__name__}")
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self.topology = topology
        self.n_atoms = topology.getNumAtoms()
        self.temperature = float(temperature if temperature is not None else default_t)
        self._kT = thermal_energy(self.temperature)
        self.system = system if system is not None else create_system(topology, forcefield_files=forcefield_files)
        if self.system.getNumParticles() != self.n_atoms:
            raise ValueError(f"system has {self.system.getNumParticles()} particles, topology {self.n_atoms} atoms")
        plat = pick_platform(platform) if not isinstance(platform, openmm.Platform) else platform
        self.platform_name = plat.getName()
        self.n_workers = n_workers
        self.min_distance_nm = min_distance_nm
        self.chunk_size = chunk_size
        self._key = id(self)
        self._pool: cf.ProcessPoolExecutor | None = None
        if n_workers == 1:
            _CONTEXTS[self._key] = _make_context(self.system, plat, platform_properties(plat))
        else:
            if self.platform_name in ("CUDA", "OpenCL"):
                logger.warning("n_workers=%d with the %s platform: workers share one device", n_workers,
                               self.platform_name)
            props = platform_properties(plat, threads=1)
            self._pool = cf.ProcessPoolExecutor(
                n_workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                initargs=(self._key, openmm.XmlSerializer.serialize(self.system), self.platform_name, props))

    @property
    def kT(self) -> float:
        """k_B T in kJ/mol."""
        return self._kT

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        _CONTEXTS.pop(self._key, None)

    def __enter__(self) -> EnergyModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def _positions_nm(self, positions: np.ndarray, unit: Unit) -> np.ndarray:
        if hasattr(positions, "detach"):  # torch tensor
            positions = positions.detach().cpu().numpy()
        x = np.asarray(positions, dtype=np.float64)
        if x.ndim == 2 and x.shape[1] == 3 * self.n_atoms:
            x = x.reshape(x.shape[0], self.n_atoms, 3)
        elif x.ndim == 2 and x.shape == (self.n_atoms, 3):
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must be [n, {self.n_atoms}, 3] or [n, {3 * self.n_atoms}], got "
                             f"{tuple(np.shape(positions))}")
        return np.ascontiguousarray(to_nm(x, unit))

    def _run(self, x: np.ndarray, want_forces: bool):
        if self._pool is None or len(x) <= 1:
            if self._pool is not None:  # tiny batch: still evaluate in a worker (no context here)
                return self._pool.submit(_evaluate, self._key, x, want_forces, self.min_distance_nm).result()
            return _evaluate(self._key, x, want_forces, self.min_distance_nm)
        size = max(1, min(self.chunk_size, -(-len(x) // self.n_workers)))
        futures = [self._pool.submit(_evaluate, self._key, x[s:s + size], want_forces, self.min_distance_nm)
                   for s in range(0, len(x), size)]
        parts = [f.result() for f in futures]
        energies = np.concatenate([p[0] for p in parts])
        forces = np.concatenate([p[1] for p in parts]) if want_forces else None
        return energies, forces, np.concatenate([p[2] for p in parts])

    def potential_energy(self, positions: np.ndarray, *, unit: Unit) -> np.ndarray:
        """U(x) in kJ/mol [n] (+inf for invalid configurations)."""
        return self._run(self._positions_nm(positions, unit), False)[0]

    def reduced_energy(self, positions: np.ndarray, *, unit: Unit, return_flags: bool = False):
        """u(x) = U(x)/kT [n]; positions [n, N, 3] (or [n, 3N]) in ``unit`` ("nm" or "scaled" = nm x SCALE).

        With ``return_flags`` also the boolean [n] array marking invalid configurations (u = +inf).
        """
        energies, _, invalid = self._run(self._positions_nm(positions, unit), False)
        u_red = energies / self._kT
        return (u_red, invalid) if return_flags else u_red

    def forces(self, positions: np.ndarray, *, unit: Unit, return_flags: bool = False):
        """Forces -dU/dx / kT in kT/nm [n, N, 3] (always per nm, whatever the input unit); NaN if invalid."""
        _, forces, invalid = self._run(self._positions_nm(positions, unit), True)
        forces = forces / self._kT
        return (forces, invalid) if return_flags else forces

    def energy_and_forces(self, positions: np.ndarray, *, unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u [n], forces -du/dx in kT/nm [n, N, 3], invalid [n]) from one evaluation per configuration."""
        energies, forces, invalid = self._run(self._positions_nm(positions, unit), True)
        return energies / self._kT, forces / self._kT, invalid

    def torch_reduced_energy(self, x: torch.Tensor, *, unit: Unit = "scaled") -> torch.Tensor:
        """u(x) [B] as a differentiable torch function of x [B, 3N] or [B, N, 3] in ``unit``: its gradient is
        -forces, converted to ``unit`` (du/dx_scaled = du/dx_nm / SCALE). Invalid configurations give
        u = +inf and a zero gradient. For training by energy (reverse KL) and gradient-based samplers."""
        return _ReducedEnergy.apply(x, self, unit)


class _ReducedEnergy(torch.autograd.Function):
    """u(x) with the OpenMM forces as its gradient (OpenMM is not differentiable by autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, model: EnergyModel, unit: Unit) -> torch.Tensor:  # noqa: ANN001
        u_red, forces, invalid = model.energy_and_forces(x, unit=unit)
        grad = -np.nan_to_num(forces, nan=0.0) / (SCALE if unit == "scaled" else 1.0)
        ctx.save_for_backward(torch.as_tensor(grad, dtype=x.dtype, device=x.device).reshape(x.shape))
        return torch.as_tensor(u_red, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return grad * grad_u.reshape(-1, *([1] * (grad.dim() - 1))), None, None
