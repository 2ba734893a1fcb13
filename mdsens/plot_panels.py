"""Figures with one panel per parameter: the histogram of |dx*/dθ| per species, and |dx*/dθ|
against the distance from a center.

|dx*/dθ| is the vector norm of each particle's dx*/dθ. All panels of a figure share one scale:
logarithmic where the values of some parameter span more than ``LOG_SPAN``, reaching no more than
``LOG_DECADES`` decades below each panel's largest value (smaller values, zeros among them, are
counted in the panel's title instead). A parameter whose dx*/dθ is exactly zero, or below what the
linear solve resolves, gets a panel that says so and draws nothing. Rattlers (dx*/dθ = 0 by
construction) are left out and counted in the legend, which stands outside the panels.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mdsens.plot_centers import Center, distances_from
from mdsens.plot_geometry import RunGeometry

# Values spanning more than this factor get a logarithmic axis.
LOG_SPAN = 100.0
# A logarithmic axis reaches this many decades below the largest value, no lower.
LOG_DECADES = 6
RATTLER_HATCH = "xxxx"
# Characters of a title line per inch of the width it has, so that no title is wider.
CHARACTERS_PER_INCH = 9
# Width of a panel, and the part of it a panel's title may take.
PANEL_INCHES = 4.5
PANEL_TITLE_INCHES = 3.8


def wrap(text: str, inches: float) -> str:
    """``text`` with each line wrapped to fit ``inches`` of width."""
    width = max(int(inches * CHARACTERS_PER_INCH), 20)
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def species_colors(run: RunGeometry) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % cmap.N) for i in range(len(run.species))]


def rattler_handle(count: int, note: str = "") -> Patch:
    return Patch(facecolor="white", edgecolor="black", hatch=RATTLER_HATCH, label=f"rattlers ({count}){note}")


def _norms(run: RunGeometry, param: str) -> np.ndarray:
    return np.linalg.norm(run.sensitivities[param], axis=1)


def _floor(norms: np.ndarray) -> float:
    return float(norms.max()) / 10.0**LOG_DECADES


def logarithmic(run: RunGeometry, params: list[str]) -> bool:
    """Whether the figure of ``params`` gets log axes: the values of a drawn parameter above its
    floor span more than ``LOG_SPAN``."""
    for param in params:
        norms = _norms(run, param)[~run.rattlers]
        if not run.facts[param].drawable or not norms.size or norms.max() == 0:
            continue
        kept = norms[norms >= _floor(norms)]
        if kept.max() > LOG_SPAN * kept.min():
            return True
    return False


def _panels(count: int) -> tuple[Figure, list]:
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(PANEL_INCHES * ncols + 2.0, 3.5 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def _message(ax, text: str) -> None:
    """A panel that says ``text`` instead of drawing data."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center")
    ax.tick_params(which="both", bottom=False, left=False, labelbottom=False, labelleft=False)


def _shown(run: RunGeometry, norms: np.ndarray, log: bool) -> tuple[np.ndarray, str]:
    """Mask of the atoms a panel draws (no rattlers; on a log axis, none below its floor), and
    what its title says about the others."""
    shown = ~run.rattlers
    if not log or not norms[shown].size:
        return shown, ""
    floor = _floor(norms[shown])
    below = shown & (norms < floor)
    if not below.any():
        return shown, ""
    return shown & ~below, f"\n{int(below.sum())} atoms below max/1e{LOG_DECADES} (or 0) not shown"


def _legend(fig: Figure, run: RunGeometry) -> None:
    colors = species_colors(run)
    handles = [
        Patch(facecolor=colors[t], edgecolor="black", label=run.species[t]) for t in np.unique(run.types)
    ]
    if run.rattlers.any():
        handles.append(rattler_handle(int(run.rattlers.sum()), ": dx*/dθ = 0, not shown"))
    # Outside the panels, where it covers no data.
    fig.legend(handles=handles, title="species", loc="outside right upper")


def _panel_atoms(ax, run: RunGeometry, param: str, norms: np.ndarray, log: bool, empty: str):
    """Title a panel and return the mask of the atoms it draws, or ``None`` when it shows a note
    instead (an exactly-zero or unresolved sensitivity, or no atom to draw)."""
    note = run.facts[param].note()
    shown, hidden = _shown(run, norms, log)
    ax.set_title(wrap(f"θ = {param}" + ("" if note else hidden), PANEL_TITLE_INCHES))
    if note or not shown.any():
        _message(ax, note or empty)
        return None
    return shown


def histogram_figure(run: RunGeometry, params: list[str]) -> Figure:
    """Histogram of the per-atom |dx*/dθ| per species (bars side by side), one panel per
    parameter."""
    fig, axes = _panels(len(params))
    log = logarithmic(run, params)
    colors = species_colors(run)
    for ax, param in zip(axes, params, strict=True):
        norms = _norms(run, param)
        ax.set_xlabel(f"|dx*/dθ| ({run.units.sensitivity_label(param)})")
        ax.set_ylabel("atoms")
        ax.set_xscale("log" if log else "linear")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        shown = _panel_atoms(ax, run, param, norms, log, "no atom to count")
        if shown is None:
            continue
        values = norms[shown]
        high = float(values.max())
        if log:
            low = float(values.min())
            bins = np.geomspace(low, high, 31) if high > low else np.geomspace(high / 10, high, 31)
        else:
            bins = np.linspace(0.0, max(high, 1e-300), 31)
        kinds = list(np.unique(run.types))
        ax.hist(
            [norms[shown & (run.types == t)] for t in kinds],
            bins=bins,
            color=[colors[t] for t in kinds],
            histtype="bar",
            label=[run.species[t] for t in kinds],
        )
        ax.set_xlim(bins[0], bins[-1])
    _legend(fig, run)
    return fig


def distance_figure(run: RunGeometry, params: list[str], center: Center) -> Figure:
    """|dx*/dθ| of each atom against its distance from ``center``, one panel per parameter."""
    distances = distances_from(run, center.point)
    fig, axes = _panels(len(params))
    fig.suptitle(wrap(f"|dx*/dθ| against distance from {center.text}", fig.get_figwidth()))
    log = logarithmic(run, params)
    colors = species_colors(run)
    size = float(np.clip(3000 / max(len(distances), 1), 4, 30))
    length = run.units.length_label()
    for ax, param in zip(axes, params, strict=True):
        norms = _norms(run, param)
        ax.set_xlabel(f"distance ({length}" + (", minimum image)" if run.periodic else ")"))
        ax.set_ylabel(f"|dx*/dθ| ({run.units.sensitivity_label(param)})")
        ax.set_yscale("log" if log else "linear")
        shown = _panel_atoms(ax, run, param, norms, log, "no atom to draw")
        if shown is None:
            continue
        for t in np.unique(run.types):
            mine = shown & (run.types == t)
            ax.scatter(distances[mine], norms[mine], s=size, color=colors[t], alpha=0.7, lw=0)
        ax.set_xlim(left=0)
        high = float(norms[shown].max())
        if log:
            floor = high / 10.0**LOG_DECADES
            ax.set_ylim(max(floor, float(norms[shown].min()) / 1.5), high * 1.5)
        else:
            ax.set_ylim(0, high * 1.05 if high > 0 else 1.0)
    _legend(fig, run)
    return fig
