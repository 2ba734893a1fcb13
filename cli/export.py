"""``mdsens export``: a run's relaxed structure in another file format, through ASE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import err, guarded, out
from .options import RunOption, out_option
from .runs import chosen_run

FileOut = out_option(Path | None, "File to write (default: RUN/export.<format>).")


def export(
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="Any format ase.io.write writes: vasp, cif, lammps-data, xyz, ...",
        ),
    ],
    run: RunOption = None,
    out_file: FileOut = None,
) -> None:
    """Write the relaxed structure of a run in another file format (through ASE).

    Atom order, symbols, tags and cell are those of the input; positions are the full-precision
    relaxed ones.
    """

    def action():
        from mdsens.run import export_structure
        from mdsens.run_lock import run_lock

        run_dir, note = chosen_run(run)
        with run_lock(run_dir, "export"):
            path = export_structure(run_dir, format_, out_file)
        if note is not None:
            err.print(note, markup=False)  # stdout holds the written file's path alone
        out.print(str(path), markup=False)

    guarded(action)
