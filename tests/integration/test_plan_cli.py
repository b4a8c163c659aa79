"""`distill plan` as a user types it: JSON output, one-line errors, `jobs submit --dry-run`, and a
pilot whose estimate the real run confirms (and whose completions the real run reuses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_recipe

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "distill", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


def _recipe(root: Path, teacher: Path, task_cfg, student: Path, **teacher_kw) -> Path:
    teacher_cfg = {
        "model": f"hf:{teacher}",
        "max_new_tokens": 24,
        "batch_size": 6,
        "executor": "local",
        "dtype": "float32",
        "keep": "all",
        **teacher_kw,
    }
    return write_recipe(root, "plan", task_cfg, teacher_cfg, {"model": f"hf:{student}"})


def test_json_has_the_fields(tmp_path, tiny_student, tiny_task_cfg):
    res = _cli("plan", _recipe(tmp_path, tiny_student, tiny_task_cfg, tiny_student), "--json")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    assert [s["part"] for s in p["stages"]] == ["reason", "answer"]
    for key in ("calls", "cached", "tokens_in", "tokens_out", "cost", "seconds"):
        assert key in p["stages"][0] and key in p["total"]
    assert p["total"]["calls"]["max"] == 2 * 18 and p["pilot"] is None
    assert p["tokenizer"] == "the teacher's tokenizer"


def test_table_and_dry_run_submit_nothing(tmp_path, tiny_student, tiny_task_cfg):
    recipe = _recipe(tmp_path, tiny_student, tiny_task_cfg, tiny_student)
    table = _cli("plan", recipe)
    assert table.returncode == 0 and "generate: reason" in table.stdout and "total: 36 teacher calls" in table.stdout
    store = tmp_path / "jobs.sqlite"
    dry = _cli("jobs", "submit", recipe, "--dry-run", "--store", store)
    assert dry.returncode == 0, dry.stderr
    assert "generate: reason" in dry.stdout and "total: 36 teacher calls" in dry.stdout
    assert not store.exists() and not (tmp_path / "runs").exists()


def test_bad_recipe_is_one_error_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  metod: self_ask\n")
    res = _cli("plan", recipe, "--json")
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown recipe key 'teacher.metod'")


def test_pilot_estimate_holds_and_the_run_reuses_it(tmp_path, tiny_teacher, tiny_task_cfg, tiny_student):
    recipe = _recipe(tmp_path, tiny_teacher, tiny_task_cfg, tiny_student)
    res = _cli("plan", recipe, "--pilot", "8", "--json")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    assert p["pilot"]["problems"] == 8 and p["pilot"]["tokens_out"] > 0
    generate = [s for s in p["stages"] if s["stage"] == "generate"]
    estimate = sum(s["tokens_out"]["estimate"] + s["tokens_out"]["cached"] for s in generate)

    assert _cli("generate", recipe).returncode == 0
    metrics = json.loads((tmp_path / "runs" / "plan" / "generate" / "metrics.json").read_text())
    print(f"estimated {estimate} output tokens, the run wrote {metrics['tokens_out']}")
    assert abs(estimate - metrics["tokens_out"]) <= 0.25 * metrics["tokens_out"]
    assert metrics["cached_rows"] >= 8  # the pilot's problems were paid once
    # the calls the run counted are within the plan's range, and the pilot's were not paid again
    low, high = (sum(s["calls"][k] for s in generate) for k in ("min", "max"))
    assert low <= metrics["teacher_calls"] <= high, (low, metrics["teacher_calls"], high)
    assert metrics["paid_teacher_calls"] < metrics["teacher_calls"]
