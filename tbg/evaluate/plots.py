"""PNG plots of an evaluation (matplotlib's Agg canvas: no display, no global pyplot state).

Every figure has a fixed size in pixels (FIGURE_PIXELS) so that reports are comparable across runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["FIGURE_PIXELS", "effective_counts", "plot_energy_histograms", "plot_ramachandran", "plot_free_energy",
           "plot_log_weights", "plot_method_metrics"]

DPI = 100
FIGURE_PIXELS: dict[str, tuple[int, int]] = {
    "energy_histogram": (700, 450),
    "ramachandran": (1600, 500),
    "free_energy": (700, 450),
    "log_weights": (700, 450),
    "method_metrics": (1600, 500),
}
_COLORS = {"MD": "tab:gray", "model": "tab:blue", "reweighted": "tab:orange"}
_OUTLINE_COLOURS = ("tab:red", "black", "tab:pink", "tab:cyan")


def _figure(kind: str) -> Figure:
    w, h = FIGURE_PIXELS[kind]
    # constrained layout keeps labels and colour bars inside the fixed pixel size
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
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
        size = f"n = {len(e)}" if w is None else f"n = {len(e)}, ESS {w.sum() ** 2 / (w**2).sum():.0f}"
        text = f"{label} ({size}" + (f", {outside} outside the axis)" if outside else ")")
        ax.hist(e, bins=edges, weights=w, density=True, histtype="step", lw=1.5, color=_COLORS.get(label), label=text)
    ax.set_xlabel("reduced energy u(x) [kT]")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def _intervals(lo: float, hi: float) -> list[tuple[float, float]]:
    """An arc [lo, hi) (modulo 2 pi, see tbg.evaluate.metrics.Arc) as intervals inside [-pi, pi]."""
    start = (lo + math.pi) % (2 * math.pi) - math.pi
    stop = start + (hi - lo)
    if stop <= math.pi + 1e-12:
        return [(start, min(stop, math.pi))]
    return [(start, math.pi), (-math.pi, stop - 2 * math.pi)]


def _state_rectangles(arcs: tuple[tuple[str, float, float], ...]) -> list[tuple[float, float, float, float]]:
    """(phi_lo, phi_hi, psi_lo, psi_hi) rectangles covering a state given by phi/psi arcs."""
    ranges = {"phi": [(-math.pi, math.pi)], "psi": [(-math.pi, math.pi)]}
    for name, lo, hi in arcs:
        ranges[name] = _intervals(lo, hi)
    return [(a, b, c, d) for a, b in ranges["phi"] for c, d in ranges["psi"]]


def effective_counts(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None,
                     edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probability per bin, Kish effective number of samples per bin) of a weighted 2-D histogram."""
    w = np.full(len(x), 1.0 / max(len(x), 1)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum()
    p, _, _ = np.histogram2d(x, y, bins=[edges, edges], weights=w / total if total > 0 else w)
    w2, _, _ = np.histogram2d(x, y, bins=[edges, edges], weights=w**2)
    s, _, _ = np.histogram2d(x, y, bins=[edges, edges], weights=w)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_eff = np.where(w2 > 0, s**2 / w2, 0.0)
    return p, n_eff


def plot_ramachandran(path: Path, panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                      *, bins: int = 36, basins: Mapping[str, Any] | None = None, max_kt: float = 10.0,
                      min_effective: float = 5.0) -> Path:
    """Free energy F(phi, psi) = -log p in kT per panel (label -> (phi, psi, weights or None)).

    All panels share one colour scale, 0 (each panel's most probable bin) to ``max_kt`` (higher is drawn
    at the top colour), with one colour bar; empty bins are white. Bins whose probability rests on fewer
    than ``min_effective`` effective samples (Kish, per bin) are drawn faded: their F is not determined by
    the data. ``basins`` (BasinDefinition by key) are outlined on every panel, one colour per definition
    (dashed: basin, dotted: reference state).
    """
    fig = _figure("ramachandran")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    mesh = None
    for ax, (label, (phi, psi, w)) in zip(axes, panels.items()):
        p, n_eff = effective_counts(phi, psi, w, edges)
        with np.errstate(divide="ignore"):
            f = -np.log(p)
        finite = np.isfinite(f)
        if finite.any():
            f = f - f[finite].min()
        shown = np.where(finite, np.minimum(f, max_kt), np.nan)
        thin = (n_eff > 0) & (n_eff < min_effective)
        mesh = ax.pcolormesh(edges, edges, np.where(thin, np.nan, shown).T, cmap="viridis", vmin=0.0, vmax=max_kt)
        ax.pcolormesh(edges, edges, np.where(thin, shown, np.nan).T, cmap="viridis", vmin=0.0, vmax=max_kt,
                      alpha=0.3)
        ess = (w.sum() ** 2 / (w**2).sum()) if w is not None and (w > 0).any() else len(phi)
        ax.set_title(f"{label} (n = {len(phi)}" + (f", ESS {ess:.0f})" if w is not None else ")"), fontsize=10)
        for definition, colour in zip((basins or {}).values(), _OUTLINE_COLOURS):
            if not definition.torsions <= {"phi", "psi"}:
                continue
            for arcs, style in ((definition.basin, "--"), (definition.reference, ":")):
                for a, b, c, d in _state_rectangles(arcs) if arcs else []:
                    ax.add_patch(Rectangle((a, c), b - a, d - c, fill=False, ls=style, lw=1.0, ec=colour))
        ax.set_xlim(-math.pi, math.pi)
        ax.set_ylim(-math.pi, math.pi)
        ax.set_xlabel("phi [rad]")
        ax.set_ylabel("psi [rad]")
        ax.set_aspect("equal")
    if mesh is not None:
        bar = fig.colorbar(mesh, ax=list(axes), shrink=0.85, extend="max")
        bar.set_label(f"F(phi, psi) [kT], panel minimum = 0; faded: < {min_effective:g} effective samples")
    return _save(fig, path)


def plot_free_energy(path: Path, name: str, profiles: dict[str, tuple[np.ndarray, ...]]) -> Path:
    """Free-energy profiles F(theta) [kT]; profiles: label -> (bin centres, F with inf for empty bins) or
    (bin centres, F, standard error of F), drawn as a band of +- one standard error."""
    fig = _figure("free_energy")
    ax = fig.add_subplot()
    for label, (centres, f, *err) in profiles.items():
        f = np.where(np.isfinite(f), f, np.nan)
        line, = ax.plot(centres, f, lw=1.5, color=_COLORS.get(label), label=label)
        if err and err[0] is not None:
            e = np.where(np.isfinite(err[0]), err[0], np.nan)
            ax.fill_between(centres, f - e, f + e, color=line.get_color(), alpha=0.25, lw=0)
    ax.set_xlim(-math.pi, math.pi)
    ax.set_xlabel(f"{name} [rad]")
    ax.set_ylabel(f"F({name}) [kT], minimum = 0")
    ax.legend(title="band: +- 1 standard error" if any(len(v) > 2 for v in profiles.values()) else None)
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
    return _save(fig, path)


_KIND_COLOURS = {"flow": "tab:blue", "IS": "tab:orange", "IS + tail treatment": "tab:olive", "SMC": "tab:green",
                 "MCMC": "tab:purple"}


def plot_method_metrics(path: Path, methods: Mapping[str, Mapping[str, Any]], w2_points: int) -> Path:
    """One panel per metric of every method against MD (report.json "methods"), one horizontal bar per
    method in the same order and colour (by kind) in every panel: energy-W2 [kT], torus-W2 [rad], TICA-W2,
    Ramachandran JSD [bits], and per basin Delta F - MD [kT] with +- one standard error (the zero line is MD).
    Each panel's axis starts at 0 (distances) or is centred on 0 (Delta F - MD); missing values say n/a."""
    names = list(methods)
    basins = list(dict.fromkeys(k for m in methods.values() for k in m["delta_f"]))
    panels: list[tuple[str, list[float | None], list[float | None] | None]] = [
        ("energy-W2 to MD [kT]", [m["energy"]["w2"] for m in methods.values()], None),
        (f"torus-W2 to MD [rad]\n({w2_points} points per set)", [m["torus_w2"] for m in methods.values()], None),
        (f"TICA-W2 to MD [TICA units]\n({w2_points} points per set)", [m["tica_w2"] for m in methods.values()], None),
        ("Ramachandran JSD to MD [bits]\n(0: same histogram, 1: disjoint)",
         [m["ramachandran_jsd"] for m in methods.values()], None)]
    for key in basins:
        diffs = [(m["delta_f"].get(key) or {}).get("minus_md") or {} for m in methods.values()]
        panels.append((f"dF {key} - MD [kT]\n(+- 1 standard error)", [d.get("value") for d in diffs],
                       [d.get("stderr") for d in diffs]))
    fig = _figure("method_metrics")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = np.arange(len(names))
    colours = [_KIND_COLOURS.get(m["kind"], "tab:gray") for m in methods.values()]
    for ax, (label, values, errors) in zip(axes, panels):
        # In memory a metric can be +-inf (a basin MD never visits): no bar, "n/a" like a missing value.
        v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
        known = np.isfinite(v)
        err = None if errors is None else np.array([0.0 if e is None else e for e in errors], dtype=np.float64)
        if err is not None:
            err = np.where(known & np.isfinite(err), err, 0.0)
        ax.barh(y, np.where(known, v, 0.0), xerr=err if err is not None and known.any() else None,
                color=colours, capsize=3)
        reach = np.abs(v[known]) + (err[known] if err is not None else 0.0)
        span = 1.15 * reach.max() if known.any() and reach.max() > 0 else 1.0
        if errors is None:
            ax.set_xlim(0, 1.0 if "JSD" in label else span)
        else:
            ax.set_xlim(-span, span)
            ax.axvline(0.0, color="tab:gray", lw=1.0)
        for k in np.flatnonzero(~np.isfinite(v)):
            ax.text(0.02, y[k], "n/a", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
        ax.set_xlabel(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=9)
    axes[0].invert_yaxis()  # first method on top, as in the summary table
    return _save(fig, path)
