"""PNG plots of an evaluation (matplotlib's Agg canvas: no display, no global pyplot state).

Every figure has a fixed size in pixels (FIGURE_PIXELS) so that reports are comparable across runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

__all__ = ["FIGURE_PIXELS", "plot_energy_histograms", "plot_ramachandran", "plot_free_energy", "plot_log_weights"]

DPI = 100
FIGURE_PIXELS: dict[str, tuple[int, int]] = {
    "energy_histogram": (700, 450),
    "ramachandran": (1500, 480),
    "free_energy": (700, 450),
    "log_weights": (700, 450),
}
_COLORS = {"MD": "tab:gray", "model": "tab:blue", "reweighted": "tab:orange"}


def _figure(kind: str) -> Figure:
    w, h = FIGURE_PIXELS[kind]
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": it would change the pixel size
    return path


def plot_energy_histograms(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray | None]],
                           *, bins: int = 80) -> Path:
    """Density histograms of reduced energies; series: label -> (energies, normalised weights or None).

    The range follows the MD energies (0.1-99.9 percentiles, widened by 50%) when present, so that a
    few high-energy model samples do not squash the plot; how many fall outside is in the legend.
    """
    fig = _figure("energy_histogram")
    ax = fig.add_subplot()
    ref = series.get("MD", next(iter(series.values())))[0]
    lo, hi = np.percentile(ref, [0.1, 99.9])
    pad = 0.5 * max(hi - lo, 1e-6)
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    for label, (e, w) in series.items():
        outside = int(((e < edges[0]) | (e > edges[-1])).sum())
        ax.hist(e, bins=edges, weights=w, density=True, histtype="step", lw=1.5,
                color=_COLORS.get(label), label=f"{label} ({outside} outside)" if outside else label)
    ax.set_xlabel("reduced energy u(x) [kT]")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_ramachandran(path: Path, panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                      *, bins: int = 60) -> Path:
    """One 2D phi/psi histogram (log colour scale) per panel: label -> (phi, psi, weights or None)."""
    fig = _figure("ramachandran")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    for ax, (label, (phi, psi, w)) in zip(axes, panels.items()):
        hist, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=w, density=True)
        positive = hist[hist > 0]
        norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
        ax.pcolormesh(edges, edges, np.where(hist > 0, hist, np.nan).T, norm=norm, cmap="viridis")
        ax.set_title(label)
        ax.set_xlabel("phi [rad]")
        ax.set_ylabel("psi [rad]")
        ax.set_aspect("equal")
    fig.tight_layout()
    return _save(fig, path)


def plot_free_energy(path: Path, name: str, profiles: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Free-energy profiles F(theta) [kT]; profiles: label -> (bin centres, F with inf for empty bins)."""
    fig = _figure("free_energy")
    ax = fig.add_subplot()
    for label, (centres, f) in profiles.items():
        ax.plot(centres, np.where(np.isfinite(f), f, np.nan), lw=1.5, color=_COLORS.get(label), label=label)
    ax.set_xlim(-math.pi, math.pi)
    ax.set_xlabel(f"{name} [rad]")
    ax.set_ylabel(f"F({name}) [kT]")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_log_weights(path: Path, log_w: np.ndarray, *, bins: int = 80) -> Path:
    """Histogram of finite log importance weights, shifted so that the largest is 0."""
    fig = _figure("log_weights")
    ax = fig.add_subplot()
    lw = log_w[np.isfinite(log_w)]
    ax.hist(lw - lw.max(), bins=bins, color="tab:orange")
    ax.set_yscale("log")
    ax.set_xlabel("log w - max log w")
    ax.set_ylabel("count")
    fig.tight_layout()
    return _save(fig, path)
