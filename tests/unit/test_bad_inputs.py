"""Bad input files are one ``DistillError`` naming the file (and the line), never a traceback (issue #19).

Property tests feed broken files of every supported format — task .jsonl/.json/.log, replay
.jsonl/.log, recipe .yaml — to the readers: truncated JSON, wrong types, bare numbers, missing
fields, non-UTF-8 and random bytes. The contract: a valid parse, or exactly a ``DistillError``
whose one-line message names the file. Named cases pin each failure the issue reported.
"""

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.config import Recipe, load_recipe
from distill.core.answers import Task
from distill.core.errors import DistillError
from distill.core.problems import read_problem_file
from distill.teachers.replay import ReplayTeacher, load_records
from distill.teachers.rows import ROW_SCHEMA

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- strategies -----------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
texts = st.text(min_size=1, max_size=40)

task_rows = st.fixed_dictionaries(
    {},
    optional={
        "question": texts | json_values,
        "answer": texts | st.integers() | json_values,
        "sQuestion": texts | json_values,
        "lSolutions": st.lists(st.integers() | st.floats(allow_nan=False, allow_infinity=False), max_size=2)
        | json_values,
    },
)
replay_rows = st.fixed_dictionaries(
    {},
    optional={
        "question": texts | json_values,
        "rationale": texts | json_values,
        "answer": texts | st.integers() | json_values,
        "answer_raw": texts | json_values,
        "gold": json_values,
    },
)


@st.composite
def kojima_logs(draw) -> str:
    """Zero-shot-CoT runner logs: Q:/A: blocks with pred_mode and GT lines, some lines left out."""
    blocks = []
    for _ in range(draw(st.integers(0, 4))):
        lines = [
            f"Q: {draw(texts)}",
            f"A: Let's think step by step. {draw(st.text(max_size=30))} Therefore, the answer is {draw(texts)}",
            f"pred_before : {draw(st.text(max_size=10))}",
            f"pred_mode : {draw(texts)}",
            f"GT : {draw(texts)}",
        ]
        blocks.append("\n".join(ln for ln in lines if draw(st.integers(0, 9)) > 0))
    return ("\n" + "*" * 20 + "\n").join(blocks)


@st.composite
def broken(draw, text: str) -> bytes:
    """``text`` as bytes, left intact or broken: truncated, with non-UTF-8 or random bytes spliced in."""
    data = text.encode()
    how = draw(st.sampled_from(["intact", "truncate", "latin1", "splice", "random"]))
    if how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "latin1":
        data = text.encode("latin-1", "replace") + "café\n".encode("latin-1")
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif how == "random":
        data = draw(st.binary(max_size=200))
    return data


@st.composite
def jsonl_files(draw, rows) -> bytes:
    """JSONL: objects (maybe without the needed fields), bare values, blank lines; maybe broken."""
    values = draw(st.lists(rows | json_values, max_size=5))
    return draw(broken("".join(json.dumps(v) + "\n" for v in values)))


@st.composite
def json_files(draw) -> bytes:
    """A .json task file: a list of rows, {"examples": rows}, or any JSON value; maybe broken."""
    rows = draw(st.lists(task_rows | json_values, max_size=4))
    value = draw(st.sampled_from(["list", "examples", "other"]))
    doc = rows if value == "list" else {"examples": rows} if value == "examples" else draw(json_values)
    return draw(broken(json.dumps(doc)))


def _write(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


def _parses_or_names(read, path: Path):
    """``read(path)``, or None after checking the one ``DistillError`` names ``path`` on one line."""
    try:
        return read(path)
    except DistillError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return None


# --- property tests -------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(st.tuples(st.just(".jsonl"), jsonl_files(task_rows)), st.tuples(st.just(".json"), json_files())))
def test_task_files_parse_or_name_the_file(case):
    suffix, data = case
    with tempfile.TemporaryDirectory() as d:
        problems = _parses_or_names(read_problem_file, _write(d, "task" + suffix, data))
    for p in problems or []:
        assert set(p) == {"question", "gold"} and isinstance(p["gold"], str)
        assert isinstance(p["question"], str) and p["question"]


@PROPERTY
@given(kojima_logs().flatmap(broken))
def test_task_logs_parse_or_name_the_file(data):
    with tempfile.TemporaryDirectory() as d:
        problems = _parses_or_names(read_problem_file, _write(d, "task.log", data))
    assert problems is None or all(p["question"] and isinstance(p["gold"], str) for p in problems)


def _replay_rows_fit_the_schema(path: Path, records: list[dict]) -> None:
    """Records that loaded answer problems as the generate stage writes them (no traceback later)."""
    problems = [
        {"id": f"p{i}", "split": "train", "question": str(r["question"]) or "?", "gold": "1"}
        for i, r in enumerate(records)
    ]
    rows = ReplayTeacher(path).rows(problems, Task("number"))
    pa.Table.from_pylist(rows, schema=pa.schema([f for f in ROW_SCHEMA if f.name in rows[0]]))


@PROPERTY
@given(st.one_of(st.tuples(st.just(".jsonl"), jsonl_files(replay_rows)), kojima_logs().map(lambda t: (".log", t))))
def test_replay_files_load_or_name_the_file(case):
    suffix, data = case
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, "teacher" + suffix, data if isinstance(data, bytes) else data.encode())
        records = _parses_or_names(load_records, path)
        if records is not None:
            _replay_rows_fit_the_schema(path, records)


