"""The units a run's figures label their axes with, worked out from the run's resolved recipe.

mdsens itself has no units: lengths and energies are in whatever units the input uses. The
recipe tells which those are: a soft-sphere packing is in units of the diameter that is 1
(``d_A`` where species A has diameter 1), energies in units of its ε when ε = 1; a
Lennard-Jones or Morse system whose σ (and ε) are all 1 is in reduced units σ (and ε); a
structure file with other σ is in ASE's units, Å and eV. Anything else is labelled "length
units of the input" (and "energy units of the input"), as is a run without ``system.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN_LENGTH = "length units of the input"
UNKNOWN_ENERGY = "energy units of the input"
# The potentials' parameters by dimension: a length, an energy, or the inverse of a length
# (Morse's α multiplies r); soft spheres' exponent α is a number.
LENGTH_PARAMETERS = {"diameter", "sigma"}
ENERGY_PARAMETERS = {"epsilon"}


@dataclass(frozen=True)
class Units:
    """Symbols of the length and energy units (None: unknown) and a sentence saying where
    they come from (empty when nothing needs saying)."""

    length: str | None
    energy: str | None
    note: str = ""
    potential: str = ""

    def length_label(self) -> str:
        """What goes in parentheses after a length axis's name."""
        return self.length or UNKNOWN_LENGTH

    def sensitivity_label(self, param: str) -> str:
        """Units of dx*/dθ for the parameter named ``param`` (``epsilon``, ``diameter.A``, …)."""
        head = param.split(".")[0]
        if head in LENGTH_PARAMETERS:
            over = self.length
        elif head in ENERGY_PARAMETERS:
            over = self.energy
        elif head == "alpha" and self.potential == "soft_sphere":
            return self.length_label()
        elif head == "alpha" and self.potential == "morse":
            return f"{self.length}²" if self.length else f"({UNKNOWN_LENGTH})²"
        else:
            over = None
        if self.length is None or over is None:
            return f"{UNKNOWN_LENGTH} per unit of θ"
        return f"{self.length}/{over}"


def _values(recipe: dict, parameter: str) -> list[float]:
    """Every value of ``parameter`` the recipe sets: globally, per species and per pair."""
    tables = [recipe.get("potential", {})]
    for section in ("species", "pairs"):
        tables += [entry for entry in recipe.get(section, {}).values() if isinstance(entry, dict)]
    return [float(t[parameter]) for t in tables if isinstance(t.get(parameter), int | float)]


def units_of(recipe: dict | None) -> Units:
    """The units of a run with the resolved ``recipe`` (None: a run without ``system.toml``)."""
    if recipe is None:
        return Units(None, None)
    potential = str(recipe.get("potential", {}).get("name", ""))
    epsilon = _values(recipe, "epsilon")
    energy_is_epsilon = bool(epsilon) and all(value == 1.0 for value in epsilon)
    energy = "ε" if energy_is_epsilon else None
    if potential == "soft_sphere":
        unit = [name for name, entry in recipe.get("species", {}).items() if entry.get("diameter") == 1.0]
        if not unit:
            return Units(None, energy, potential=potential)
        length = f"d_{unit[0]}"
        note = f"lengths in units of d_{unit[0]} = 1, the diameter of species {unit[0]}"
        return Units(length, energy, note + (", energies in units of ε" if energy else ""), potential)
    sigma = _values(recipe, "sigma")
    if sigma and all(value == 1.0 for value in sigma):
        note = "reduced units: lengths in σ" + (", energies in ε" if energy else "")
        return Units("σ", energy, note, potential)
    if "structure" in recipe:
        # ASE reads every structure format in Å; parameters given with it are then in Å and eV.
        return Units("Å", "eV", "lengths in Å and energies in eV, as ASE reads structure files", potential)
    return Units(None, None, potential=potential)
