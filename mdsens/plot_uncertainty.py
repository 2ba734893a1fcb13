"""Figures of ``mdsens uncertainty``, drawn from its files alone (no physics is run here).

* ``uncertainty.png``: the relaxed configuration (:func:`mdsens.plot.configuration_figure`; a 3-D
  run as its x-y projection) with each atom's 1-σ ellipse of its positional covariance block
  C_i (the x-y block in 3-D: the covariance of the projected position), first order in black and,
  where the Monte Carlo check ran, its sample covariance in red. The ellipses are magnified by
  one factor, given in the title, so that the largest spans a fixed part of the smallest atom.
  Rattlers are hatched and have no ellipse (their positions are not determined).
* ``uncertainty-samples.png`` (Monte Carlo only): each atom's Monte Carlo σ against its first-order
  σ, with the line y = x and the band of ±3 sampling errors, and the histogram of their ratio.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from matplotlib.collections import EllipseCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mdsens.errors import READ_ERRORS, UserError
from mdsens.plot import configuration_figure
from mdsens.plot_geometry import RunGeometry, select_view
from mdsens.plot_panels import wrap

# The largest ellipse's long semi-axis is drawn this fraction of the smallest drawn atom's diameter.
ELLIPSE_FRACTION = 0.45
# A σ axis spanning more than this factor is drawn logarithmic.
LOG_SPAN = 100.0
# The band drawn about ratio 1, in sampling errors.
BAND = 3.0


def read_uncertainty(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``uncertainty.json`` and the arrays of ``uncertainty.npz`` in ``directory``.

    Raises:
        UserError: a file is missing or unreadable.
    """
    directory = Path(directory)
    try:
        summary = json.loads((directory / "uncertainty.json").read_text())
        with np.load(directory / "uncertainty.npz") as data:
            arrays = {key: data[key] for key in data.files}
    except (*READ_ERRORS, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the uncertainty files in {directory}: {error}") from None
    return summary, arrays


def ellipse_axes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(long, short, angle): the 1-σ semi-axes and the long axis's angle in degrees of the
    ellipses of 2 × 2 covariance ``blocks`` (M, 2, 2)."""
    eigenvalues, vectors = np.linalg.eigh(blocks)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    angle = np.degrees(np.arctan2(vectors[:, 1, 1], vectors[:, 0, 1]))
    return np.sqrt(eigenvalues[:, 1]), np.sqrt(eigenvalues[:, 0]), angle


def ellipse_figure(run: RunGeometry, summary: dict, arrays: dict[str, np.ndarray]) -> Figure:
    """The configuration with each atom's 1-σ positional ellipse (module docstring)."""
    # The rattlers of the uncertainty files, whatever the run's sensitivity files say.
    run = copy.copy(run)
    run.rattlers = np.asarray(arrays["rattlers"], dtype=bool)
    view = select_view(run, None)
    fig = configuration_figure(run, view, None)
    ax = fig.axes[0]
    xy = run.wrapped_xy(run.positions3)
    # (label, blocks, colour, line width): the Monte Carlo ellipses thinner, over the first-order ones.
    sets = [("first order", arrays["covariance"], "black", 2.0)]
    if "mc_covariance" in arrays:
        used = summary["monte_carlo"]["converged"]
        sets.append((f"Monte Carlo ({used} samples)", arrays["mc_covariance"], "red", 0.8))
    drawn = ~run.rattlers & np.all(np.isfinite(arrays["covariance"]), axis=(1, 2))
    long_axes = [ellipse_axes(blocks[drawn][:, :2, :2])[0] for _, blocks, _, _ in sets]
    largest = max((float(a.max()) for a in long_axes if a.size and np.isfinite(a).all()), default=0.0)
    lines = [f"positional uncertainty, N = {len(run.positions)}"]
    if view.text:
        lines.append(f"{view.text}: ellipses of the x-y covariance")
    if len(arrays["parameter_names"]) == 1:
        lines.append("one uncertain parameter: each ellipse is a segment along dx*/dθ")
    length = run.units.length_label()
    sigma_max = summary["positions"]["linear"]["max_sigma"]
    if largest == 0.0 or not drawn.any():
        lines.append("every σ is zero: no ellipses")
    else:
        gain = ELLIPSE_FRACTION * float(view.sizes[drawn].min()) / largest
        lines.append(
            f"1-σ ellipses drawn × {gain:.3g}; largest σ = √tr C_i = {sigma_max:.3g} {length}"
            f" (atom {summary['positions']['linear']['max_sigma_atom']})"
        )
        handles = []
        for label, blocks, color, width in sets:
            ok = drawn & np.all(np.isfinite(blocks), axis=(1, 2))
            long, short, angle = ellipse_axes(blocks[ok][:, :2, :2])
            ax.add_collection(
                EllipseCollection(
                    2 * gain * long,
                    2 * gain * short,
                    angle,
                    units="xy",
                    offsets=xy[ok],
                    offset_transform=ax.transData,
                    facecolors="none",
                    edgecolors=color,
                    linewidths=width,
                    zorder=4,
                )
            )
            handles.append(Line2D([], [], color=color, lw=width, label=label))
        species = ax.get_legend()
        ax.legend(handles=handles, title="1-σ ellipses", loc="lower left", bbox_to_anchor=(1.01, 0.0))
        if species is not None:
            ax.add_artist(species)  # a second legend replaces the first unless kept as an artist
    fig.suptitle(wrap("\n".join(lines), fig.get_figwidth()))
    return fig


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def samples_figure(run: RunGeometry, summary: dict, arrays: dict[str, np.ndarray]) -> Figure:
    """Monte Carlo σ against first-order σ per atom, and the histogram of their ratio."""
    mc = summary["monte_carlo"]
    comparison = summary["positions"]["comparison"]
    nominal, drawn = comparison["nominal"], comparison["drawn"]
    ratio = arrays["sigma_ratio"]
    compared = np.isfinite(ratio)
    linear, sampled = arrays["sigma"][compared], arrays["mc_sigma"][compared]
    error = mc["sampling_error"]
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    scatter, histogram = fig.subplots(1, 2)
    length = run.units.length_label()
    lines = [
        f"Monte Carlo check: {mc['converged']} of {mc['samples']} samples converged, "
        f"{mc['contact_changed_samples']} changed the contact network",
        f"σ_MC / σ_linear over {comparison['atoms_compared']} atoms: median"
        f" {_number(nominal['ratio_p50'])}, 5-95 % {_number(nominal['ratio_p5'])}"
        f" to {_number(nominal['ratio_p95'])}, total RMS {_number(nominal['rms_ratio'])};"
        f" sampling error of one σ ±{_number(error)}",
        f"with the covariance of the δ drawn: median {_number(drawn['ratio_p50'])}, total RMS"
        f" {_number(drawn['rms_ratio'])}",
    ]
    observables = [
        f"{name}: {_number(entry['ratio'])} (drawn {_number(entry['ratio_drawn'])})"
        for name, entry in summary["observables"].items()
    ]
    if observables:
        lines.append("observables σ_MC / σ_linear: " + ", ".join(observables))
    if not compared.any():
        for ax in (scatter, histogram):
            ax.text(0.5, 0.5, "no atom to compare", transform=ax.transAxes, ha="center", va="center")
        fig.suptitle(wrap("\n".join(lines), fig.get_figwidth()))
        return fig
    low, high = float(min(linear.min(), sampled.min())), float(max(linear.max(), sampled.max()))
    log = low > 0 and high > LOG_SPAN * low
    scatter.scatter(linear, sampled, s=10, alpha=0.7, lw=0, color="tab:blue")
    span = np.geomspace(low, high, 50) if log else np.linspace(0.0, high, 50)
    scatter.plot(span, span, color="black", lw=1.0, label="y = x")
    if error is not None:
        for sign in (-1, 1):
            scatter.plot(
                span,
                (1 + sign * BAND * error) * span,
                color="gray",
                lw=0.8,
                ls="--",
                label=f"±{BAND:g} sampling errors" if sign > 0 else None,
            )
    scale = "log" if log else "linear"
    scatter.set_xscale(scale)
    scatter.set_yscale(scale)
    scatter.set_xlabel(f"first-order σ_i ({length})")
    scatter.set_ylabel(f"Monte Carlo σ_i ({length})")
    scatter.set_title("per atom, √tr of the covariance")
    scatter.legend(loc="upper left")
    histogram.hist(ratio[compared], bins=30, color="tab:blue")
    histogram.axvline(1.0, color="black", lw=1.0)
    if error is not None:
        for sign in (-1, 1):
            histogram.axvline(1 + sign * BAND * error, color="gray", lw=0.8, ls="--")
    histogram.set_xlabel("σ_MC,i / σ_linear,i")
    histogram.set_ylabel("atoms")
    histogram.set_title("ratio per atom")
    fig.suptitle(wrap("\n".join(lines), fig.get_figwidth()))
    return fig


def uncertainty_figures(
    run: RunGeometry, summary: dict, arrays: dict[str, np.ndarray]
) -> Iterator[tuple[str, Figure]]:
    """The figures by file name, drawn one at a time: ``uncertainty.png``, and
    ``uncertainty-samples.png`` where the Monte Carlo check ran."""
    yield "uncertainty.png", ellipse_figure(run, summary, arrays)
    if summary.get("monte_carlo") is not None:
        yield "uncertainty-samples.png", samples_figure(run, summary, arrays)
