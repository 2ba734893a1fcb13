"""The CLI reference (docs/cli.md), generated from the Typer application so it cannot drift.

``python -m mdsens.cli.docs > docs/cli.md`` rewrites it; a test fails when it is out of date.
"""

from __future__ import annotations

import inspect

import typer

from . import app


def _option_line(param) -> str:
    names = ", ".join(f"`{n}`" for n in param.opts + param.secondary_opts)
    text = getattr(param, "help", None) or ""
    if param.required:
        text += " (required)"
    elif param.show_default is not False and param.default not in (None, False, (), []):
        text += f" Default: `{param.default}`."
    text = text.strip().replace("|", "\\|")  # a bare | would end the Markdown table cell
    return f"| {names} | {text} |"


def cli_reference() -> str:
    """Markdown for every command: its description and a table of its options."""
    group = typer.main.get_command(app)
    lines = [
        "# Command-line reference",
        "",
        "Generated from the code by `python -m mdsens.cli.docs > docs/cli.md`; do not edit by hand.",
        "",
        inspect.cleandoc(group.help or ""),
        "",
    ]
    for name, command in group.commands.items():
        lines += [f"## `mdsens {name}`", "", inspect.cleandoc(command.help or ""), ""]
        options = [p for p in command.params if p.param_type_name == "option"]
        if options:
            lines += ["| option | meaning |", "|---|---|"] + [_option_line(p) for p in options] + [""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(cli_reference(), end="")
