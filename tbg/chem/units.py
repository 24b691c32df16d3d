"""Unit conventions shared by the chemistry side and the flow.

The network sees centred positions in nm multiplied by ``SCALE`` ("scaled" or model units); energies are
always evaluated in nm. Define the factor once here and import it everywhere else (docs/model.md, "Units",
lists every unit).
"""
from __future__ import annotations

import openmm.unit as u

SCALE: float = 30.0
"""Model units per nm: x_model = x_nm * SCALE (published TBG setting)."""

MOLAR_GAS_CONSTANT: float = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
"""R in kJ/(mol K), from OpenMM's own constant so that kT agrees with OpenMM to the last digit."""


def kT(temperature_k: float) -> float:
    """Thermal energy k_B T in kJ/mol at ``temperature_k`` kelvin."""
    if not temperature_k > 0:
        raise ValueError(f"temperature must be positive (kelvin), got {temperature_k}")
    return MOLAR_GAS_CONSTANT * float(temperature_k)


def to_nm(positions, unit: str):
    """Convert positions given in ``unit`` ("nm" or "scaled") to nm (works on numpy arrays and tensors)."""
    if unit == "nm":
        return positions
    if unit == "scaled":
        return positions / SCALE
    raise ValueError(f"unit must be 'nm' or 'scaled', got {unit!r}")
