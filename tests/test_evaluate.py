"""Validity checks and the one-call report of tbg.evaluate, on the shipped alanine dipeptide MD data."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mdtraj as md
import networkx as nx
import numpy as np
import openmm.app as app
import openmm.unit as unit
import pytest

from tbg.chem import ALANINE_DIPEPTIDE_DIR, ALANINE_DIPEPTIDE_TEMPERATURE, EnergyModel, build_peptide, load_trajectory
from tbg.evaluate import (FIGURE_PIXELS, EvaluationOptions, MDFrames, ModelSamples, Molecule, ValidityChecker, bond_pairs,
                          evaluate)
from tbg.evaluate import validity as V
from tbg.flow.reweight import pareto_k


class Ala2:
    """The shipped alanine dipeptide data: topology, reference structure (state0), MD frames, energies."""

    def __init__(self, n_frames: int = 300):
        self.topology, frames = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
        # Every 1 ps frame up to n_frames keeps the tests fast; the checks need no more.
        self.frames = frames[:n_frames].astype(np.float64)
        pdb = app.PDBFile(str(ALANINE_DIPEPTIDE_DIR / "ala2-traj-state0.pdb"))
        self.reference_nm = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
        self.energy_model = EnergyModel(pdb.topology, temperature=ALANINE_DIPEPTIDE_TEMPERATURE)

    def reduced_energy(self, x: np.ndarray) -> np.ndarray:
        return self.energy_model.reduced_energy(x, unit="nm")

    def index(self, residue: str, name: str) -> int:
        return next(a.index for a in self.topology.atoms if a.residue.name == residue and a.name == name)


@pytest.fixture(scope="module")
def ala2() -> Ala2:
    return Ala2()


@pytest.fixture(scope="module")
def checker(ala2) -> ValidityChecker:
    return ValidityChecker(ala2.topology, ala2.reference_nm)


def swapped(x: np.ndarray, *pairs: tuple[int, int]) -> np.ndarray:
    idx = np.arange(x.shape[-2])
    for a, b in pairs:
        idx[a], idx[b] = idx[b], idx[a]
    return x[..., idx, :]


def flip_centre(x: np.ndarray, centre: int, adjacency: np.ndarray, elements: list[str]) -> np.ndarray:
    """Invert one chirality centre: reflect it and its hydrogens through the plane of its three heavy
    neighbours. Distances to those neighbours and to its own hydrogens are unchanged, so the bond graph
    stays the same while the sign of the centre flips."""
    nbrs = np.flatnonzero(adjacency[centre])
    heavy = [a for a in nbrs if elements[a] != "H"][:3]
    hyd = [a for a in nbrs if elements[a] == "H"]
    p0, p1, p2 = x[heavy]
    normal = np.cross(p1 - p0, p2 - p0)
    normal /= np.linalg.norm(normal)
    y = x.copy()
    for a in [centre, *hyd]:
        y[a] = x[a] - 2 * np.dot(x[a] - p0, normal) * normal
    return y


def element_graph(x: np.ndarray, elements: list[str]) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from((k, {"element": e}) for k, e in enumerate(elements))
    g.add_edges_from(bond_pairs(x, elements))
    return g


# ---------------------------------------------------------------------------------------------- validity
def test_md_frames_are_valid(ala2, checker):
    res = checker.check(ala2.frames)
    assert res.rate >= 0.99
    assert not res.mirrored.any()
    assert res.n_graphs_searched == 0  # all on the fast path
    np.testing.assert_array_equal(res.permutation[res.valid], np.arange(22)[None].repeat(res.valid.sum(), 0))
    np.testing.assert_array_equal(res.samples_nm[res.valid], ala2.frames[res.valid])


def test_reference_has_one_chiral_centre(ala2, checker):
    assert checker.chiral_centres.tolist() == [ala2.index("ALA", "CA")]


def test_swapped_heavy_atoms_invalid(ala2, checker):
    x = ala2.frames[0]
    c_ace, n_ala, o_ace = ala2.index("ACE", "C"), ala2.index("ALA", "N"), ala2.index("ACE", "O")
    ca, cb = ala2.index("ALA", "CA"), ala2.index("ALA", "CB")
    samples = np.stack([swapped(x, (c_ace, n_ala)), swapped(x, (o_ace, n_ala)), swapped(x, (ca, n_ala))])
    res = checker.check(samples)
    assert not res.valid.any()
    assert all(r in (V.REASON_GRAPH, V.REASON_HYDROGEN) for r in res.reasons)
    # Swapping two atoms of the SAME element only relabels the molecule: valid, and put back in order.
    res = checker.check(swapped(x, (ca, cb))[None])
    assert res.valid[0] and res.n_graphs_searched == 1
    np.testing.assert_array_equal(res.samples_nm[0], x)


def test_broken_bonds_invalid(ala2, checker):
    x = ala2.frames[0]
    cb = ala2.index("ALA", "CB")
    methyl = [cb, *[ala2.index("ALA", f"HB{k}") for k in (1, 2, 3)]]
    ca = ala2.index("ALA", "CA")
    stretched = x.copy()
    direction = (x[cb] - x[ca]) / np.linalg.norm(x[cb] - x[ca])
    stretched[methyl] += 0.05 * direction  # CA-CB 0.153 -> 0.203 nm > 0.18
    h_far = x.copy()
    h_far[ala2.index("ALA", "HA")] += np.array([0.0, 0.0, 0.08])
    res = checker.check(np.stack([stretched, h_far]))
    assert res.valid.tolist() == [False, False]
    assert res.reasons == [V.REASON_GRAPH, V.REASON_HYDROGEN]


def test_mirrored_sample_is_fixed(ala2, checker):
    x = ala2.frames[:5]
    res = checker.check(-x)
    assert res.valid.all() and res.mirrored.all()
    np.testing.assert_allclose(res.samples_nm, x, atol=0)


def test_single_centre_flip_is_mirror_equivalent(ala2, checker):
    # Ala2 has one centre, so flipping it flips "all" centres: the rule mirrors the sample, and the
    # mirrored sample has the reference chirality. On the minimised structure: in a thermal frame the
    # reflected CA can come within a bond cutoff of another atom, which is a different test.
    x = ala2.reference_nm
    ca = ala2.index("ALA", "CA")
    y = flip_centre(x, ca, checker.reference_adjacency, checker.elements)
    assert set(bond_pairs(y, checker.elements)) == set(bond_pairs(x, checker.elements))
    res = checker.check(y[None])
    assert res.valid[0] and res.mirrored[0]
    np.testing.assert_allclose(res.samples_nm[0], -y)
    signs = checker.centre_signs(res.samples_nm)
    np.testing.assert_array_equal(signs[0], checker.reference_signs)


@pytest.fixture(scope="module")
def dipeptide_ay():
    """Zwitterionic Ala-Tyr: two chirality centres (both CA)."""
    pep = build_peptide("AY")
    return pep, ValidityChecker(pep.mdtraj_topology, pep.positions)


def test_one_flipped_centre_invalid(dipeptide_ay):
    pep, chk = dipeptide_ay
    assert len(chk.chiral_centres) == 2
    x = pep.positions
    one = flip_centre(x, chk.chiral_centres[0], chk.reference_adjacency, chk.elements)
    both = flip_centre(one, chk.chiral_centres[1], chk.reference_adjacency, chk.elements)
    for y in (one, both):
        assert set(bond_pairs(y, chk.elements)) == set(bond_pairs(x, chk.elements))
    res = chk.check(np.stack([x, one, both, -x, -one]))
    assert res.valid.tolist() == [True, False, True, True, False]
    assert res.reasons[1] == res.reasons[4] == V.REASON_CHIRALITY
    assert res.mirrored.tolist() == [False, False, True, True, False]
    np.testing.assert_array_equal(res.samples_nm[3], x)
    np.testing.assert_array_equal(res.samples_nm[1], one)  # invalid samples come back unchanged


def test_methyl_hydrogens_reordered(ala2, checker):
    x = ala2.frames[3]
    ace_h = [ala2.index("ACE", f"H{k}") for k in (1, 2, 3)]
    ala_hb = [ala2.index("ALA", f"HB{k}") for k in (1, 2, 3)]
    nme_h = [ala2.index("NME", f"H{k}") for k in (1, 2, 3)]
    # Hydrogens exchanged between methyl groups: each sits on the "wrong" carbon in the given order.
    sample = swapped(x, (ace_h[0], ala_hb[1]), (ala_hb[2], nme_h[0]))
    res = checker.check(sample[None])
    assert res.valid[0] and not res.mirrored[0]
    np.testing.assert_array_equal(res.samples_nm[0], x)  # hydrogens back in their reference slots
    # A permutation within one methyl group leaves the graph unchanged: nothing to reorder.
    within = swapped(x, (ace_h[0], ace_h[2]))
    res = checker.check(within[None])
    assert res.valid[0] and res.n_graphs_searched == 0
    np.testing.assert_array_equal(res.samples_nm[0], within)


def test_equivalent_heavy_groups_reordered(ala2, checker):
    # Ace and Nme methyl groups exchanged together with their hydrogens; needs the isomorphism search.
    x = ala2.frames[5]
    groups = [("ACE", "CH3", "NME", "C")] + [("ACE", f"H{k}", "NME", f"H{k}") for k in (1, 2, 3)]
    pairs = [(ala2.index(r1, a1), ala2.index(r2, a2)) for r1, a1, r2, a2 in groups]
    sample = swapped(x, *pairs)
    # Ace's methyl binds the carbonyl C, Nme's the amide N, so in the given order the graph differs from
    # the reference; relabelling the two groups restores it.
    res = checker.check(np.stack([sample] * 4))
    assert res.valid.all()
    assert res.n_graphs_searched == 1  # identical graphs are matched once
    np.testing.assert_array_equal(res.samples_nm, np.stack([x] * 4))


def test_random_corruptions_agree_with_networkx(ala2, checker):
    """Oracle: valid-or-chirality-rejected <=> full bond graph isomorphic with elements (networkx)."""
    rng = np.random.default_rng(0)
    elements = checker.elements
    ref_graph = element_graph(ala2.reference_nm, elements)
    hyd = np.flatnonzero(np.array(elements) == "H")
    samples = []
    for k in range(150):
        x = ala2.frames[k % len(ala2.frames)].copy()
        kind = k % 5
        if kind == 0:  # random hydrogen permutation
            p = np.arange(22)
            p[hyd] = rng.permutation(hyd)
            x = x[p]
        elif kind == 1:  # random permutation of all atoms
            x = x[rng.permutation(22)]
        elif kind == 2:  # noise that breaks some bonds
            x = x + rng.normal(0, 0.02, x.shape)
        elif kind == 3:  # swap two random atoms of the same element
            same = [(a, b) for a in range(22) for b in range(a + 1, 22) if elements[a] == elements[b]]
            x = swapped(x, same[rng.integers(len(same))])
        else:
            x = -x[rng.permutation(22)]
        samples.append(x)
    samples = np.stack(samples)
    res = checker.check(samples)
    for s, x in enumerate(samples):
        iso = nx.is_isomorphic(element_graph(x, elements), ref_graph,
                               node_match=lambda a, b: a["element"] == b["element"])
        accepted = res.valid[s] or res.reasons[s] in (V.REASON_CHIRALITY, V.REASON_DEGENERATE)
        assert accepted == iso, (s, res.reasons[s])
        if res.valid[s]:
            # Reordered: the bond graph in reference order IS the reference graph, and the output is a
            # relabelling (+- mirror) of the input.
            assert set(bond_pairs(res.samples_nm[s], elements)) == set(ref_graph.edges)
            sign = -1.0 if res.mirrored[s] else 1.0
            np.testing.assert_array_equal(res.samples_nm[s], sign * x[res.permutation[s]])
            assert [elements[a] for a in res.permutation[s]] == elements
    assert 0 < res.valid.sum() < len(samples)


def test_timeout_counts_invalid(ala2, checker):
    x = ala2.frames[0]
    pairs = [(ala2.index("ACE", "CH3"), ala2.index("NME", "C"))] + [
        (ala2.index("ACE", f"H{k}"), ala2.index("NME", f"H{k}")) for k in (1, 2, 3)]
    res = checker.check(swapped(x, *pairs)[None], timeout_s=1e-9)
    assert not res.valid[0] and res.reasons[0] == V.REASON_TIMEOUT and res.n_timeouts == 1


def test_nonfinite_and_bad_input(ala2, checker):
    x = ala2.frames[:2].copy()
    x[1, 4, 0] = np.nan
    res = checker.check(x)
    assert res.valid.tolist() == [True, False] and res.reasons[1] == V.REASON_NONFINITE
    with pytest.raises(ValueError, match=r"\[n, 22, 3\]"):
        checker.check(x[:, :21])
    with pytest.raises(TypeError):
        checker.check(ala2.frames[:2].astype(np.int64))
    with pytest.raises(ValueError, match="bonds"):
        ValidityChecker(ala2.topology, ala2.reference_nm * 10)  # Angstrom instead of nm
    empty = checker.check(np.zeros((0, 22, 3)))
    assert empty.valid.shape == (0,) and empty.rate == 0.0


# ---------------------------------------------------------------------------------------------- report
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


REPORT_KEYS = {
    "n_samples", "n_valid", "correct_configuration_rate", "n_mirrored", "invalid_reasons",
    "n_graphs_searched", "n_isomorphism_timeouts", "md_n_frames", "md_correct_configuration_rate",
    "ess", "n_nonfinite", "energy", "torsions", "free_energy", "delta_f", "methods", "metrics", "plots", "timings_s",
}
NESTED_KEYS = {
    "ess": {"kish_fraction", "kish_n", "n_weighted", "log_weight_std", "largest_weight", "pareto_k"},
    "energy": {"md_mean", "model_mean", "reweighted_mean", "reweighted_stderr", "model_n_nonfinite",
               "wasserstein_model", "wasserstein_reweighted"},
    "n_nonfinite": {"dlogp", "prior_energy", "energy"},
    "delta_f": {"alphaR_beta", "alphaL_rest"},
    "free_energy": {"bins", "phi", "psi"},
    "torsions": {"phi", "psi"},
}


def test_report(ala2, tmp_path):
    rng = np.random.default_rng(3)
    frames = ala2.frames
    samples = frames[rng.integers(0, len(frames), 80)] + rng.normal(0, 0.002, (80, 22, 3))
    samples[:10] *= -1  # mirrored: fixed by the checker
    samples[10:15] = swapped(samples[10:15], (ala2.index("ACE", "C"), ala2.index("ALA", "N")))  # invalid
    prior_energy = rng.normal(30, 1, 80)
    dlogp = rng.normal(0, 1, 80)
    report, table = evaluate(ModelSamples(samples, prior_energy=prior_energy, dlogp=dlogp),
                             Molecule(ala2.topology, ala2.reference_nm, ala2.reduced_energy), MDFrames(frames),
                             tmp_path, EvaluationOptions(clip_quantiles=(0.99,), energy_cutoffs=(20.0,),
                                                                n_bootstrap=20))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert set(report) == REPORT_KEYS
    for key, sub in NESTED_KEYS.items():
        assert set(report[key]) == sub, key
    for name in ("phi", "psi"):
        assert set(report["torsions"][name]) == {"atoms", "wasserstein_model", "wasserstein_reweighted"}
        assert set(report["free_energy"][name]) == {"MD", "model", "reweighted"}
        assert len(report["free_energy"][name]["model"]) == len(report["free_energy"]["bins"]) == 60
    assert report["n_samples"] == 80 and report["n_valid"] == 75 and report["n_mirrored"] == 10
    assert report["correct_configuration_rate"] == pytest.approx(75 / 80)
    assert report["md_correct_configuration_rate"] == 1.0
    # log w = -u + prior_energy + dlogp on the valid (reordered, mirrored back) samples.
    valid = np.ones(80, bool)
    valid[10:15] = False
    fixed = samples[valid].copy()
    fixed[:10] *= -1
    u = ala2.reduced_energy(fixed)
    lw = -u + prior_energy[valid] + dlogp[valid]
    w = np.exp(lw - lw.max())
    # OpenMM's CPU platform sums forces/energies in an order that varies between calls: ~1e-9 relative.
    assert report["ess"]["kish_fraction"] == pytest.approx(w.sum() ** 2 / (len(w) * (w**2).sum()), rel=1e-5)
    assert report["ess"]["log_weight_std"] == pytest.approx(lw.std(ddof=1), rel=1e-5)
    assert report["ess"]["largest_weight"] == pytest.approx(w.max() / w.sum(), rel=1e-5)
    assert report["ess"]["pareto_k"] == pytest.approx(pareto_k(lw), rel=1e-5)
    assert report["energy"]["model_mean"] == pytest.approx(u.mean(), rel=1e-6)
    assert report["energy"]["md_mean"] == pytest.approx(ala2.reduced_energy(frames).mean(), rel=1e-6)
    for key, entry in report["delta_f"].items():
        assert set(entry) == {"definition", "md_block_frames", "MD", "model", "reweighted"}, key
        assert {"label", "basin", "reference", "basin_text", "reference_text", "formula"} <= set(entry["definition"])
        for label in ("model", "reweighted"):
            e = entry[label]
            assert set(e) == {"value", "stderr", "p_basin", "n_basin", "n_reference", "minus_md"}
            if e["value"] is not None and entry["MD"]["value"] is not None:
                assert e["minus_md"]["value"] == pytest.approx(e["value"] - entry["MD"]["value"], rel=1e-12)
                if entry["MD"]["stderr"] is None:
                    assert e["minus_md"]["stderr"] is None
                else:
                    assert e["minus_md"]["stderr"] == pytest.approx(math.hypot(e["stderr"], entry["MD"]["stderr"]))
    traj = md.Trajectory(frames, ala2.topology)
    phi_md = md.compute_phi(traj)[1][:, 0]
    psi_md = md.compute_psi(traj)[1][:, 0]
    alpha_l = report["delta_f"]["alphaL_rest"]["MD"]
    p_md = np.mean((phi_md > 0) & (phi_md < 2))
    assert alpha_l["p_basin"] == pytest.approx(p_md, abs=1e-12)
    if 0 < p_md < 1:
        assert alpha_l["value"] == pytest.approx(-math.log(p_md / (1 - p_md)), rel=1e-9)
    else:
        assert alpha_l["value"] is None
    # alpha_R (-1.7 <= psi < 1.5) vs beta/PII (the rest of psi), both outside the alpha_L phi range: the
    # shipped MD visits both, so its Delta F is finite.
    left = (phi_md < 0) | (phi_md >= 2)
    n_alpha_r = np.sum(left & (psi_md >= -1.7) & (psi_md < 1.5))
    n_beta = np.sum(left & ((psi_md >= 1.5) | (psi_md < -1.7)))
    alpha_r = report["delta_f"]["alphaR_beta"]
    assert (alpha_r["MD"]["n_basin"], alpha_r["MD"]["n_reference"]) == (n_alpha_r, n_beta)
    assert alpha_r["MD"]["value"] == pytest.approx(-math.log(n_alpha_r / n_beta), rel=1e-9)
    # The first 300 ps change state rarely: blocks of correlated frames too long for an error bar.
    if len(frames) >= 8 * alpha_r["md_block_frames"]:
        assert alpha_r["MD"]["stderr"] > 0
    else:
        assert alpha_r["MD"]["stderr"] is None and alpha_r["model"]["minus_md"]["stderr"] is None
    assert "alpha_R vs beta/PII" in table and "minus MD" in table
    for stat in ("wasserstein_model", "wasserstein_reweighted"):
        assert report["energy"][stat] > 0
        assert 0 <= report["torsions"]["phi"][stat] <= math.pi
    assert set(report["plots"]) == {"energy_histogram", "ramachandran", "free_energy_phi", "free_energy_psi",
                                    "log_weights", "method_metrics"}
    for name, file in report["plots"].items():
        path = tmp_path / file
        assert path.stat().st_size > 1000
        kind = "free_energy" if name.startswith("free_energy") else name
        assert png_size(path) == FIGURE_PIXELS[kind]
    assert "correct configurations" in table and "ESS" in table


def test_report_delta_f_against_thinned_md(ala2, tmp_path):
    """The CLI thins the whole 3 ns evenly: enough state changes for a block-bootstrap MD error, so model -
    MD carries both errors; the MD error exceeds the i.i.d. one (correlated frames)."""
    _, frames = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
    md_x = frames[::10].astype(np.float64)
    report, table = evaluate(ModelSamples(ala2.frames[:60]), Molecule(ala2.topology, ala2.reference_nm),
                             MDFrames(md_x), tmp_path, EvaluationOptions(n_bootstrap=50))
    entry = report["delta_f"]["alphaR_beta"]
    md_e, model = entry["MD"], entry["model"]
    assert md_e["n_basin"] + md_e["n_reference"] == len(md_x)
    assert len(md_x) >= 8 * entry["md_block_frames"] > 8
    n_a, n_b = md_e["n_basin"], md_e["n_reference"]
    se_iid = math.sqrt(1 / n_a + 1 / n_b)  # delta method for log(n_a / n_b) of independent frames
    assert md_e["stderr"] > 1.5 * se_iid
    assert model["minus_md"]["value"] == pytest.approx(model["value"] - md_e["value"], rel=1e-12)
    assert model["minus_md"]["stderr"] == pytest.approx(math.hypot(model["stderr"], md_e["stderr"]), rel=1e-12)
    assert entry["reweighted"] is None  # no weights given
    assert f"{md_e['value']:.2f} +- {md_e['stderr']:.2f}" in table


def test_report_uniform_weights_and_no_energy(ala2, tmp_path):
    samples = ala2.frames[:40]
    report, _ = evaluate(ModelSamples(samples, log_weights=np.zeros(40)), Molecule(ala2.topology, ala2.reference_nm),
                         MDFrames(ala2.frames), tmp_path, EvaluationOptions(n_bootstrap=10))
    assert report["ess"]["kish_fraction"] == pytest.approx(1.0)
    assert report["ess"]["log_weight_std"] == 0.0 and report["ess"]["largest_weight"] == pytest.approx(1 / 40)
    assert all(v is None for k, v in report["energy"].items())
    assert "energy_histogram" not in report["plots"]
    # Equal weights: reweighted statistics equal the unweighted ones.
    for name in ("phi", "psi"):
        fe = report["free_energy"][name]
        assert fe["reweighted"] == fe["model"]
    for entry in report["delta_f"].values():
        assert entry["reweighted"] == entry["model"]
    assert report["torsions"]["phi"]["wasserstein_reweighted"] == pytest.approx(
        report["torsions"]["phi"]["wasserstein_model"], rel=1e-9)
    with pytest.raises(ValueError, match="together"):
        ModelSamples(samples, prior_energy=np.zeros(40))
    with pytest.raises(ValueError, match="need energy_fn"):
        evaluate(ModelSamples(samples, prior_energy=np.zeros(40), dlogp=np.zeros(40)),
                 Molecule(ala2.topology, ala2.reference_nm), MDFrames(ala2.frames), tmp_path)
    with pytest.raises(ValueError, match="one per sample"):
        ModelSamples(samples, log_weights=np.zeros(39))
