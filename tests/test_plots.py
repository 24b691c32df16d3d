"""tbg.evaluate.plots: the numbers behind the figures (per-bin effective counts, basin outlines) and the
figures' fixed pixel sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from tbg.evaluate import FIGURE_PIXELS, RAMACHANDRAN_BASINS
from tbg.evaluate import plots


def test_effective_counts_per_bin() -> None:
    edges = np.linspace(-math.pi, math.pi, 3)  # two bins per axis, split at 0
    x = np.array([-1.0, -1.0, -1.0, 1.0])
    y = np.array([-1.0, -1.0, -1.0, 1.0])
    p, n_eff = plots.effective_counts(x, y, None, edges)
    np.testing.assert_allclose(p, [[0.75, 0], [0, 0.25]])
    np.testing.assert_allclose(n_eff, [[3, 0], [0, 1]])
    w = np.array([1.0, 1.0, 2.0, 4.0])
    p, n_eff = plots.effective_counts(x, y, w, edges)
    np.testing.assert_allclose(p, [[0.5, 0], [0, 0.5]])
    np.testing.assert_allclose(n_eff[0, 0], 16 / 6)  # (1 + 1 + 2)^2 / (1 + 1 + 4)


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (-1.7, 1.5, [(-1.7, 1.5)]),
    (1.5, 2 * math.pi - 1.7, [(1.5, math.pi), (-math.pi, -1.7)]),  # across the +-pi seam
    (2.0, 2 * math.pi, [(2.0, math.pi), (-math.pi, 0.0)]),
])
def test_arcs_become_intervals(lo, hi, expected) -> None:
    np.testing.assert_allclose(plots._intervals(lo, hi), expected, atol=1e-12)


def test_ramachandran_figure(tmp_path) -> None:
    rng = np.random.default_rng(0)
    phi, psi = rng.vonmises(-1.4, 3, 500), rng.vonmises(2.6, 4, 500)
    w = rng.random(500)
    path = plots.plot_ramachandran(tmp_path / "r.png", {"MD": (phi, psi, None), "reweighted": (phi, psi, w / w.sum())},
                                   basins=RAMACHANDRAN_BASINS)
    h, w_px = imread(path).shape[:2]
    assert (w_px, h) == FIGURE_PIXELS["ramachandran"]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_method_metrics_with_infinite_entries(tmp_path) -> None:
    """A basin MD never visits gives dF - MD = -inf (stderr nan) in memory: no bar, no overflow, n/a."""
    def method(kind: str, jsd: float | None, alpha_r: float) -> dict:
        return {"kind": kind, "energy": {"w2": 3.0}, "torus_w2": 0.4, "tica_w2": None, "ramachandran_jsd": jsd,
                "delta_f": {"alphaR_beta": {"minus_md": {"value": alpha_r, "stderr": 0.3}},
                            "alphaL_rest": {"minus_md": {"value": -math.inf, "stderr": math.nan}}}}
    methods = {"model": method("flow", 0.6, -0.2), "IS": method("IS", None, 1.1)}
    path = plots.plot_method_metrics(tmp_path / "m.png", methods, 100)
    h, w_px = imread(path).shape[:2]
    assert (w_px, h) == FIGURE_PIXELS["method_metrics"]
