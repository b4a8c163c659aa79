"""A user's own data through the CLI: every input form generates (replay teacher, no model), its rows
keep their provenance, the messages export reads back, a student trains on an HF dataset with custom
columns, and each mistake is one line with exit 2 and no run folder."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration

N = 16


def _problems():
    return [
        {"Body": f"Ann has {i} pens and buys {i % 4 + 1} more.", "Question": "How many pens?", "n": i} for i in range(N)
    ]


def _answer(p):
    return p["n"] + p["n"] % 4 + 1


def _question(p):
    return f"{p['Body']} {p['Question']}"


def _replay(root):
    """Recorded teacher outputs for every question: right on all but every fifth."""
    rows = []
    for p in _problems():
        a = _answer(p) + (1 if p["n"] % 5 == 0 else 0)
        rows.append(
            {"question": _question(p), "rationale": f"{p['n']} plus {p['n'] % 4 + 1} is {a}.", "answer": str(a)}
        )
    for p in _problems():  # the same conversations' questions, as the messages dataset asks them
        rows.append({"question": f"Q{p['n']}: {_question(p)}", "rationale": "Count them.", "answer": str(_answer(p))})
    f = root / "teacher.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _hf_dict(root):
    rows = [{**p, "Answer": f"They add up.\n#### {_answer(p)}"} for p in _problems()]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:12]), "test": datasets.Dataset.from_list(rows[12:])}
    ).save_to_disk(root / "hf")
    return {"source": "hf", "name": str(root / "hf"), "keep_columns": ["n"]}


def _parquet_glob(root):
    rows = [{"question": _question(p), "answer": _answer(p), "n": p["n"]} for p in _problems()]
    pq.write_table(pa.Table.from_pylist(rows[:8]), root / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:]), root / "part-1.parquet")
    return {"source": "hf", "name": f"{root}/part-*.parquet", "eval_size": 4}


def _csv_file(root):
    lines = ["Body,Question,Answer"] + [f'"{p["Body"]}",{p["Question"]},{_answer(p)}' for p in _problems()]
    (root / "t.csv").write_text("\n".join(lines) + "\n")
    return {"source": "file", "name": str(root / "t.csv"), "eval_size": 4}


def _problem_solution_jsonl(root):
    rows = [{"problem": _question(p), "solution": f"... #### {_answer(p)}"} for p in _problems()]
    (root / "my.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"source": "file", "name": str(root / "my.jsonl"), "eval_size": 4}


def _conversations(root):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You count pens."},
                {"role": "user", "content": f"Q{p['n']}: {_question(p)}"},
                {"role": "assistant", "content": str(_answer(p))},
            ]
        }
        for p in _problems()
    ]
    datasets.Dataset.from_list(rows).save_to_disk(root / "chat")
    return {"source": "hf", "name": str(root / "chat"), "eval_size": 4}


FORMS = {
    "hf_saved_dict": _hf_dict,
    "parquet_glob": _parquet_glob,
    "csv_template": _csv_file,
    "problem_solution_jsonl": _problem_solution_jsonl,
    "conversations": _conversations,
}


def _recipe(root, task: dict, **top) -> dict:
    columns = {"question": "{{ Body }} {{ Question }}", "answer": "Answer"}
    return {
        "name": "own",
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": {
            "train_size": 100,
            "eval_size": 4,
            **({"columns": columns} if task["name"].endswith(("hf", ".csv")) else {}),
            **task,
        },
        "teacher": {"model": f"replay:{_replay(root)}", "executor": "local"},
        **top,
    }


def _write(root, recipe: dict):
    f = root / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    return f


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("form", FORMS)
def test_each_input_form_generates_with_provenance_and_exports(tmp_path, form):
    recipe = _recipe(tmp_path, FORMS[form](tmp_path))
    res = _cli("generate", _write(tmp_path, recipe))
    assert res.exit_code == 0, res.output
    gen = tmp_path / "runs" / "own" / "generate"
    train = pq.read_table(gen / "dataset" / "train.parquet").to_pylist()
    evals = pq.read_table(gen / "dataset" / "eval.parquet").to_pylist()
    # 12 train problems; the replay teacher is wrong on n = 0, 5, 10 (not on the conversations' questions)
    assert len(evals) == 4 and len(train) == (12 if form == "conversations" else 9) and all(r["correct"] for r in train)
    assert all(r["source"] and r["source_row"] is not None for r in train + evals)
    if form == "hf_saved_dict":  # evaluated on the dataset's own test split
        assert {r["source"].rsplit(":", 1)[1] for r in evals} == {"test"}
        assert [json.loads(r["extra"])["n"] for r in evals] == [12, 13, 14, 15]
    else:  # one split: its last four rows are held out
        assert sorted(r["source_row"] for r in evals) == [12, 13, 14, 15]
    res = _cli("data", "export", tmp_path / "runs" / "own", "--format", "messages")
    assert res.exit_code == 0, res.output
    exported = [json.loads(ln) for ln in (tmp_path / "runs/own/data/messages/train.jsonl").read_text().splitlines()]
    assert len(exported) == len(train) and exported[0]["messages"][0]["content"] == train[0]["question"]
    assert exported[0]["source_row"] == train[0]["source_row"]


def test_a_student_trains_on_an_hf_dataset_with_custom_columns(tmp_path, tiny_student):
    student = {"model": f"hf:{tiny_student}", "epochs": 1, "batch_size": 4, "micro_batch_size": 2, "max_length": 96}
    recipe = _write(tmp_path, _recipe(tmp_path, _hf_dict(tmp_path), student=student))
    for stage in ("generate", "train"):
        res = _cli(stage, recipe)
        assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "runs/own/train/metrics.json").read_text())
    assert metrics["examples"] == 9 and metrics["steps"] >= 2  # the nine kept rows of the train split


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize(
    "override,expect",
    [
        ("task.columns.answer=Answr", "task.columns.answer 'Answr' is not a column of dataset"),
        ("task.columns.question={{ Body", "does not parse"),
        ("task.columns.question={{ Nope }}", "'Nope' is undefined"),
        ("task.eval_split=validation", "has no split 'validation' (it has: train, test)"),
        ("task.name=/nonexistent/data.parquet", "does not exist"),
    ],
)
def test_input_mistakes_are_one_line_and_leave_no_run(tmp_path, override, expect):
    res = _cli("generate", _write(tmp_path, _recipe(tmp_path, _hf_dict(tmp_path))), override)
    assert expect in _one_error_line(res)
    assert not (tmp_path / "runs").exists()


CHOICES = "Which city is the capital of the United Kingdom? (A) Paris (B) London (C) Rome (D) Oslo"
SCHEMA = {"type": "object", "required": ["name", "age"], "properties": {"age": {"type": "integer"}}}
# answer type -> (task.answer settings, [(question, gold, recorded answer, correct?)])
ANSWER_CASES = {
    "choice": (
        {},
        [
            (CHOICES, "B", "B", True),  # a bare letter, as many datasets and logs store it
            ("Quiz 2. " + CHOICES, "(B)", "(B)", True),
            ("Quiz 3. " + CHOICES, "London", "The answer is London.", True),  # an option's text, gold and answer
            ("Quiz 4. " + CHOICES, "B", "The answer is C", False),
        ],
    ),
    "number": (
        {"tolerance": 0.01},
        [
            ("What is three quarters?", "3/4", "0.75", True),
            ("What is 45 percent?", "45%", "The answer is 45.", True),
            ("How much is the car?", "$1,200", "It costs $1,200.", True),
            ("What is one third?", r"\frac{1}{3}", "0.333", True),  # within the 1% tolerance
            ("What is 2 + 2?", "Two and two.\n#### 4", "5", False),
        ],
    ),
    "text": (
        {"match": "f1", "f1_threshold": 0.5},
        [
            ("What is the tall tower in Paris?", "the Eiffel Tower", "The answer is Eiffel tower in Paris", True),
            ("Who wrote Hamlet?", "William Shakespeare", "The answer is Marlowe", False),
        ],
    ),
    "json": (
        {"json_schema": SCHEMA},
        [
            ("Describe Ann.", '{"name": "Ann", "age": 30}', 'The answer is {"age": 30, "name": "Ann"}', True),
            ("Describe Bob.", '{"name": "Bob", "age": 40}', '{"name": "Rob", "age": 40}', False),
            ("Describe Cy.", '{"name": "Cy", "age": 5}', '{"name": "Cy"}', None),  # fails the schema: unparsable
        ],
    ),
    "regex": (
        {"pattern": r"FINAL: (\w+)"},
        [
            ("Which colour is the sky?", "blue", "I think so. FINAL: blue", True),
            ("Which colour is grass?", "green", "FINAL: red", False),
        ],
    ),
    "custom": (
        {"checker": "own_checks:grade"},
        [
            ("Name a prime.", "7", "The answer is 7", True),
            ("Name an even prime.", "2", "The answer is 3", False),
            ("Break the checker.", "1", "The answer is boom", False),  # it raises: wrong, with the reason
        ],
    ),
}
CHECKER = """
def grade(answer, gold):
    if answer == "boom":
        raise ValueError("no boom allowed")
    return answer.strip() == gold.strip()
