"""Force fields and OpenMM systems as used for the published TBG data (see docs/model.md).

Dipeptides: amber14-all + implicit solvent OBC1, CutoffNonPeriodic with a 2 nm cutoff, no constraints,
310 K. Alanine dipeptide: the same force field at 300 K.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import openmm
import openmm.app as app
import openmm.unit as u

from tbg.errors import InputError

logger = logging.getLogger("tbg")

DIPEPTIDE_TEMPERATURE: float = 310.0
ALANINE_DIPEPTIDE_TEMPERATURE: float = 300.0
DEFAULT_FORCEFIELD_FILES: tuple[str, ...] = ("amber14-all.xml", "implicit/obc1.xml")

CAP_RESIDUES: tuple[str, ...] = ("ACE", "NME")

_CONSTRAINTS = {None: None, "none": None, "hbonds": app.HBonds, "allbonds": app.AllBonds,
                "hangles": app.HAngles}


def default_temperature(topology) -> float:  # noqa: ANN001 - openmm.app.Topology or mdtraj.Topology
    """The temperature of the published data for a molecule: ALANINE_DIPEPTIDE_TEMPERATURE (300 K) for
    capped peptides (ACE or NME residues, as alanine dipeptide), DIPEPTIDE_TEMPERATURE (310 K) otherwise."""
    residues = topology.residues() if callable(topology.residues) else topology.residues  # OpenMM / mdtraj
    capped = any(r.name in CAP_RESIDUES for r in residues)
    return ALANINE_DIPEPTIDE_TEMPERATURE if capped else DIPEPTIDE_TEMPERATURE


@functools.lru_cache(maxsize=8)
def forcefield(files: tuple[str, ...] = DEFAULT_FORCEFIELD_FILES) -> app.ForceField:
    """Cached OpenMM ForceField (parsing the XML files takes ~1 s)."""
    return app.ForceField(*files)


def create_system(topology: app.Topology, *, forcefield_files: Sequence[str] = DEFAULT_FORCEFIELD_FILES,
                  cutoff_nm: float = 2.0, constraints: str | None = None,
                  hydrogen_mass_amu: float | None = None) -> openmm.System:
    """OpenMM System for ``topology``: CutoffNonPeriodic at ``cutoff_nm`` as published.

    ``constraints``: None (published), "hbonds", "allbonds" or "hangles".
    ``hydrogen_mass_amu``: hydrogen mass repartitioning. Every hydrogen gets this mass and the
    difference is taken from the heavy atom it is bonded to, so the total mass is unchanged. Masses do
    not enter the potential energy, so the configurational Boltzmann distribution exp(-U/kT) is the same;
    heavier hydrogens only slow the fastest vibrations, which lets MD take longer stable time steps.
    None keeps the force field's masses.
    """
    key = constraints.lower() if isinstance(constraints, str) else constraints
    if key not in _CONSTRAINTS:
        raise ValueError(f"constraints must be one of {sorted(k for k in _CONSTRAINTS if k)} or None, "
                         f"got {constraints!r}")
    if not cutoff_nm > 0:
        raise ValueError(f"cutoff_nm must be positive, got {cutoff_nm}")
    if hydrogen_mass_amu is not None and not 1.0 <= hydrogen_mass_amu <= 4.0:
        raise ValueError(f"hydrogen_mass_amu must be between 1 and 4 amu (3-4 is usual), got {hydrogen_mass_amu}")
    ff = forcefield(tuple(forcefield_files))
    extra = {} if hydrogen_mass_amu is None else {"hydrogenMass": hydrogen_mass_amu * u.amu}
    system = ff.createSystem(topology, nonbondedMethod=app.CutoffNonPeriodic,
                             nonbondedCutoff=cutoff_nm * u.nanometer, constraints=_CONSTRAINTS[key], **extra)
    if hydrogen_mass_amu is not None:
        # A heavy atom carrying several hydrogens (a methyl carbon gives up 3 x (m_H - 1.008) amu) must keep
        # a sensible mass of its own.
        lightest = min(system.getParticleMass(i).value_in_unit(u.amu) for i in range(system.getNumParticles()))
        if lightest < 1.0:
            raise ValueError(f"hydrogen_mass_amu {hydrogen_mass_amu} leaves a heavy atom with {lightest:.2f} amu; "
                             f"use a smaller hydrogen mass")
    return system


def platform(name: str | None = None) -> openmm.Platform:
    """The OpenMM platform ``name``, or the fastest available: CUDA, then OpenCL, then CPU."""
    if name is not None:
        try:
            return openmm.Platform.getPlatformByName(name)
        except Exception as err:  # OpenMMException carries the list of known platforms
            available = [openmm.Platform.getPlatform(i).getName()
                         for i in range(openmm.Platform.getNumPlatforms())]
            raise ValueError(f"OpenMM platform {name!r} not available; have {available}") from err
    for candidate in ("CUDA", "OpenCL", "CPU", "Reference"):
        try:
            plat = openmm.Platform.getPlatformByName(candidate)
        except Exception:
            continue
        if candidate in ("CUDA", "OpenCL") and not _usable(plat):
            continue
        logger.debug("OpenMM platform: %s", candidate)
        return plat
    raise RuntimeError("no OpenMM platform available")


GPU_PLATFORMS: tuple[str, ...] = ("CUDA", "OpenCL")


def usable_platforms() -> list[str]:
    """Names of the OpenMM platforms that can run here (GPU platforms are tried with a one-particle context:
    they can be installed without a device)."""
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    return [n for n in names if n not in GPU_PLATFORMS or _usable(openmm.Platform.getPlatformByName(n))]


def choose_platform(device: str | None, usable: Sequence[str]) -> tuple[str | None, str | None]:
    """(OpenMM platform name, device index) for a torch-style ``device`` given the ``usable`` platforms:
    None: (None, None), the fastest usable (``platform``); "cpu": CPU (Reference without it); "cuda" or
    "cuda:N": CUDA, else OpenCL (which also drives NVIDIA GPUs), on device N. InputError naming the device
    when no platform fits."""
    if device is None:
        return None, None
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return ("CPU" if "CPU" in usable else "Reference"), None
    if kind == "cuda" and (not index or index.isdigit()):
        for name in GPU_PLATFORMS:
            if name in usable:
                return name, index or None
        raise InputError(f"OpenMM has no usable CUDA or OpenCL platform for device {device!r} here (usable: "
                         f"{', '.join(usable) or 'none'}); use the device 'cpu'")
    raise InputError(f"unknown device {device!r}: expected cpu, cuda or cuda:N")


def platform_for_device(device: str | None, *, fallback: bool = False) -> openmm.Platform | None:
    """The OpenMM platform for a torch-style ``device`` (``choose_platform``), set to its device index;
    None for ``device=None`` (let ``platform`` pick the fastest), and with ``fallback`` also when no
    platform drives the device (with a warning) instead of refusing."""
    try:
        name, index = choose_platform(device, usable_platforms() if device is not None else ())
    except InputError as err:
        if not fallback or device is None or not device.startswith("cuda"):
            raise
        logger.warning("%s: the OpenMM energies run on the fastest platform available", err)
        return None
    if name is None:
        return None
    plat = openmm.Platform.getPlatformByName(name)
    if index is not None:
        plat.setPropertyDefaultValue("DeviceIndex", index)
        if not _usable(plat, index):
            raise InputError(f"OpenMM's {name} platform cannot use device {index} (device {device!r})")
    logger.info("OpenMM platform for device %s: %s", device, name)
    return plat


@functools.lru_cache(maxsize=8)
def _usable(plat: openmm.Platform, device_index: str | None = None) -> bool:
    """A GPU platform can be registered without a device; try a one-particle context."""
    system = openmm.System()
    system.addParticle(1.0)
    try:
        openmm.Context(system, openmm.VerletIntegrator(0.001), plat,
                       {} if device_index is None else {"DeviceIndex": device_index})
    except Exception:
        return False
    return True


def platform_properties(plat: openmm.Platform, threads: int | None = None) -> dict[str, str]:
    """Context properties: CPU thread count when given (keep worker processes from oversubscribing)."""
    if plat.getName() == "CPU" and threads is not None:
        return {"Threads": str(int(threads))}
    return {}
