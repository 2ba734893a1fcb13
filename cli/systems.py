"""``mdsens systems``: list the shipped system recipes with their descriptions."""

from __future__ import annotations

from .console import out


def systems() -> None:
    """List the shipped system recipes."""
    from mdsens.recipe import available_recipes, load_recipe

    for name in available_recipes():
        out.print(f"{name:<20} {load_recipe(name).get('description', '')}", markup=False)