@PROPERTY
@given(kojima_logs().flatmap(broken))
def test_broken_replay_logs_load_or_name_the_file(data):
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, "teacher.log", data)
        records = _parses_or_names(load_records, path)
        if records is not None:
            _replay_rows_fit_the_schema(path, records)


def _section(fields: dict):
    return st.fixed_dictionaries({}, optional=fields) | json_values


recipe_docs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["run", "a/b", ".hidden", ""]) | json_values,
        "output_dir": st.sampled_from(["@/out", "@/afile", "@/afile/below"]) | json_values,
        "cache": st.sampled_from(["@/c.sqlite", "@/afile", "@", "@/afile/c.sqlite"]) | json_values,
        "task": _section(
            {
                "source": st.sampled_from(["file", "reasoning_gym", "nope"]) | json_values,
                "train_size": st.integers(-2, 5) | json_values,
                "eval_size": st.integers(-2, 5) | json_values,
                "params": json_values,
            }
        ),
        "teacher": _section(
            {
                "model": st.sampled_from(["replay:x.jsonl", "openai:m", "hf:x"]) | json_values,
                "method": st.sampled_from(["zero_shot_cot", "few_shot_cot", "magic"]) | json_values,
                "prompt_template": st.sampled_from(["{{ question }}", "{% if %}", "{{ question.__class__ }}"]),
            }
        ),
        "studnet": json_values,
    },
)


def _in_scratch(doc, scratch: Path):
    """``doc`` with the ``@`` path placeholders put under ``scratch`` (where ``afile`` is a file)."""
    if isinstance(doc, dict):
        return {k: _in_scratch(v, scratch) for k, v in doc.items()}
    return doc.replace("@", str(scratch), 1) if isinstance(doc, str) and doc.startswith("@") else doc


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scratch")
    (folder / "afile").write_text("not a folder, not a database\n")
    return folder


@PROPERTY
@given(doc=recipe_docs, text=st.text(max_size=80), how=st.sampled_from(["doc", "text", "bytes"]), data=st.data())
def test_recipes_load_or_name_the_file_or_the_key(scratch, doc, text, how, data):
    if how == "doc":
        raw = data.draw(broken(yaml.safe_dump(_in_scratch(doc, scratch), allow_unicode=True)))
    else:
        raw = data.draw(broken(text)) if how == "text" else data.draw(st.binary(max_size=120))
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, "recipe.yaml", raw)
        try:
            assert isinstance(load_recipe(path), Recipe)
        except DistillError as e:
            message = str(e)
            assert "\n" not in message, message
            # File problems name the file; in a readable mapping a bad value names its key (or the
            # template, or the output path) instead, as it does when it comes from an override.
            keys = ("recipe key ", "unknown recipe key ", "prompt template ", "output_dir ", "cache ", "run folder ")
            assert " — " in message and (str(path) in message or message.startswith(keys)), message


# --- the cases the issue reported (each fails on the code before the fix) -------------------------


def _error(read, path) -> str:
    with pytest.raises(DistillError) as e:
        read(path)
    return str(e.value)


def test_broken_json_task_file_names_the_file_and_line(tmp_path):
    f = tmp_path / "task.json"
    f.write_text('[\n  {"question": "1 + 1", "answer": "2"},\n  {"question": "2 + 2", "ans')
    assert _error(read_problem_file, f).startswith(f"task file {f} is not valid JSON (line 3: ")


