"""``mdsens plot``: draw a run's PNG figures from its files (no physics)."""

from __future__ import annotations

from typing import Annotated

import typer

from mdsens.errors import UserError

from .console import err, guarded, out
from .options import RunOption, param_option
from .runs import chosen_run

Params = param_option("Sensitivity to draw; repeatable (default: all computed).")


def parse_center(text: str) -> int | tuple[float, ...]:
    """``--center``'s value: an atom index, or coordinates ``x,y,z``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(
            f"--center {text!r} is neither an atom index (e.g. 12) nor coordinates x,y,z (e.g. 1.5,0,2)"
        ) from None


def plot(
    run: RunOption = None,
    param: Params = None,
    center: Annotated[
        str | None,
        typer.Option(
            "--center",
            help="What sensitivity-distance.png measures distances from: an atom index (e.g. 12) or "
            "coordinates x,y,z (e.g. 5.1,5.1,5.1). Default: the run's defect_position if it has one, "
            "else a vacancy found in a crystal, else none and no distance figure.",
            metavar="INDEX|X,Y,Z",
            show_default=False,
        ),
    ] = None,
    slice_width: Annotated[
        float | None,
        typer.Option(
            "--slice",
            help="3-D runs: draw only a slice of this thickness in z, centred on the middle of the "
            "cell (or of the atoms' z range), instead of the x-y projection of all atoms.",
            metavar="WIDTH",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Draw PNG figures of a run: atoms coloured by species with dx*/dθ arrows (x-y projection
    or a z slice in 3-D), a histogram of |dx*/dθ| per species, |dx*/dθ| against the distance
    from an atom, point or defect, and, after `mdsens sensitivity --observable Q --per-particle`,
    the atoms coloured by dQ/d(diameter[i]), the derivative of Q by each particle's own value
    (observable-Q-diameter.png). Reads the run's files; runs no physics."""

    def action():
        from mdsens.plot import plot_run
        from mdsens.run_lock import run_lock

        run_dir, note = chosen_run(run)
        where = None if center is None else parse_center(center)
        with run_lock(run_dir, "plot"):
            figures = plot_run(run_dir, params=param, center=where, slice_width=slice_width)
        if note is not None:
            err.print(note, markup=False)  # stdout lists the figures, one per line
        for path in figures:
            out.print(str(path), markup=False)

    guarded(action)
