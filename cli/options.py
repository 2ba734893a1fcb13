"""The options several commands share, each defined once as an annotated type.

Every option that takes a value names it with a metavar (``--run DIR``, ``--set KEY=VALUE``): help
shows that name, never the Python type behind it.

Options whose wording differs by command (what ``--param`` selects, what ``--out`` writes) are
built by a function that takes that wording; everything else about them is fixed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

RunOption = Annotated[
    Path | None,
    typer.Option(
        "--run",
        metavar="DIR",
        help="Run directory written by `mdsens relax` (default: the latest run under results/).",
        show_default=False,
    ),
]

# --- which system to build: the recipe, or a structure file with a potential, and overrides ----

SystemOption = Annotated[
    str | None,
    typer.Option(
        "--system",
        "-s",
        metavar="NAME|FILE",
        help="Shipped recipe name (see `mdsens systems`) or path to a recipe .toml, "
        "e.g. a previous run's RUN/system.toml to reproduce it. Default: binary-packing, "
        "or none with --structure.",
        show_default=False,
    ),
]

StructureOption = Annotated[
    Path | None,
    typer.Option(
        "--structure",
        metavar="FILE",
        help="Structure file in any format ase.io.read reads (extxyz, xyz, CIF, POSCAR, "
        "LAMMPS data, ...): positions, cell, periodicity and species come from it. Give the "
        "potential with --potential and its parameters with --set, e.g. "
        "--set potential.sigma=3.4 --set species.Ar.epsilon=0.0104.",
        show_default=False,
    ),
]

IndexOption = Annotated[
    int | None,
    typer.Option(
        "--index",
        metavar="N",
        help="Frame of a multi-frame structure file (default: the last).",
        show_default=False,
    ),
]

PotentialOption = Annotated[
    str | None,
    typer.Option(
        "--potential",
        metavar="NAME",
        help="Potential: soft_sphere, lennard_jones or morse (see docs/potentials.md).",
        show_default=False,
    ),
]

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe field, KEY=VALUE with a dotted key and a TOML value; "
        "repeatable. E.g. --set n_particles=256 --set species.B.diameter=0.7 "
        "--set minimizer.fmax=1e-10 --set box.packing_fraction=0.9.",
        show_default=False,
    ),
]

SeedOption = Annotated[
    int | None,
    typer.Option(
        "--seed",
        metavar="N",
        help="Seed of the random initial positions (overrides the recipe's).",
        show_default=False,
    ),
]

# --- options whose wording depends on the command ------------------------------------------------


def param_option(help: str) -> Any:
    """``--param``/``-p``, repeatable: the parameters a command works on (none given: its default)."""
    return Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="NAME", help=help, show_default=False)
    ]


def out_option(kind: type, help: str, show_default: bool = False, metavar: str = "PATH") -> Any:
    """``--out``/``-o``: the file or directory a command writes, of type ``kind`` (or None)."""
    return Annotated[kind, typer.Option("--out", "-o", metavar=metavar, help=help, show_default=show_default)]


def allow_unconverged_option(help: str) -> Any:
    """``--allow-unconverged``: go on from a state that did not reach the force tolerance."""
    return Annotated[bool, typer.Option("--allow-unconverged", help=help)]
