"""The same recipe gives the same dataset bytes as on e892d24 (the generate stage, replayed teacher).

Since then the rows gained provenance columns (``source``, ``source_row``, ``extra``: issue #13),
appended after every e892d24 column; without them the file is byte for byte e892d24's."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from compat import RECORDED, ROOT, frozen

from distill.config import load_recipe
from distill.core.artifacts import write_parquet
from distill.teachers.rows import ROW_SCHEMA

PROVENANCE = ("source", "source_row", "extra")

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
        table = pq.read_table(recipe.run_dir / "generate" / "dataset" / name)
        assert table.column_names[-3:] == list(PROVENANCE), name
        assert set(table["source"].to_pylist()) == {recipe.task.name}  # the task file, as the recipe names it
        before = pa.schema([f for f in ROW_SCHEMA if f.name not in PROVENANCE])  # e892d24's schema
        rows = table.drop_columns(list(PROVENANCE)).to_pylist()
        assert write_parquet(tmp_path / name, pa.Table.from_pylist(rows, schema=before)) == digest, name
