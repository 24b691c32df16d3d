"""Evaluation of generated samples: chemical validity, reweighting diagnostics, free energies, the
literature's distribution metrics (energy-W2, torus-W2, TICA-W2, Ramachandran JSD), reports.

``evaluate`` (tbg.evaluate.report) works on arrays; ``tbg.evaluate.runs`` evaluates a samples.npz against MD
data on disk and ``tbg.evaluate.demo`` is the demo pipeline (both imported on demand: they load OpenMM).
"""

from tbg.evaluate.metrics import (
    RAMACHANDRAN_BASINS,
    TICA,
    BasinDefinition,
    backbone_torsions,
    basin_free_energy_difference,
    circular_wasserstein,
    energy_w2,
    fit_tica,
    free_energy_profile,
    in_arc,
    point_set_w2,
    ramachandran_jsd,
    state_free_energy_difference,
    tica_features,
    tica_w2,
    torus_w2,
    wasserstein_1d,
)
from tbg.evaluate.plots import FIGURE_PIXELS
from tbg.evaluate.report import (REPORT_FILE, EvaluationOptions, MDFrames, ModelSamples, Molecule, evaluate,
                                 summary_table)
from tbg.evaluate.validity import (ValidityChecker, ValidityResult, bond_adjacency, bond_cutoffs, bond_pairs,
                                   chirality_signs)

__all__ = [
    "BasinDefinition",
    "EvaluationOptions",
    "MDFrames",
    "ModelSamples",
    "Molecule",
    "FIGURE_PIXELS",
    "RAMACHANDRAN_BASINS",
    "REPORT_FILE",
    "TICA",
    "ValidityChecker",
    "ValidityResult",
    "backbone_torsions",
    "basin_free_energy_difference",
    "bond_adjacency",
    "bond_cutoffs",
    "bond_pairs",
    "chirality_signs",
    "circular_wasserstein",
    "energy_w2",
    "evaluate",
    "fit_tica",
    "free_energy_profile",
    "in_arc",
    "point_set_w2",
    "ramachandran_jsd",
    "state_free_energy_difference",
    "summary_table",
    "tica_features",
    "tica_w2",
    "torus_w2",
    "wasserstein_1d",
]
