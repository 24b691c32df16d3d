"""tbg.flow.coupling: the aligned coupling moves x0 within its symmetry orbit, closer to x1, and keeps
the prior as its marginal."""
from __future__ import annotations

import itertools

import pytest
import torch

from tbg.flow.coupling import align_to, couple, interchangeable_groups, random_orthogonal


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-2, keepdim=True)


def test_groups_from_identical_feature_rows() -> None:
    f = torch.eye(6)[[0, 1, 1, 2, 1, 3]]
    assert interchangeable_groups(f) == [[1, 2, 4]]


def test_random_orthogonal_is_haar_like() -> None:
    q = random_orthogonal(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(q @ q.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(q))
    det = torch.linalg.det(q)
    assert abs(float((det > 0).double().mean()) - 0.5) < 0.02  # reflections as often as rotations
    # E[Q] = 0 and E[Q_ij^2] = 1/3 for the Haar measure on O(3)
    assert q.mean(0).abs().max() < 0.02
    torch.testing.assert_close(q.pow(2).mean(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.parametrize("groups", [[], [[1, 2, 3]], [[1, 2, 3], [5, 6]]])
def test_alignment_is_the_best_orbit_member(groups) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = _centred(torch.randn(5, 8, 3, generator=g, dtype=torch.float64))
    x1 = _centred(torch.randn(5, 8, 3, generator=g, dtype=torch.float64))
    out = align_to(x0, x1, groups)
    # a member of the orbit: same pairwise distances up to a relabelling inside the groups ...
    gram = lambda x: torch.cdist(x, x)  # noqa: E731
    best = (out - x1).pow(2).sum((1, 2))
    # ... and no relabelling + orthogonal map found by brute force does better
    perms = [list(range(8))]
    for choice in itertools.product(*[itertools.permutations(gr) for gr in groups]):
        index = list(range(8))
        for gr, p in zip(groups, choice):
            for dst, src in zip(gr, p):
                index[dst] = src
        perms.append(index)
    brute = []
    for index in perms:
        a = x0[:, index]
        u, s, vh = torch.linalg.svd(a.transpose(1, 2) @ x1)
        brute.append((a @ (u @ vh) - x1).pow(2).sum((1, 2)))
    torch.testing.assert_close(best, torch.stack(brute).min(0).values)
    matched = [any(torch.allclose(gram(out[b]), gram(x0[b][index]), atol=1e-9) for index in perms) for b in range(5)]
    assert all(matched)
    assert (best <= (x0 - x1).pow(2).sum((1, 2)) + 1e-12).all()


def test_coupled_prior_keeps_its_distribution() -> None:
    """x0' has the prior's first and second moments, although x1 always has the same shape: the random
    symmetry image of x1 (rotation/reflection, relabelling) is what keeps x0' unbiased."""
    n_atoms, n = 6, 40000
    g = torch.Generator().manual_seed(2)
    shape = _centred(torch.randn(n_atoms, 3, generator=g, dtype=torch.float64)) * 2
    x1 = shape.expand(n, -1, -1).clone()
    x0 = _centred(torch.randn(n, n_atoms, 3, generator=g, dtype=torch.float64))
    a, b = couple(x0, x1, [[1, 2, 3]], generator=g)
    assert (a - b).pow(2).sum((1, 2)).mean() < (x0 - x1).pow(2).sum((1, 2)).mean()  # shorter paths
    flat = a.reshape(n, -1)
    # mean 0 (a biased coupling would lean towards the fixed shape: |mean| of order 1)
    assert flat.mean(0).abs().max() < 4 / n**0.5
    # covariance = projector on the mean-free subspace: (delta_ij - 1/N) per coordinate
    cov = flat.T @ flat / n
    expected = torch.kron(torch.eye(n_atoms, dtype=torch.float64) - 1 / n_atoms, torch.eye(3, dtype=torch.float64))
    assert (cov - expected).abs().max() < 0.04
    # the data side is a symmetry image of the shape: the same pairwise distances up to relabelling
    d = torch.cdist(b, b)
    assert torch.allclose(torch.sort(d.reshape(n, -1), 1).values,
                          torch.sort(torch.cdist(shape, shape).reshape(-1)).values.expand(n, -1), atol=1e-9)


def test_aligned_flow_matching_on_alanine_dipeptide(tmp_path) -> None:
    """The aligned coupling in tbg.flow training: shorter targets on the shipped frames, and a run trains."""
    import tbg
    from tbg.chem.data import PeptideDataset, collate_ragged
    from tbg.flow.coupling import interchangeable_groups as groups_of

    ds = PeptideDataset(tbg.chem.ALANINE_DIPEPTIDE_DIR, encoding="atoms", max_frames=64)
    batch = collate_ragged([ds[i] for i in range(32)])
    groups = groups_of(batch.features[:22])
    assert len(groups) == 3 and all(len(g) == 3 for g in groups)  # the three methyl groups
    egnn = tbg.EGNN(batch.features.shape[1], hidden=8, n_layers=2)

    def target_norm(coupling: str) -> float:
        """|x1 - x0|^2 / 3N: the loss of a zero field."""
        def zero(t, xt, features, mol_ptr, backend):  # noqa: ANN001, ANN202
            return torch.zeros_like(xt)

        g = torch.Generator().manual_seed(0)
        return float(tbg.flow.flow_matching_loss(zero, batch, generator=g, coupling=coupling, sigma=0.0).mean())

    # In model units (nm x 30) the frames are far larger than the unit prior, so |x1 - x0|^2 is mostly
    # |x1|^2 and alignment removes only the cross term: 13% here (23.7 -> 20.6 per coordinate).
    assert target_norm("aligned") < 0.92 * target_norm("independent")
    loader = tbg.flow.RaggedLoader(ds, 16, collate=collate_ragged)
    cfg = tbg.flow.TrainConfig(n_steps=3, checkpoint_every=3, coupling="aligned", progress=False)
    res = tbg.flow.train(egnn, loader, tmp_path, cfg)
    assert res.step == 3 and res.train_loss == res.train_loss
    with pytest.raises(ValueError, match="coupling"):
        tbg.flow.TrainConfig(coupling="ot")
