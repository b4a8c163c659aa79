"""The README's Python example, run as written on tiny models (only the recipe path differs)."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from tiny import write_recipe

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- python-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its <!-- python-example --> block"
    return m.group(1)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_teacher, tiny_student, tiny_task_cfg) -> Path:
    f = write_recipe(
        tmp_path,
        "api",
        tiny_task_cfg,
        teacher={"model": f"hf:{tiny_teacher}", "max_new_tokens": 24, "executor": "local", "dtype": "float32"},
        student={
            "model": f"hf:{tiny_student}",
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 16,
        },
        export={"variants": ["int8"]},
    )
    return f


def test_the_readme_python_example_runs(tiny_recipe):
    import distill

    code = readme_example().replace("recipes/quickstart.yaml", str(tiny_recipe))
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    run, data, model = namespace["run"], namespace["data"], namespace["model"]
    run_dir = tiny_recipe.parent / "runs" / "api"

    assert isinstance(run, distill.RunResult) and run.run_dir == run_dir
    assert list(run.stages) == ["generate", "train", "export", "evaluate"]
    scores = json.loads((run_dir / "evaluate" / "scores.json").read_text())
    assert run.scores == scores and set(scores) == {"teacher", "student_base", "student", "student_onnx"}
    assert run.report == run_dir / "report.md" and run.report.read_text().startswith("# distill run `api`")
    bundle = run.stages["export"].paths["bundle"]
    assert (bundle / "genai_config.json").is_file() and (bundle / run.stages["export"].metrics["chosen_file"]).is_file()
    # The stage calls found the run's folders up to date: reused, same metrics, no second bill.
    assert data.reused and model.reused and data.seconds == 0
    assert data.metrics == run.stages["generate"].metrics and data.paths["train"].is_file()
    train_metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    assert model.metrics["steps"] == train_metrics["steps"] > 0 and (model.paths["model"] / "config.json").is_file()
    lines = printed.getvalue().splitlines()
    assert lines[0] == f"{scores['student']['accuracy']} {run_dir / 'report.md'}"
    assert lines[1] == str(run_dir / "export" / "bundle")
    assert (
        lines[2] == f"True {data.metrics['teacher_eval_accuracy']} {run_dir / 'generate' / 'dataset' / 'train.parquet'}"
    )
    assert lines[3] == f"{run_dir / 'train' / 'model'} {train_metrics['steps']}"


def test_api_errors_are_one_line_distill_errors(tmp_path):
    import distill

    with pytest.raises(distill.DistillError, match=r"^recipe .*nope.yaml does not exist — pass a YAML file"):
        distill.run(tmp_path / "nope.yaml")
    with pytest.raises(
        distill.DistillError, match=r"unknown recipe key 'student.epoch' — did you mean 'student.epochs'"
    ):
        distill.train(None, overrides=["student.epoch=2"])
    with pytest.raises(distill.DistillError, match=r"unknown stage\(s\) \['distil'\]"):
        distill.run(None, stages=["distil"])
    assert not (tmp_path / "runs").exists()


def test_a_recipe_object_takes_overrides_without_changing_it():
    import distill

    recipe = distill.load_recipe(None, ["student.epochs=3"])
    changed = distill.recipe_of(recipe, ["student.lr=0.001", "teacher.samples=3"])
    assert (changed.student.epochs, changed.student.lr, changed.teacher.samples) == (3, 0.001, 3)
    assert (recipe.student.lr, recipe.teacher.samples) == (1e-4, 5)
