"""Bad inputs through `distill generate` (issue #19): exit 2, exactly one `error:` line, no run folder.

Also what a replay teacher covers is said before any work (none is an error, some a console line),
and a task smaller than task.train_size is a warning, not a silent cap. The teacher is a replay file
run in-process, so no model is loaded.
"""

import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration

QUESTIONS = 14


def _problems(n=QUESTIONS):
    return [{"question": f"What is {i} plus {i % 3}?", "answer": str(i + i % 3)} for i in range(n)]


def _records(problems):
    return [{"question": p["question"], "rationale": f"It is {p['answer']}.", "answer": p["answer"]} for p in problems]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(root, task=None, teacher=None, **top):
    """A recipe over ``root/task.jsonl`` answered by ``root/teacher.jsonl`` (both written unless given)."""
    task = task or _jsonl(root / "task.jsonl", _problems())
    teacher = teacher or _jsonl(root / "teacher.jsonl", _records(_problems()))
    recipe = {
        "name": "bad",
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": {"source": "file", "name": str(task), "train_size": 10, "eval_size": 4},
        "teacher": {"model": f"replay:{teacher}", "executor": "local", "keep": "all"},
        **top,
    }
    f = root / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    return f


def _generate(recipe, *overrides):
    return CliRunner().invoke(app, ["generate", str(recipe), *overrides])


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _broken_json_task(root):
    return _recipe(root, task=root / "task.json"), root / "task.json", '[{"question": "1 + 1", "answer": "2"}, {"q'


def _bare_numbers_task(root):
    return _recipe(root, task=root / "task.jsonl"), root / "task.jsonl", "1\n2\n3\n4\n5\n6\n"


def _broken_replay_line(root):
    good = json.dumps(_records(_problems(1))[0])
    return _recipe(root, teacher=root / "teacher.jsonl"), root / "teacher.jsonl", f"{good}\n{good[:20]}\n{good}\n"


def _non_utf8_replay_log(root):
    data = b"Q: caf\xe9 1 + 1\nA: Let's think step by step. 2\npred_mode : 2\nGT : 2\n"
    return _recipe(root, teacher=root / "teacher.log"), root / "teacher.log", data


def _output_dir_is_a_file(root):
    return _recipe(root, output_dir=str(root / "runs")), root / "runs", "my notes\n"


def _empty_recipe(root):
    return root / "recipe.yaml", root / "recipe.yaml", "# nothing here yet\n"


# Before the fix an empty recipe meant the defaults: these overrides make that fail fast (no model run).
NO_DEFAULT_RUN = ["teacher.model=replay:missing.jsonl", "teacher.executor=local"]


def _yaml_syntax_error(root):
    return root / "recipe.yaml", root / "recipe.yaml", "name: bad\ntask: {name: [a\n"


# Each broken input and the start of the one line it gives ({f}: the broken file).
CASES = [
    (_broken_json_task, "task file {f} is not valid JSON (line 1: "),
    (_bare_numbers_task, "task file {f} line 1 is a number, not a JSON object"),
    (_broken_replay_line, "replay file {f} line 2 is not valid JSON ("),
    (_non_utf8_replay_log, "replay file {f} is not UTF-8 text"),
    (_output_dir_is_a_file, "output_dir {f} is a file, not a folder"),
    (_empty_recipe, "recipe {f} is empty"),
    (_yaml_syntax_error, "recipe {f} is not valid YAML at line 3"),
]


@pytest.mark.parametrize("case,problem", CASES, ids=[c.__name__.strip("_") for c, _ in CASES])
def test_bad_input_is_one_error_line_and_writes_no_run_folder(tmp_path, case, problem):
    recipe, bad, content = case(tmp_path)
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    overrides = [f"output_dir={tmp_path / 'runs'}"] + (NO_DEFAULT_RUN if case is _empty_recipe else [])
    line = _one_error_line(_generate(recipe, *overrides))
    assert line.startswith("error: " + problem.format(f=bad)), line
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "runs" / "run").exists()


def test_replay_file_covering_no_question_is_one_line_before_any_work(tmp_path):
    other = _jsonl(tmp_path / "other.jsonl", _records([{"question": f"Q{i}?", "answer": "1"} for i in range(5)]))
    line = _one_error_line(_generate(_recipe(tmp_path, teacher=other)))
    assert line.startswith(
        f"error: replay file {other} has no recorded answer for any of the task's {QUESTIONS} questions — "
        f"record it on the same questions as task.name={tmp_path / 'task.jsonl'}"
    ), line
    assert "parsable" not in line
    assert not (tmp_path / "runs").exists()  # no recipe.yaml, no work folder


def test_replay_file_covering_some_questions_says_how_many(tmp_path):
    partial = _jsonl(tmp_path / "partial.jsonl", _records(_problems()[:11]))
    res = _generate(_recipe(tmp_path, teacher=partial))
    assert res.exit_code == 0, res.output
    assert f"replay: 11 of {QUESTIONS} questions have a recorded answer; the others are skipped" in res.output


def test_train_size_larger_than_the_file_is_a_warning(tmp_path):
    recipe = _recipe(tmp_path)
    res = _generate(recipe, "task.train_size=1000")
    assert res.exit_code == 0, res.output
    task = tmp_path / "task.jsonl"
    assert f"warning: task.train_size=1000 but {task} has 10 distinct questions outside the eval split: using 10" in (
        res.output
    )
    assert "questions have a recorded answer" not in res.output  # the replay file covers them all


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.sampled_from([1, "x", None, [], {"question": "q"}, {"answer": 1}]), min_size=1, max_size=4),
    cut=st.integers(0, 30),
)
def test_generated_broken_task_files_are_one_line(tmp_path_factory, rows, cut):
    root = tmp_path_factory.mktemp("gen")
    task = root / "task.jsonl"
    good = _problems(6)
    text = "".join(json.dumps(r) + "\n" for r in good[:3] + rows + good[3:])  # a cut only breaks a good row
    task.write_text(text[: len(text) - cut])
    line = _one_error_line(_generate(_recipe(root, task=task)))
    assert line.startswith(f"error: task file {task} line "), line
    assert not (root / "runs").exists()


def test_replay_missing_the_eval_questions_is_not_an_unparsable_teacher(tmp_path):
    """A recording of the training questions only: its 40 unrecorded eval questions (generated first)
    are skipped, not counted as a teacher that gives no parsable answer (the early stop)."""
    problems = _problems(80)
    task = _jsonl(tmp_path / "task.jsonl", problems)
    train_only = _jsonl(tmp_path / "train_only.jsonl", _records(problems[:40]))
    recipe = _recipe(tmp_path, task=task, teacher=train_only)
    res = _generate(recipe, "task.train_size=40", "task.eval_size=40")
    assert res.exit_code == 0, res.output
    assert "no parsable answer" not in res.output
    assert "replay: 40 of 80 questions have a recorded answer; the others are skipped" in res.output
