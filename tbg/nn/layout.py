"""The three batch layouts of molecules and conversions to the ragged layout the kernels use.

- fixed:  x [B, N, 3]; every molecule has the same N atoms.
- padded: x [B, N, 3] with node_mask [B, N] (1 = real atom), as the published transfer model
          pads every dipeptide to 51 atoms. Real atoms need not come first.
- ragged: x [M, 3], the atoms of all molecules concatenated, with mol_ptr [B + 1] (int64) so
          that molecule b holds atoms mol_ptr[b] : mol_ptr[b + 1].
Within a molecule every ordered pair of distinct (real) atoms is an edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def check_mol_ptr(mol_ptr: Tensor, n_atoms: int) -> None:
    """Raise ValueError unless mol_ptr is a valid offsets vector ending at ``n_atoms``."""
    if mol_ptr.dim() != 1 or mol_ptr.numel() < 1 or mol_ptr.dtype != torch.long:
        raise ValueError(f"mol_ptr must be a 1-d int64 tensor of length n_molecules + 1, got "
                         f"shape {tuple(mol_ptr.shape)} and dtype {mol_ptr.dtype}")
    ptr = mol_ptr.detach().cpu()
    if ptr[0] != 0 or ptr[-1] != n_atoms:
        raise ValueError(f"mol_ptr must start at 0 and end at the number of atoms {n_atoms}, "
                         f"got {ptr[0].item()} ... {ptr[-1].item()}")
    if (ptr[1:] < ptr[:-1]).any():
        bad = int((ptr[1:] < ptr[:-1]).nonzero()[0]) + 1
        raise ValueError(f"mol_ptr must not decrease: mol_ptr[{bad}] = {ptr[bad].item()} < "
                         f"mol_ptr[{bad - 1}] = {ptr[bad - 1].item()}")


def mol_ptr_from_sizes(sizes: Tensor | list[int], device: torch.device | str | None = None) -> Tensor:
    """Offsets [B + 1] from molecule sizes [B]."""
    sizes = torch.as_tensor(sizes, dtype=torch.long, device=device)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


def molecule_index(mol_ptr: Tensor) -> Tensor:
    """Molecule id of every atom, [M], from offsets [B + 1]."""
    sizes = mol_ptr.diff()
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=mol_ptr.device), sizes)


def local_index(mol_ptr: Tensor) -> Tensor:
    """Position of every atom inside its molecule, [M]."""
    mol = molecule_index(mol_ptr)
    return torch.arange(mol.numel(), device=mol_ptr.device) - mol_ptr[mol]


def max_atoms(mol_ptr: Tensor) -> int:
    """Atoms of the largest molecule (0 for no molecules)."""
    return int(mol_ptr.diff().max()) if mol_ptr.numel() > 1 else 0


def per_molecule_sum(values: Tensor, mol_ptr: Tensor) -> Tensor:
    """Sum of values [M] over each molecule's atoms, [B]."""
    out = values.new_zeros(mol_ptr.numel() - 1)
    return out.index_add(0, molecule_index(mol_ptr), values)


def unit_tangents(mol_ptr: Tensor, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> Tensor:
    """Unit coordinate tangents shared by the molecules of a ragged batch, [T, M, 3].

    Tangent 3 a + k is 1 at coordinate k of the a-th atom of every molecule that has more than a
    atoms. Molecules never interact, so one tangent serves them all and the 3 * max_atoms tangents
    reach every coordinate; tangents start ... stop - 1 are returned.
    """
    n_tan = 3 * max_atoms(mol_ptr)
    stop = n_tan if stop is None else min(stop, n_tan)
    coord = local_index(mol_ptr).unsqueeze(1) * 3 + torch.arange(3, device=mol_ptr.device)  # [M, 3]
    idx = torch.arange(start, stop, device=mol_ptr.device)
    return (coord.unsqueeze(0) == idx.view(-1, 1, 1)).to(dtype)


def ragged_edges(mol_ptr: Tensor) -> tuple[Tensor, Tensor]:
    """(row, col) of every ordered pair i != j inside each molecule; row is the receiving atom."""
    sizes = mol_ptr.diff()
    mol = molecule_index(mol_ptr)
    row = torch.repeat_interleave(torch.arange(mol.numel(), device=mol_ptr.device), sizes[mol])
    # col runs over the atoms of row's molecule: start of the molecule + position in the group.
    group_start = torch.repeat_interleave(sizes[mol].cumsum(0) - sizes[mol], sizes[mol])
    col = mol_ptr[mol[row]] + torch.arange(row.numel(), device=mol_ptr.device) - group_start
    keep = row != col
    return row[keep], col[keep]


@dataclass(frozen=True)
class RaggedView:
    """How a fixed or padded batch maps onto the ragged layout.

    ``atoms`` are the flat indices (into B * N) of the real atoms, in ragged order;
    ``mol_ptr`` the resulting offsets. ``shape`` is (B, N) of the dense batch.
    """

    atoms: Tensor | None  # None: every atom is real (fixed layout)
    mol_ptr: Tensor
    shape: tuple[int, int]

    @staticmethod
    def of(batch: int, n_atoms: int, node_mask: Tensor | None, device: torch.device) -> "RaggedView":
        if node_mask is None:
            return RaggedView(None, torch.arange(batch + 1, device=device) * n_atoms, (batch, n_atoms))
        mask = node_mask.reshape(batch, n_atoms) != 0
        atoms = mask.reshape(-1).nonzero().squeeze(1)
        return RaggedView(atoms, mol_ptr_from_sizes(mask.sum(1), device=device), (batch, n_atoms))

    def gather(self, dense: Tensor) -> Tensor:
        """[B, N, ...] -> [M, ...] (the real atoms only)."""
        flat = dense.reshape(self.shape[0] * self.shape[1], *dense.shape[2:])
        return flat if self.atoms is None else flat.index_select(0, self.atoms)

    def scatter(self, ragged: Tensor) -> Tensor:
        """[M, ...] -> [B, N, ...] with zeros at padded atoms."""
        if self.atoms is None:
            return ragged.reshape(*self.shape, *ragged.shape[1:])
        out = ragged.new_zeros(self.shape[0] * self.shape[1], *ragged.shape[1:])
        out = out.index_copy(0, self.atoms, ragged)
        return out.reshape(*self.shape, *ragged.shape[1:])


def to_ragged(x: Tensor, features: Tensor, node_mask: Tensor | None,
              mol_ptr: Tensor | None) -> tuple[RaggedView | None, Tensor, Tensor, Tensor]:
    """The real atoms of a fixed ([B, N, 3], features [N, F] or [B, N, F]), padded (with node_mask) or
    ragged (with mol_ptr) batch in ragged layout: (view, x [M, 3], features [M, F], mol_ptr), where
    ``view.scatter`` puts per-atom results back in the input layout (view is None for ragged input)."""
    if mol_ptr is not None:
        return None, x.contiguous(), features, mol_ptr
    n_mol, n_atoms = x.shape[:2]
    view = RaggedView.of(n_mol, n_atoms, node_mask, x.device)
    return (view, view.gather(x).contiguous(), view.gather(features.expand(n_mol, n_atoms, -1)),
            view.mol_ptr)
