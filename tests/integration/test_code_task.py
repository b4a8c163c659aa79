"""A code task end to end through the CLI: MBPP-style problems (a list of asserts as the gold), a
replay teacher whose recorded solutions pass, fail and loop forever; the training set keeps the one
that passes, the shards say why the others were dropped, and the run is not held up by the loop."""

import json
import time

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration

PROBLEMS = [
    ("Write add(a, b) that returns the sum of a and b.", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    ("Write is_even(n): whether n is even.", ["assert is_even(2)", "assert not is_even(3)", "assert is_even(0)"]),
    ("Write last(xs): the last element of a list.", ["assert last([1, 2, 3]) == 3"]),
    ("Write square(x): x squared.", ["assert square(3) == 9"]),  # held out: the eval split
]
SOLUTIONS = [
    "def add(a, b):\n    return a + b",
    "def is_even(n):\n    return n % 2 == 0 and n > 0",  # wrong on 0: the third assert fails
    "def last(xs):\n    while True:\n        pass",  # hostile: never returns
    "def square(x):\n    return x * x",
]


def test_a_code_task_keeps_only_solutions_whose_tests_pass(tmp_path):
    rows = [{"question": q, "answer": tests} for q, tests in PROBLEMS]
    (tmp_path / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [
        {"question": q, "rationale": "I write the function.", "answer": f"```python\n{code}\n```"}
        for (q, _), code in zip(PROBLEMS, SOLUTIONS)
    ]
    (tmp_path / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {
        "name": "code",
        "output_dir": str(tmp_path / "runs"),
        "cache": str(tmp_path / "cache.sqlite"),
        "task": {
            "source": "file",
            "name": str(tmp_path / "mbpp.jsonl"),
            "eval_size": 1,
            "answer_type": "code",
            "answer": {"timeout_s": 2},
        },
        "teacher": {"model": f"replay:{tmp_path / 'teacher.jsonl'}", "executor": "local"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    start = time.monotonic()
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "recipe.yaml")])
    assert res.exit_code == 0, res.output
    assert time.monotonic() - start < 60

    gen = tmp_path / "runs" / "code" / "generate"
    train = pq.read_table(gen / "dataset" / "train.parquet").to_pylist()
    assert [r["question"] for r in train] == [PROBLEMS[0][0]]
    assert train[0]["pred"] == SOLUTIONS[0] and train[0]["gold"] == "\n".join(PROBLEMS[0][1])
    shards = {r["question"]: r for r in pq.read_table(gen / "shards").to_pylist()}
    wrong, hostile = shards[PROBLEMS[1][0]], shards[PROBLEMS[2][0]]
    assert not wrong["correct"] and not hostile["correct"]
    assert wrong["parse_error"] == "tests failed: AssertionError at line 3 of the tests: assert is_even(0)"
    assert hostile["parse_error"] == "timed out after 2 s"
