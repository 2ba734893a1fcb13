"""``mdsens paper``: reproduce the seed paper's experiment (implicit vs unrolled vs finite differences)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .console import err, guarded, out
from .options import out_option

# A scratch folder (ignored by git): the committed results/paper is replaced only when asked for
# by name, `--out results/paper`.
DEFAULT_OUT = Path("results/paper-run")

FiguresOut = out_option(
    Path,
    "Directory for the figures and numbers (its previous files are replaced). "
    "`--out results/paper` regenerates the committed results.",
    show_default=True,
    metavar="DIR",
)


def paper(
    out_dir: FiguresOut = DEFAULT_OUT,
    quick: Annotated[
        bool, typer.Option("--quick", help="A fast smoke version: fewer unroll lengths and steps h.")
    ] = False,
) -> None:
    """Reproduce the seed paper's experiment from nothing (Blondel et al. 2022, molecular dynamics).

    On the 128-particle packing at φ = 0.98, θ = diameter of species B: the configuration with
    dx*/dθ arrows; the error of autodiff through the unrolled FIRE minimiser against the number of
    steps, next to the implicit result; wall time and peak memory of implicit, unrolled and finite
    differences. Writes PNG, CSV and JSON into --out (about a minute on two cores) and prints it.
    """

    def action():
        from mdsens.experiments.paper import run_paper

        with err.status("running the paper's experiment") as status:
            run_paper(out_dir, quick=quick, progress=lambda message: status.update(escape(message)))
        out.print(str(out_dir), markup=False)

    guarded(action)
