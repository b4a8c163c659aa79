"""The same recipe gives the same dataset bytes as on e892d24 (the generate stage, replayed teacher)."""

import hashlib
import json

import pytest
from compat import RECORDED, ROOT, frozen

from distill.config import load_recipe

pytestmark = pytest.mark.integration


def test_the_same_recipe_gives_the_same_dataset_bytes(tmp_path, monkeypatch):
    """The replay recipe's generate stage writes byte-identical Parquet files to e892d24's."""
    from distill.pipeline import run_stage

    recipe_file = "bench/recipes/coin_flip_replay.yaml"
    if not (ROOT.parent / "shared" / "data" / "zero_shot_cot").is_dir():
        pytest.skip("needs ../shared/data (the recorded InstructGPT rationales)")
    monkeypatch.chdir(ROOT)
    overrides = [f"output_dir={tmp_path}", f"cache={tmp_path / 'cache.sqlite'}"]
    recipe = load_recipe(frozen(recipe_file), overrides)
    run_stage(recipe, "generate")
    done = json.loads((recipe.run_dir / "generate" / "DONE.json").read_text())
    assert done["hash"] == next(h["stages"]["generate"] for h in RECORDED["hashes"] if h["recipe"] == recipe_file)
    for name, digest in RECORDED["datasets"][recipe_file].items():
        data = (recipe.run_dir / "generate" / "dataset" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
