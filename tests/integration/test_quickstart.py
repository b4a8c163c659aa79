"""The quickstart recipe with the real embedded models (minutes): `make test-slow`."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path, ray_cluster):
    args = ["run", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "quickstart" / "metrics.json").read_text())["scores"]
    # Distillation paid off and survived export (the variant the gate kept).
    assert scores["student"]["accuracy"] > scores["student_base"]["accuracy"] + 0.1
    assert scores["student_onnx"]["accuracy"] >= scores["student"]["accuracy"] - 0.1
    assert scores["teacher"]["accuracy"] >= 0.5
