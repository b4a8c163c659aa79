"""`distill recipe keys [SECTION]`: every recipe key for people (80 columns) and machines (--json)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.config import StudentConfig, recipe_keys

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def _invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})


def test_keys_of_a_section_print_each_key_with_its_description_in_80_columns():
    res = _invoke("recipe", "keys", "student")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(line.startswith("student.epochs  float | auto  (default: auto)") for line in lines)
    assert any(line.startswith("student.on_policy.lmbda  float  (default: 0.5)") for line in lines)
    words = " ".join(res.stdout.split())  # descriptions wrap across lines
    assert " ".join(StudentConfig.model_fields["epochs"].description.split()) in words
    assert not any(line.startswith(("task.", "teacher.", "export.")) for line in lines)
    assert max(len(line) for line in lines) <= 80


def test_keys_without_a_section_list_every_key():
    res = _invoke("recipe", "keys")
    assert res.exit_code == 0, res.output
    heads = [line.split()[0] for line in res.stdout.splitlines() if line and not line.startswith(" ")]
    assert heads == [r["key"] for r in recipe_keys()]


def test_json_matches_recipe_keys():
    res = _invoke("recipe", "keys", "student", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == recipe_keys("student")


def test_an_unknown_section_is_one_error_line_exit_2():
    res = _invoke("recipe", "keys", "nope")
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2
    assert len(lines) == 1 and lines[0].startswith(
        "error: no recipe section 'nope' — sections: task, task.answer, teacher"
    )


def test_an_unknown_key_on_the_command_line_points_at_recipe_keys(tmp_path, monkeypatch):
    monkeypatch.setattr("distill.cli.set_env_defaults", dict)  # keep this process's environment as it is
    res = _invoke("generate", str(QUICKSTART), f"output_dir={tmp_path / 'runs'}", "student.epoch=1")
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0] == (
        "error: unknown recipe key 'student.epoch' — did you mean 'student.epochs'? (see `distill recipe keys student`)"
    )
    assert not (tmp_path / "runs").exists()


def test_brackets_in_a_value_print_as_written(tmp_path, monkeypatch):
    """The error line is the user's text: rich markup must not swallow ``[step one]``."""
    monkeypatch.setattr("distill.cli.set_env_defaults", dict)
    res = _invoke("generate", str(QUICKSTART), f"output_dir={tmp_path / 'runs'}", "teacher.trigger=[step one]")
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: teacher.trigger=[step one] was read as YAML, which made it a list")
