"""The methods side by side in a report (tbg.evaluate.methods via tbg.evaluate.evaluate): plain IS beside each
tail treatment and refined samples, the field's metrics, on cases with known answers (the MD frames
themselves as samples: every distance 0, every Delta F equal to MD's)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import openmm.app as app
import openmm.unit as unit
import pytest

from tbg.chem import ALANINE_DIPEPTIDE_DIR, ALANINE_DIPEPTIDE_TEMPERATURE, EnergyModel, load_trajectory
from tbg.evaluate import EvaluationOptions, MDFrames, ModelSamples, Molecule, evaluate
from tbg.evaluate.methods import MethodSamples
from tbg.flow.reweight import clip_log_weights, kish_ess, weighted_mean

N_FRAMES = 120


@pytest.fixture(scope="module")
def ala2() -> tuple[Molecule, np.ndarray, np.ndarray]:
    """(the molecule with its energy, MD frames [120, 22, 3] nm every 25 ps of the shipped run, their u)."""
    topology, frames = load_trajectory(ALANINE_DIPEPTIDE_DIR, "ala2")
    pdb = app.PDBFile(str(ALANINE_DIPEPTIDE_DIR / "ala2-traj-state0.pdb"))
    energy = EnergyModel(pdb.topology, temperature=ALANINE_DIPEPTIDE_TEMPERATURE, platform="Reference")
    molecule = Molecule(topology, np.asarray(pdb.positions.value_in_unit(unit.nanometer)),
                        lambda x: energy.reduced_energy(x, unit="nm"))
    md = frames[:: len(frames) // N_FRAMES][:N_FRAMES].astype(np.float64)
    return molecule, md, molecule.energy_fn(md)


def test_md_frames_as_samples_score_zero(ala2, tmp_path) -> None:
    """Samples identical to the MD frames (equal weights, and mirrored: the check turns them back): every
    method's distances are exactly 0 (point-set W2 is exact for equal sets of <= w2_points points; equal
    weights resample to one copy each), its Delta F equals MD's; the treatments change nothing here except
    the energy cutoff, which drops exactly the frames above MD mean + 2 kT."""
    molecule, md, u = ala2
    n = len(md)
    options = EvaluationOptions(clip_quantiles=(0.9,), energy_cutoffs=(1000.0, 2.0), n_bootstrap=20, w2_points=n)
    refined = [MethodSamples("SMC test", "SMC", -md, log_w=np.zeros(n), info={"unique_ancestors": n})]
    report, table = evaluate(ModelSamples(md, log_weights=np.zeros(n)), molecule, MDFrames(md), tmp_path, options,
                             refined=refined)
    methods = report["methods"]
    assert list(methods) == ["model", "IS", "IS clip q=0.9", "IS u<=MD+1000kT", "IS u<=MD+2kT", "SMC test"]
    assert [m["kind"] for m in methods.values()] == ["flow", "IS", *["IS + tail treatment"] * 3, "SMC"]
    md_df = {k: e["MD"] for k, e in report["delta_f"].items()}
    for name in ("model", "IS", "IS clip q=0.9", "IS u<=MD+1000kT", "SMC test"):
        m = methods[name]
        assert m["n"] == n and m["n_positive"] == n, name
        # 0 up to the rounding of cumulative weights (1-D distances) and of the mirrored positions (TICA).
        for value in (m["energy"]["w1"], m["energy"]["w2"], m["torus_w2"], m["tica_w2"], m["ramachandran_jsd"],
                      *m["torsion_w1"].values()):
            assert value == pytest.approx(0.0, abs=1e-9), name
        assert set(m["torsion_w1"]) == {"phi", "psi"}
        assert m["energy"]["mean"] == pytest.approx(u.mean(), rel=1e-9), name
        for key, entry in m["delta_f"].items():
            if md_df[key]["value"] is None:
                assert entry["value"] is None, (name, key)
            else:
                assert entry["value"] == pytest.approx(md_df[key]["value"], rel=1e-12), (name, key)
                assert entry["minus_md"]["value"] == pytest.approx(0.0, abs=1e-12)
    assert methods["model"]["ess"] is None  # the flow's own samples carry no weights
    assert methods["IS"]["ess"] == {"kind": "Kish", "fraction": 1.0, "effective_samples": n}
    assert methods["SMC test"]["correct_configuration_rate"] == 1.0 and methods["SMC test"]["n_samples"] == n
    # The energy cutoff 2 kT above the MD mean keeps exactly the frames at or below it.
    cut = methods["IS u<=MD+2kT"]
    kept = u <= u.mean() + 2.0
    assert cut["n_positive"] == kept.sum() < n
    assert cut["energy_cutoff_u"] == pytest.approx(u.mean() + 2.0, rel=1e-12)
    assert cut["ess"]["fraction"] == pytest.approx(kept.mean(), rel=1e-12)
    assert cut["energy"]["mean"] == pytest.approx(u[kept].mean(), rel=1e-9)
    assert cut["energy"]["w2"] > 0
    # The legacy entries are plain IS.
    assert report["energy"]["reweighted_mean"] == methods["IS"]["energy"]["mean"]
    # Every method and MD in the table, plot on disk.
    for name in methods:
        assert re.search(rf"^{re.escape(name)}\s", table, re.MULTILINE), name
    assert re.search(r"^MD\s", table, re.MULTILINE)
    assert (tmp_path / report["plots"]["method_metrics"]).stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["methods"] == methods


def test_treatments_and_refined_weights_on_known_weights(ala2, tmp_path) -> None:
    """Unequal weights: each row is the weighted estimate of its own weights (IS: the given ones; clip: at the
    quantile; SMC: its weights over its valid particles, an invalid particle dropped); MCMC brings its own
    ESS and bootstrap blocks; the treated rows never replace the plain one."""
    molecule, md, u = ala2
    n = len(md)
    rng = np.random.default_rng(0)
    log_w = rng.normal(0.0, 2.0, n)
    broken = md.copy()
    broken[0, [0, 1]] = broken[0, [1, 0]]  # two bonded atoms swapped: an invalid configuration
    smc_w = rng.normal(0.0, 1.0, n)
    mcmc_ess = {"kind": "autocorrelation", "fraction": 0.25, "effective_samples": n / 4}
    refined = [MethodSamples("SMC", "SMC", broken, log_w=smc_w),
               MethodSamples("MCMC", "MCMC", md[::-1].copy(), ess=mcmc_ess, bootstrap_block=4)]
    report, table = evaluate(ModelSamples(md, log_weights=log_w), molecule, MDFrames(md), tmp_path,
                             EvaluationOptions(clip_quantiles=(0.9,), n_bootstrap=20, w2_points=60), refined=refined)
    methods = report["methods"]
    assert list(methods) == ["model", "IS", "IS clip q=0.9", "SMC", "MCMC"]
    clipped = clip_log_weights(log_w, 0.9).numpy()
    for name, lw in (("IS", log_w), ("IS clip q=0.9", clipped)):
        assert methods[name]["ess"]["fraction"] == pytest.approx(kish_ess(lw), rel=1e-12)
        assert methods[name]["energy"]["mean"] == pytest.approx(weighted_mean(u, lw)[0], rel=1e-9)
    assert methods["IS clip q=0.9"]["ess"]["fraction"] > methods["IS"]["ess"]["fraction"]
    smc = methods["SMC"]
    assert smc["n_samples"] == n and smc["n"] == n - 1 and smc["correct_configuration_rate"] == pytest.approx(1 - 1 / n)
    assert smc["ess"]["fraction"] == pytest.approx(kish_ess(smc_w[1:]), rel=1e-12)
    assert smc["energy"]["mean"] == pytest.approx(weighted_mean(u[1:], smc_w[1:])[0], rel=1e-9)
    mcmc = methods["MCMC"]
    assert mcmc["ess"] == mcmc_ess and mcmc["ramachandran_jsd"] == 0.0
    assert mcmc["energy"]["w2"] == pytest.approx(0.0, abs=1e-9)
    assert "ESS" in table and "25%" in table
    for m in methods.values():  # differences to MD are differences to MD's value
        for key, entry in m["delta_f"].items():
            if entry["minus_md"]["value"] is not None:
                assert entry["minus_md"]["value"] == pytest.approx(
                    entry["value"] - report["delta_f"][key]["MD"]["value"], rel=1e-12)
    with pytest.raises(ValueError, match="clip quantiles"):
        EvaluationOptions(clip_quantiles=(1.5,))
    with pytest.raises(ValueError, match="energy cutoffs"):
        EvaluationOptions(energy_cutoffs=(math.inf,))
