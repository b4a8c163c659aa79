"""Task inputs: Hugging Face datasets (saved folders, data files, globs), column mapping and templates,
conversations, kept columns and provenance — and one clear line for every mistake."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.config import TaskConfig, load_recipe
from distill.core.errors import DistillError
from distill.core.problems import gate_problems, load_problems


def _rows(n, start=0):
    return [
        {"problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}", "k": i}
        for i in range(start, start + n)
    ]


def _task(name, **kw):
    return TaskConfig(source=kw.pop("source", "hf"), name=str(name), **kw)


def test_a_saved_dataset_dict_uses_its_own_test_split_for_eval(tmp_path):
    d = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_rows(30)), "test": datasets.Dataset.from_list(_rows(10, start=100))}
    )
    d.save_to_disk(tmp_path / "ds")
    train, evals = load_problems(_task(tmp_path / "ds", train_size=8, eval_size=5))
    assert [p["question"] for p in evals] == [f"What is {i} + {i}?" for i in range(100, 105)]
    assert [p["question"] for p in train] == [f"What is {i} + {i}?" for i in range(8)]  # none held out of train
    assert train[3]["gold"] == "3 + 3 = 6\n#### 6"  # the worked answer, read by the task's extractor later
    assert (train[3]["source"], train[3]["source_row"]) == (f"{tmp_path / 'ds'}:train", 3)
    assert evals[0]["source"].endswith(":test") and evals[0]["id"] == "eval-000000"


def test_shuffled_draws_are_seeded_and_disjoint(tmp_path):
    datasets.Dataset.from_list(_rows(200)).save_to_disk(tmp_path / "one")
    cfg = _task(tmp_path / "one", train_size=20, eval_size=10, split="shuffle", seed=3)
    train, evals = load_problems(cfg)
    again, evals_again = load_problems(cfg)
    assert train == again and evals == evals_again
    assert not {p["question"] for p in train} & {p["question"] for p in evals}
    other, _ = load_problems(cfg.model_copy(update={"seed": 4}))
    assert [p["question"] for p in other] != [p["question"] for p in train]
    assert sorted(p["source_row"] for p in train) != list(range(20))  # a sample, not the head


def test_parquet_files_a_glob_and_csv_read_as_one_dataset(tmp_path):
    rows = _rows(12)
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), tmp_path / "part-1.parquet")
    train, evals = load_problems(_task(f"{tmp_path}/part-*.parquet", train_size=100, eval_size=2))
    assert len(train) + len(evals) == 12 and evals[-1]["question"] == "What is 11 + 11?"
    (tmp_path / "t.csv").write_text(
        "Body,Question,Answer\nTom has 3 apples.,How many apples?,3\nAn egg.,How many eggs?,1\n"
    )
    cfg = _task(tmp_path / "t.csv", eval_size=1, columns={"question": "{{ Body }} {{ Question }}", "answer": "Answer"})
    train, evals = load_problems(cfg)
    assert train[0]["question"] == "Tom has 3 apples. How many apples?" and train[0]["gold"] == "3"


def test_a_jsonl_file_with_problem_and_solution_fields_just_works(tmp_path):
    f = tmp_path / "my.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(6)))
    train, evals = load_problems(_task(f, source="file", eval_size=2, keep_columns=["k"]))
    assert train[0]["question"] == "What is 0 + 0?" and json.loads(train[0]["extra"]) == {"k": 0}
    assert train[0]["source"] == str(f) and train[0]["source_row"] == 0


def test_conversations_answer_the_last_user_turn_and_keep_the_system_turn(tmp_path):
    chat = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": f"What is {i} * 2?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(5)
    ]
    datasets.Dataset.from_list(chat).save_to_disk(tmp_path / "chat")
    train, evals = load_problems(_task(tmp_path / "chat", eval_size=1))
    p = train[2]
    assert (p["question"], p["gold"], p["system"]) == ("What is 2 * 2?", "4", "You are terse.")
    assert json.loads(p["history"]) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"{i}+2?"}, {"from": "gpt", "value": str(i + 2)}]}
        for i in range(3)
    ]
    datasets.Dataset.from_list(sharegpt).save_to_disk(tmp_path / "sg")
    _, evals = load_problems(_task(tmp_path / "sg", eval_size=1))
    assert (evals[0]["question"], evals[0]["gold"], evals[0]["system"]) == ("2+2?", "4", None)  # the last row


def test_json_gold_objects_are_kept_as_json(tmp_path):
    rows = [{"question": f"Name {i}?", "answer": {"name": f"n{i}", "age": i}} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "j")
    train, _ = load_problems(_task(tmp_path / "j", eval_size=1, answer_type="json"))
    assert json.loads(train[1]["gold"]) == {"name": "n1", "age": 1}


def test_gate_problems_come_from_rows_no_split_took(tmp_path):
    d = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_rows(10)), "test": datasets.Dataset.from_list(_rows(6, start=50))}
    )
    d.save_to_disk(tmp_path / "ds")
    cfg = _task(tmp_path / "ds", train_size=4, eval_size=2)
    train, evals = load_problems(cfg)
    gate = gate_problems(cfg, 6, {p["question"] for p in train + evals})
    questions = [p["question"] for p in gate]
    assert questions[:4] == [f"What is {i} + {i}?" for i in range(52, 56)]  # the test split's unused rows first
    assert questions[4:] == [f"What is {i} + {i}?" for i in (4, 5)] and gate[5]["id"] == "gate-000005"


# --- mistakes: one line naming the problem and the fix ---------------------------------------------


def _error(cfg) -> DistillError:
    with pytest.raises(DistillError) as e:
        load_problems(cfg)
    assert "\n" not in str(e.value)
    return e.value


def test_a_wrong_column_name_names_the_columns_and_the_closest(tmp_path):
    datasets.Dataset.from_list(_rows(5)).save_to_disk(tmp_path / "ds")
    e = _error(_task(tmp_path / "ds", eval_size=1, columns={"question": "problm"}))
    assert e.problem.startswith("task.columns.question 'problm' is not a column of dataset ")
    assert "problem, solution, k" in e.problem and "did you mean 'problem'?" in e.fix


def test_bad_templates_fail_at_once_or_name_the_row(tmp_path):
    datasets.Dataset.from_list(_rows(5)).save_to_disk(tmp_path / "ds")
    e = _error(_task(tmp_path / "ds", eval_size=1, columns={"question": "{{ problem "}))
    assert "task.columns.question template '{{ problem ' does not parse" in e.problem
    e = _error(_task(tmp_path / "ds", eval_size=1, columns={"question": "{{ Body }}"}))
    assert "failed on dataset" in e.problem and "row 5" in e.problem and "'Body' is undefined" in e.problem
    e = _error(_task(tmp_path / "ds", eval_size=1, columns={"question": "{{ problem.__class__.__mro__ }}"}))
    assert "failed on" in e.problem  # the sandbox refuses attribute escapes


@pytest.mark.parametrize(
    "name,expect",
    [
        ("no_such_org/no_such_dataset", "distill runs offline"),
        ("/nonexistent/folder", "does not exist"),
        ("data/*.parquet", "matches no file"),
    ],
)
def test_unreadable_sources_are_one_line(tmp_path, monkeypatch, name, expect):
    monkeypatch.chdir(tmp_path)
    e = _error(_task(name, eval_size=1))
    assert expect in str(e), str(e)


def test_a_corrupt_parquet_file_is_one_line(tmp_path):
    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1 not really")
    e = _error(_task(f, eval_size=1))
    assert e.problem.startswith(f"dataset {f} cannot be read (")


def test_missing_splits_and_kept_columns_are_named(tmp_path):
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(_rows(3)), "b": datasets.Dataset.from_list(_rows(3))}
    ).save_to_disk(tmp_path / "ab")
    assert "has splits a, b and none is called train" in _error(_task(tmp_path / "ab", eval_size=1)).problem
    e = _error(_task(tmp_path / "ab", eval_size=1, train_split="a", eval_split="c"))
    assert e.problem == f"dataset {tmp_path / 'ab'} has no split 'c' (it has: a, b)"
    e = _error(_task(tmp_path / "ab", eval_size=1, train_split="a", keep_columns=["nope"]))
    assert e.problem.startswith("task.keep_columns ['nope'] are not columns of dataset")


def test_answer_type_settings_are_checked_at_load():
    for override, expect in [
        ("task.answer_type=regex", "needs task.answer.pattern"),
        ("task.answer.pattern=(", "is not a valid regex"),
        ("task.answer.pattern=abc", "has no group"),
        ("task.answer_type=custom", "needs task.answer.checker"),
        ("task.answer.checker=not a path", "is not 'module:function'"),
        ("task.answer.json_schema={type: objekt}", "is not a valid JSON Schema at type: 'objekt' is not valid"),
    ]:
        with pytest.raises(DistillError, match=expect):
            load_recipe(None, [override])
