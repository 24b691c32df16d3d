"""Training data: trajectories in the published layout -> centred, scaled, encoded ragged batches.

Frames come from ``tbg.chem.trajectory.MDData`` sources: the published layout (a peptide ``name`` in
a directory as ``{name}-traj-state0.pdb`` + ``{name}-traj-arrays.npz``, positions in nm, as
``tbg.chem.md.simulate`` writes it). Items of ``PeptideDataset`` are (x [n, 3] float32 in model units = (positions - mean) * SCALE,
features [n, F] float32, name); ``collate_ragged`` concatenates them into a ``RaggedBatch``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mdtraj
import numpy as np
import torch
from torch.utils.data import Dataset

from tbg.chem.encoding import encode_atoms, encode_transfer
from tbg.chem.trajectory import MDData, layout_names, layout_source
from tbg.chem.units import SCALE

logger = logging.getLogger("tbg")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
ALANINE_DIPEPTIDE_DIR = DATA_DIR / "alanine-dipeptide"

__all__ = ["SCALE", "ALANINE_DIPEPTIDE_DIR", "RaggedBatch", "PeptideDataset", "collate_ragged", "load_trajectory",
           "split_by_peptide", "find_peptides"]


def load_trajectory(directory: str | Path, name: str | None = None) -> tuple[mdtraj.Topology, np.ndarray]:
    """(topology, positions [frames, atoms, 3] in nm) of peptide ``name`` in ``directory`` (or an .npz path)."""
    return layout_source(directory, name).load()


def find_peptides(directory: str | Path) -> list[str]:
    """Names of all peptides with both files of the published layout in ``directory``, sorted."""
    return layout_names(directory)


@dataclass
class RaggedBatch:
    """Atoms of B molecules concatenated: x [M, 3] (model units, mean-free per molecule), features [M, F],
    mol_ptr [B + 1] int64 offsets, names [B]."""

    x: torch.Tensor
    features: torch.Tensor
    mol_ptr: torch.Tensor
    names: list[str]

    def to(self, device: torch.device | str) -> RaggedBatch:
        return RaggedBatch(self.x.to(device), self.features.to(device), self.mol_ptr.to(device), list(self.names))

    @property
    def n_molecules(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> torch.Tensor:
        return self.mol_ptr[1:] - self.mol_ptr[:-1]


def collate_ragged(items: Sequence[tuple[torch.Tensor, torch.Tensor, str]]) -> RaggedBatch:
    """Concatenate (x [n, 3], features [n, F], name) items into a RaggedBatch (empty input allowed)."""
    if not items:
        return RaggedBatch(torch.zeros(0, 3), torch.zeros(0, 0), torch.zeros(1, dtype=torch.long), [])
    widths = {f.shape[1] for _, f, _ in items}
    if len(widths) != 1:
        raise ValueError(f"items have different feature widths {sorted(widths)}")
    for x, f, name in items:
        if x.dim() != 2 or x.shape[1] != 3 or f.shape[0] != x.shape[0]:
            raise ValueError(f"item {name!r}: x {tuple(x.shape)} and features {tuple(f.shape)} do not match")
    sizes = torch.tensor([x.shape[0] for x, _, _ in items], dtype=torch.long)
    return RaggedBatch(x=torch.cat([x for x, _, _ in items]), features=torch.cat([f for _, f, _ in items]),
                       mol_ptr=torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]), names=[n for _, _, n in items])


class PeptideDataset(Dataset):
    """Frames of one or many peptides as (x [n, 3], features [n, F], name) items.

    ``sources``: a directory (all peptides in it, or those in ``names``), a single ``-traj-arrays.npz``
    path, an ``MDData``, or a list of such paths / (directory, name) pairs / MDData. ``encoding``: "transfer" (76-wide, see
    tbg.chem.encoding) or "atoms" (alanine-dipeptide style). ``stride`` and ``max_frames`` thin each
    trajectory. Positions are held in memory as float32 model units, centred per frame.
    """

    def __init__(self, sources: str | Path | MDData | Sequence[str | Path | tuple[str | Path, str] | MDData], *,
                 names: Sequence[str] | None = None, encoding: Literal["transfer", "atoms"] = "transfer",
                 atom_types: Mapping[str, int] | str | Path | None = None, stride: int = 1,
                 max_frames: int | None = None) -> None:
        if encoding not in ("transfer", "atoms"):
            raise ValueError(f"encoding must be 'transfer' or 'atoms', got {encoding!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.encoding = encoding
        self.names: list[str] = []
        self.topologies: dict[str, mdtraj.Topology] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.positions: dict[str, torch.Tensor] = {}
        for source in self._expand(sources, names):
            topology, pos = source.load()
            name = source.name
            if name in self.positions:
                raise ValueError(f"peptide {name!r} given twice")
            pos = pos[::stride][:max_frames].astype(np.float64)
            pos = (pos - pos.mean(axis=1, keepdims=True)) * SCALE
            self.names.append(name)
            self.topologies[name] = topology
            self.positions[name] = torch.from_numpy(pos.astype(np.float32))
            self.features[name] = (encode_transfer(topology, atom_types) if encoding == "transfer"
                                   else encode_atoms(topology))
        if not self.names:
            raise ValueError(f"no peptides found in {sources}")
        widths = {f.shape[1] for f in self.features.values()}
        if len(widths) != 1:
            raise ValueError(f"encodings of different widths {sorted(widths)} (use encoding='transfer' for "
                             "several peptides)")
        counts = torch.tensor([len(self.positions[n]) for n in self.names])
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        logger.info("PeptideDataset: %d peptides, %d frames", len(self.names), int(self._offsets[-1]))

    @staticmethod
    def _expand(sources, names: Sequence[str] | None) -> list[MDData]:  # noqa: ANN001
        if isinstance(sources, MDData):
            return [sources]
        if isinstance(sources, (str, Path)):
            path = Path(sources)
            if path.suffix == ".npz":
                return [layout_source(path)]
            if not path.is_dir():
                raise FileNotFoundError(f"no such data directory: {path}")
            return [layout_source(path, n) for n in (names if names is not None else layout_names(path))]
        return [src if isinstance(src, MDData) else layout_source(*src) if isinstance(src, tuple)
                else layout_source(src) for src in sources]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        index %= len(self)
        k = int(torch.searchsorted(self._offsets, torch.tensor(index), right=True)) - 1
        name = self.names[k]
        return self.positions[name][index - int(self._offsets[k])], self.features[name], name

    def frames_of(self, name: str) -> torch.Tensor:
        """All frames [T, n, 3] (model units, centred) of one peptide."""
        return self.positions[name]


def split_by_peptide(names: Sequence[str], test_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Random (train, test) split of distinct peptide names; every peptide lands in exactly one part."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    unique = sorted(set(names))
    if len(unique) != len(names):
        logger.debug("split_by_peptide: %d duplicate names ignored", len(names) - len(unique))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = int(round(test_fraction * len(unique)))
    test = sorted(unique[i] for i in order[:n_test])
    train = sorted(unique[i] for i in order[n_test:])
    return train, test
