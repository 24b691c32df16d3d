"""The reference EGNN: the specification in docs/model.md, symmetries, and one semantics across layouts."""
from __future__ import annotations

import pytest
import torch

import tbg
from tbg.nn.layout import mol_ptr_from_sizes, ragged_edges
from conftest import random_egnn
from spec import spec_velocity

F64 = dict(rtol=1e-10, atol=1e-10)


def random_orthogonal(dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=dtype))
    return q


@pytest.mark.parametrize("n_atoms", [1, 2, 5, 22])
def test_reference_matches_specification(n_atoms: int) -> None:
    model = random_egnn(4, 16, 3)
    x, f, t = torch.randn(3, n_atoms, 3, dtype=torch.float64) * 2, torch.randn(n_atoms, 4, dtype=torch.float64), 0.37
    v = model(t, x, f, backend="reference")
    state = model.state_dict()
    for b in range(3):
        torch.testing.assert_close(v[b], spec_velocity(state, 3, f, t, x[b]), **F64)


def test_equivariance_rotation_reflection_translation() -> None:
    model = random_egnn(5, 24, 4, dtype=torch.float32)
    x, f, t = torch.randn(6, 13, 3), torch.randn(13, 5), torch.rand(6)
    v = model(t, x, f, backend="reference")
    for _ in range(3):
        q = random_orthogonal(torch.float32)
        if torch.rand(()) < 0.5:
            q = q * torch.tensor([1.0, 1.0, -1.0])  # include reflections
        shift = torch.randn(6, 1, 3) * 5
        v_moved = model(t, x @ q.T + shift, f, backend="reference")
        # fp32: errors relative to the field's magnitude (random weights make |v| ~ 20).
        torch.testing.assert_close(v_moved, v @ q.T, rtol=1e-5, atol=1e-5 * v.abs().max().item())


def test_permutation_of_identically_encoded_atoms() -> None:
    model = random_egnn(3, 16, 3, dtype=torch.float32)
    f = torch.randn(3, 3)[torch.tensor([0, 1, 1, 2, 1, 0, 2, 2])]  # classes with several members
    x, t = torch.randn(4, 8, 3), torch.rand(4)
    perm = torch.tensor([5, 4, 1, 7, 2, 0, 3, 6])  # maps atoms onto atoms of the same class
    assert torch.equal(f[perm], f)
    torch.testing.assert_close(model(t, x[:, perm], f, backend="reference"),
                               model(t, x, f, backend="reference")[:, perm], rtol=1e-5, atol=1e-5)


def test_layouts_agree() -> None:
    model = random_egnn(4, 16, 3)
    sizes = [5, 1, 9, 2, 7]
    mols = [torch.randn(n, 3, dtype=torch.float64) for n in sizes]
    feats = [torch.randn(n, 4, dtype=torch.float64) for n in sizes]
    t = torch.rand(len(sizes), dtype=torch.float64)
    per_molecule = [model(t[b:b + 1], mols[b][None], feats[b], backend="reference")[0] for b in range(len(sizes))]

    ragged = model(t, torch.cat(mols), torch.cat(feats), mol_ptr=mol_ptr_from_sizes(sizes), backend="reference")
    torch.testing.assert_close(ragged, torch.cat(per_molecule), **F64)

    # Padded to 11 atoms with the real atoms scattered among the padding (not only at the end).
    n_max = 11
    x_pad = torch.randn(len(sizes), n_max, 3, dtype=torch.float64) * 100  # garbage in padding
    f_pad = torch.randn(len(sizes), n_max, 4, dtype=torch.float64)
    mask = torch.zeros(len(sizes), n_max)
    slots = []
    for b, n in enumerate(sizes):
        idx = torch.randperm(n_max)[:n].sort().values
        slots.append(idx)
        mask[b, idx] = 1
        x_pad[b, idx], f_pad[b, idx] = mols[b], feats[b]
    padded = model(t, x_pad, f_pad, node_mask=mask, backend="reference")
    for b in range(len(sizes)):
        torch.testing.assert_close(padded[b, slots[b]], per_molecule[b], **F64)
        assert torch.all(padded[b][mask[b] == 0] == 0)


def test_fully_masked_molecule_and_empty_batch() -> None:
    model = random_egnn(2, 8, 2)
    x, f = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]])
    v = model(0.5, x, f, node_mask=mask, backend="reference")
    assert torch.all(v[1] == 0) and torch.isfinite(v).all()
    empty = model(torch.zeros(0), torch.zeros(0, 4, 3, dtype=torch.float64), f[0], backend="reference")
    assert empty.shape == (0, 4, 3)


def test_ragged_edges_are_all_ordered_pairs_within_molecules() -> None:
    row, col = ragged_edges(mol_ptr_from_sizes([3, 1, 2]))
    pairs = set(zip(row.tolist(), col.tolist()))
    expected = {(i, j) for i in range(3) for j in range(3) if i != j} | {(4, 5), (5, 4)}
    assert pairs == expected and len(pairs) == row.numel()


@pytest.mark.parametrize("bad, match", [
    (lambda x, f: (x.float(), f), "features"),
    (lambda x, f: (x.clone().index_fill_(1, torch.tensor([2]), float("nan")), f), "NaN"),
    (lambda x, f: (x[..., :2], f), r"\[B, N, 3\]"),
    (lambda x, f: (x, f[:, :3]), "n_features"),
    (lambda x, f: (x, f[:5]), r"\[N, F\]"),
])
def test_bad_inputs_raise(bad, match) -> None:
    model = random_egnn(4, 8, 2)
    x, f = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        model(0.1, *bad(x, f), backend="reference")


def test_bad_mol_ptr_raises() -> None:
    model = random_egnn(4, 8, 2)
    x, f = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="decrease"):
        model(torch.zeros(3), x, f, mol_ptr=torch.tensor([0, 4, 2, 6]), backend="reference")
    with pytest.raises(ValueError, match="end at"):
        model(torch.zeros(2), x, f, mol_ptr=torch.tensor([0, 4, 5]), backend="reference")


def test_bound_dynamics_shapes() -> None:
    model = random_egnn(4, 8, 2)
    f = torch.randn(6, 4, dtype=torch.float64)
    dyn = tbg.BoundDynamics(model, f, backend="reference")
    x = torch.randn(3, 18, dtype=torch.float64)
    v = dyn(torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)[:, None], x)
    assert v.shape == x.shape
    torch.testing.assert_close(v.view(3, 6, 3), dyn(torch.tensor([0.2, 0.3, 0.4]).double(), x.view(3, 6, 3)))
    with pytest.raises(ValueError, match="for this molecule"):
        dyn(0.1, torch.randn(3, 17, dtype=torch.float64))