def test_jsonl_of_bare_numbers_names_the_line(tmp_path):
    f = tmp_path / "task.jsonl"
    f.write_text("1\n2\n3\n")
    assert _error(read_problem_file, f).startswith(f"task file {f} line 1 is a number, not a JSON object — ")


@pytest.mark.parametrize(
    "row,why",
    [
        ({"question": "q"}, "line 2 has no answer field (its fields: question)"),
        ({"question": None, "answer": "1"}, "line 2: 'question' is null, not text"),
        ({"question": "q", "answer": [1]}, "line 2: 'answer' is a list, not a value"),
        ({"sQuestion": "q", "lSolutions": []}, "line 2: lSolutions is not a non-empty list"),
    ],
)
def test_task_rows_without_the_fields_name_the_line(tmp_path, row, why):
    f = tmp_path / "task.jsonl"
    f.write_text(json.dumps({"question": "ok", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    assert _error(read_problem_file, f).startswith(f"task file {f} {why} — ")


def test_json_task_file_that_is_not_a_list_is_one_error(tmp_path):
    f = tmp_path / "task.json"
    f.write_text("42")
    assert _error(read_problem_file, f).startswith(f"task file {f} holds a number, not a list of problems — ")


def test_task_log_block_with_an_empty_question_names_the_line(tmp_path):
    f = tmp_path / "task.log"
    block = "Q: {}\nA: Let's think step by step. Therefore, the answer is 2\npred_mode : 2\nGT : 2\n"
    f.write_text(block.format("1 + 1") + "*" * 20 + "\n" + block.format("\r"))
    assert _error(read_problem_file, f).startswith(f"task file {f} line 6 has an empty question after Q: — ")


def test_replay_jsonl_with_one_broken_line_names_it(tmp_path):
    f = tmp_path / "teacher.jsonl"
    good = json.dumps({"question": "1 + 1", "rationale": "one and one", "answer": "2"})
    f.write_text(good + "\n" + good[:-9] + "\n" + good + "\n")
    assert _error(load_records, f).startswith(f"replay file {f} line 2 is not valid JSON (")


def test_replay_row_missing_a_field_further_down_names_its_line(tmp_path):
    f = tmp_path / "teacher.jsonl"
    rows = [{"question": "a", "rationale": "r", "answer": "1"}, {"question": "b", "answer": "2"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _error(load_records, f) == (
        f"replay file {f} line 2 is missing ['rationale'] — rows need question, rationale and answer"
    )


def test_non_utf8_replay_log_is_named(tmp_path):
    f = tmp_path / "teacher.log"
    f.write_bytes("Q: caf\xe9 1 + 1\nA: 2\npred_mode : 2\nGT : 2\n".encode("latin-1"))
    assert _error(load_records, f) == f"replay file {f} is not UTF-8 text — re-encode it as UTF-8"


def test_empty_recipe_file_is_an_error_not_the_defaults(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("# just a comment\n")
    assert _error(load_recipe, f) == (
        f"recipe {f} is empty — write at least a name and task, or run without a file for the defaults"
    )
    assert isinstance(load_recipe(None), Recipe)  # no file still means the defaults


def test_recipe_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("name: x\ntask:\n  name: [a, b\nteacher: {}\n")
    assert _error(load_recipe, f).startswith(f"recipe {f} is not valid YAML at line 4, column 8 (")


def test_recipe_that_is_not_a_mapping_is_named(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("- name: x\n")
    assert _error(load_recipe, f).startswith(f"recipe {f} must be a mapping of keys, not list — ")


@pytest.mark.parametrize(
    "override,problem",
    [
        ("output_dir=@/afile", "output_dir @/afile is a file, not a folder"),
        ("output_dir=@/afile/runs", "output_dir @/afile/runs is inside @/afile, which is a file"),
        ("cache=@", "cache @ is a folder, not a file"),
        ("cache=@/afile", "cache @/afile is an existing file that is not a SQLite database"),
    ],
)
def test_output_paths_that_point_at_a_file_are_one_error_at_load(tmp_path, override, problem):
    (tmp_path / "afile").write_text("notes\n")
    with pytest.raises(DistillError) as e:
        load_recipe(None, [override.replace("@", str(tmp_path))])
    assert e.value.problem == problem.replace("@", str(tmp_path))


def test_output_paths_that_can_be_created_are_fine(tmp_path):
    (tmp_path / "empty.sqlite").touch()
    recipe = load_recipe(None, [f"output_dir={tmp_path}/new/runs", f"cache={tmp_path}/empty.sqlite"])
    assert recipe.run_dir == tmp_path / "new" / "runs" / "run"