"""


@pytest.mark.parametrize("answer_type", ANSWER_CASES)
def test_each_answer_type_checks_recorded_answers_end_to_end(tmp_path, monkeypatch, answer_type):
    settings, cases = ANSWER_CASES[answer_type]
    (tmp_path / "own_checks.py").write_text(CHECKER)  # beside the recipe, as a user's module is
    monkeypatch.chdir(tmp_path)
    rows = [{"question": q, "answer": gold} for q, gold, _, _ in cases] + [
        {"question": "Held out?", "answer": cases[0][1]}
    ]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [{"question": q, "rationale": "Thinking.", "answer": said} for q, _, said, _ in cases]
    records.append({"question": "Held out?", "rationale": "Thinking.", "answer": cases[0][2]})
    (tmp_path / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {
        "name": "types",
        "output_dir": str(tmp_path / "runs"),
        "cache": str(tmp_path / "cache.sqlite"),
        "task": {
            "source": "file",
            "name": str(tmp_path / "task.jsonl"),
            "eval_size": 1,
            "answer_type": answer_type,
            "answer": settings,
        },
        "teacher": {"model": f"replay:{tmp_path / 'teacher.jsonl'}", "executor": "local", "keep": "all"},
    }
    res = _cli("generate", _write(tmp_path, recipe))
    assert res.exit_code == 0, res.output
    shards = pq.read_table(tmp_path / "runs/types/generate/shards").to_pylist()
    by_question = {r["question"]: r for r in shards}
    for q, _, said, correct in cases:
        row = by_question[q]
        if correct is None:
            assert row["pred"] is None and "json_schema" in row["parse_error"], row
        else:
            assert row["correct"] is correct, (said, row)
    if answer_type == "custom":
        assert (
            "checker own_checks:grade raised ValueError: no boom allowed"
            in by_question["Break the checker."]["parse_error"]
        )


def test_a_checker_that_does_not_import_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _write(tmp_path, _recipe(tmp_path, _hf_dict(tmp_path)))
    res = _cli("generate", recipe, "task.answer_type=custom", "task.answer.checker=no_such_mod:grade")
    assert "task.answer.checker 'no_such_mod:grade': importing 'no_such_mod' failed" in _one_error_line(res)
    assert not (tmp_path / "runs").exists()
