"""What main recorded at e892d24 (tests/data/compat_e892d24.json) and the frozen copies of its recipes."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "tests" / "data" / "compat_e892d24.json").read_text())


def frozen(recipe: str | None) -> str | None:
    """The e892d24 copy of a recipe path recorded as ``recipes/x.yaml`` or ``bench/recipes/x.yaml``."""
    if recipe is None:
        return None
    return "tests/data/recipes_e892d24/" + recipe.removeprefix("recipes/").replace("bench/recipes/", "bench/")
