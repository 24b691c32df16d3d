"""Chemistry: peptides from sequences, force fields, MD data generation, energies, encodings, datasets."""
from tbg.chem.data import (ALANINE_DIPEPTIDE_DIR, PeptideDataset, RaggedBatch, collate_ragged, find_peptides,
                           load_trajectory, split_by_peptide)
from tbg.chem.encoding import (AMINO_ACID_ORDER, atom_classes, atom_type_indices, default_atom_types, encode_atoms,
                               encode_transfer, features_for_width, load_atom_types,
                               published_alanine_dipeptide_encoding)
from tbg.chem.energy import EnergyModel
from tbg.chem.forcefield import (ALANINE_DIPEPTIDE_TEMPERATURE, DIPEPTIDE_TEMPERATURE, create_system,
                                 default_temperature, platform)
from tbg.chem.md import simulate, simulate_many
from tbg.chem.peptides import Peptide, all_dipeptides, alanine_dipeptide, build_peptide
from tbg.chem.trajectory import MDData, find_md_data, write_trajectory
from tbg.chem.units import SCALE, kT

__all__ = [
    "ALANINE_DIPEPTIDE_DIR", "ALANINE_DIPEPTIDE_TEMPERATURE", "AMINO_ACID_ORDER", "DIPEPTIDE_TEMPERATURE", "SCALE",
    "EnergyModel", "MDData", "Peptide", "PeptideDataset", "RaggedBatch", "all_dipeptides", "alanine_dipeptide",
    "atom_classes", "atom_type_indices", "build_peptide", "collate_ragged", "create_system", "default_atom_types",
    "default_temperature", "encode_atoms", "encode_transfer", "features_for_width", "find_md_data", "find_peptides",
    "kT", "load_atom_types", "load_trajectory", "platform", "published_alanine_dipeptide_encoding", "simulate",
    "simulate_many", "split_by_peptide", "write_trajectory",
]
