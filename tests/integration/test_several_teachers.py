"""Several teachers (recipe key ``teachers``): a cheap teacher first and an expensive one only for what
it left unsolved, a vote across teachers, per-teacher metrics and rows, resume without re-asking, and
the recipe errors. The teachers are recorded outputs (replay files) and the tiny fitted model."""

import json

import pyarrow.parquet as pq
import pytest

from distill.config import load_recipe, recipe_from_dict
from distill.core.errors import DistillError
from distill.core.problems import load_problems
from distill.pipeline import run_stage, stage_hash, work_dir
from distill.teachers.budget import BudgetExceeded

pytestmark = pytest.mark.integration


def _replay(path, problems, answer):
    """A replay file answering each problem with ``answer(index, gold)`` (a number)."""
    lines = [
        {"question": p["question"], "rationale": f"Adding up gives {answer(i, int(p['gold']))}.", "answer": str(a)}
        for i, p in enumerate(problems)
        if (a := answer(i, int(p["gold"]))) is not None
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f"replay:{path}"


def _recipe(tmp_path, task_cfg, teachers, **top):
    return recipe_from_dict(
        {
            "name": "several",
            "output_dir": str(tmp_path / "runs"),
            "cache": str(tmp_path / "cache.sqlite"),
            "task": task_cfg.model_dump(),
            "teachers": teachers,
            **top,
        }
    )


def _model_teacher(tiny_teacher, **kw):
    return {
        "model": f"hf:{tiny_teacher}",
        "name": "expensive",
        "max_new_tokens": 24,
        "batch_size": 3,
        "executor": "local",
        "dtype": "float32",
        "price_per_1k_input": 1.0,
        "price_per_1k_output": 2.0,
        **kw,
    }


def _dataset(run_dir, split="train"):
    return pq.read_table(run_dir / "generate" / "dataset" / f"{split}.parquet").to_pylist()


@pytest.fixture(scope="module")
def problems(tiny_task_cfg):
    train, evals = load_problems(tiny_task_cfg)
    return evals + train


def test_cheap_first_asks_the_expensive_teacher_only_what_the_cheap_one_failed(
    tmp_path, tiny_teacher, tiny_task_cfg, problems
):
    # the cheap teacher is right on every third problem, wrong on the others
    cheap = _replay(tmp_path / "cheap.jsonl", problems, lambda i, g: g if i % 3 == 0 else g + 50)
    teachers = [{"model": cheap, "name": "cheap"}, _model_teacher(tiny_teacher, when="unsolved")]
    recipe = _recipe(tmp_path, tiny_task_cfg, teachers)
    m = run_stage(recipe, "generate").metrics
    gen = recipe.run_dir / "generate"
    unsolved = {p["id"] for i, p in enumerate(problems) if i % 3}
    asked = pq.read_table(gen / "teachers" / "1-expensive" / "shards")
    assert set(asked["id"].to_pylist()) == unsolved and asked.num_rows == len(unsolved) == 12
    assert pq.read_table(gen / "teachers" / "0-cheap" / "shards").num_rows == 18
    cheap_m, exp_m = m["teachers"]
    assert (cheap_m["name"], cheap_m["asked"], cheap_m["eval_accuracy"], cheap_m["cost"]) == ("cheap", 18, 2 / 6, 0)
    assert cheap_m["picked"] == cheap_m["solved"] == 6 and exp_m["asked"] == 12 and exp_m["when"] == "unsolved"
    assert exp_m["tokens_in"] > 0 and exp_m["cost"] == pytest.approx(
        exp_m["tokens_in"] / 1000 + 2 * exp_m["tokens_out"] / 1000
    )
    assert m["tokens_in"] == exp_m["tokens_in"] and m["estimated_cost"] == pytest.approx(exp_m["cost"])
    # every question keeps the first teacher's kept row; each row says which teacher wrote it
    rows = _dataset(recipe.run_dir)
    by = {r["id"]: r["teacher"] for r in rows}
    assert all(by[i] == "cheap" for i in by if i not in unsolved)
    assert all(by[i] == "expensive" for i in by if i in unsolved) and "expensive" in by.values()
    assert all(r["correct"] for r in rows) and len(rows) == m["train_rows_kept"]
    assert [cheap_m["train_rows_kept"], exp_m["train_rows_kept"]] == [
        sum(1 for t in by.values() if t == n) for n in ("cheap", "expensive")
    ]
    assert cheap_m["kept_share"] + exp_m["kept_share"] == pytest.approx(1.0)
    assert [r["id"] for r in rows] == sorted(by)
    # the run's shards hold one chosen row per problem (what eval --split train and data inspect read)
    shards = pq.read_table(gen / "shards")
    assert shards.num_rows == 18 and len(set(shards["id"].to_pylist())) == 18
    # the report has the per-teacher table
    from distill.stages.report import write_report

    md = write_report(recipe.run_dir, recipe.dump(), {}, {"generate": m}, {})
    assert "| teacher | when | asked |" in md and "| cheap | always | 18 |" in md
    assert "| expensive | unsolved | 12 |" in md


def test_vote_across_teachers_differs_from_the_first_correct(tmp_path, tiny_task_cfg, problems):
    """By index mod 4: q0 A, B right; q1 B, C right; q2 only C right (A and B agree on a wrong
    answer); q3 three different answers, only B right (the tie goes to A's wrong one)."""
    right = {0: "AB", 1: "BC", 2: "C", 3: "B"}

    def teacher(letter):
        def answer(i, g):
            if letter in right[i % 4]:
                return g
            return g + 50 + (ord(letter) if i % 4 == 3 else 0)

        return {"model": _replay(tmp_path / f"{letter}.jsonl", problems, answer), "name": letter}

    teachers = [teacher("A"), teacher("B"), teacher("C")]
    picked = {}
    for pick in ("vote", "correct"):
        recipe = _recipe(tmp_path / pick, tiny_task_cfg, teachers, teachers_pick=pick)
        m = run_stage(recipe, "generate").metrics
        picked[pick] = {r["id"]: r["teacher"] for r in _dataset(recipe.run_dir)}
        assert m["teachers_pick"] == pick and [t["asked"] for t in m["teachers"]] == [18, 18, 18]
    index = {p["id"]: i for i, p in enumerate(problems)}
    vote = {i: "AB"[index[i] % 4] for i in index if index[i] % 4 in (0, 1) and i.startswith("train")}
    assert picked["vote"] == vote
    first_right = {i: right[index[i] % 4][0] for i in index if i.startswith("train")}
    assert picked["correct"] == first_right


def test_a_killed_run_resumes_per_teacher_without_asking_again(tmp_path, tiny_teacher, tiny_task_cfg, problems):
    cheap = _replay(tmp_path / "cheap.jsonl", problems, lambda i, g: g if i % 2 == 0 else None)  # half unanswered
    teachers = [{"model": cheap, "name": "cheap"}, _model_teacher(tiny_teacher, when="unsolved")]
    reference = run_stage(_recipe(tmp_path / "ref", tiny_task_cfg, teachers), "generate").metrics

    capped = [teachers[0], {**teachers[1], "max_tokens": 150}]
    recipe = _recipe(tmp_path / "job", tiny_task_cfg, capped)
    with pytest.raises(BudgetExceeded):
        run_stage(recipe, "generate")
    work = work_dir(recipe, "generate")
    committed = json.loads((work / "teachers" / "1-expensive" / "shards.json").read_text())["shards"]
    assert 0 < sum(s["rows"] for s in committed) < 9
    again = _recipe(tmp_path / "job", tiny_task_cfg, teachers)  # a budget is no semantic setting: same work folder
    assert work_dir(again, "generate") == work
    m = run_stage(again, "generate").metrics
    assert _dataset(again.run_dir) == _dataset(tmp_path / "ref" / "runs" / "several")
    exp_m, ref_m = m["teachers"][1], reference["teachers"][1]
    assert exp_m["asked"] == 9 and exp_m["cached_rows"] == 0  # nothing asked twice, nothing paid twice
    assert (exp_m["paid_tokens_in"], exp_m["paid_tokens_out"]) == (ref_m["paid_tokens_in"], ref_m["paid_tokens_out"])


def test_recipe_errors_name_the_key_and_the_fix(tmp_path, tiny_task_cfg):
    with pytest.raises(DistillError, match=r"teachers\[0\]\.when=unsolved: the first teacher answers every problem"):
        _recipe(tmp_path, tiny_task_cfg, [{"model": "replay:a.jsonl", "when": "unsolved"}])
    with pytest.raises(DistillError, match="set teacher or teachers, not both"):
        load_recipe(None, ["teacher.max_new_tokens=9", "teachers=[{model: 'replay:a.jsonl'}]"])
    with pytest.raises(DistillError, match=r"both called 'replay:a.jsonl': give teachers\[1\]\.name"):
        load_recipe(None, ["teachers=[{model: 'replay:a.jsonl'}, {model: 'replay:a.jsonl', when: unsolved}]"])
    with pytest.raises(DistillError, match="teachers_pick chooses among several teachers"):
        load_recipe(None, ["teachers_pick=vote"])


def test_the_teachers_list_is_in_the_stage_hash_and_a_dump_loads_back(tmp_path, tiny_task_cfg):
    two = [{"model": "replay:a.jsonl"}, {"model": "replay:b.jsonl", "when": "unsolved"}]
    base = _recipe(tmp_path, tiny_task_cfg, two)
    assert base.teacher.model == "replay:a.jsonl" and base.teachers[1].name == "replay:b.jsonl"
    same = recipe_from_dict(base.dump(), ["teachers.1.batch_size=7", "teachers.0.workers=5"])
    assert stage_hash(same, "generate") == stage_hash(base, "generate")
    changed = [
        recipe_from_dict(base.dump(), ["teachers.1.when=always"]),
        _recipe(tmp_path, tiny_task_cfg, [two[0], {**two[1], "name": "b"}]),
        _recipe(tmp_path, tiny_task_cfg, [{**two[1], "when": "always"}, two[0]]),
        _recipe(
            tmp_path, tiny_task_cfg, [two[0], {"model": "replay:b.jsonl", "when": "unsolved"}], teachers_pick="vote"
        ),
        _recipe(tmp_path, tiny_task_cfg, two[:1]),
    ]
    hashes = {stage_hash(r, "generate") for r in changed} | {stage_hash(base, "generate")}
    assert len(hashes) == 6


def test_the_readme_recipe_is_valid():
    """The README's two-teacher recipe, as written, loads: cheap first, the expensive one for the rest."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- several-teachers -->\n```yaml\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- several-teachers --> block"
    recipe = recipe_from_dict(yaml.safe_load(block.group(1)))
    assert [(t.name, t.when) for t in recipe.teachers] == [("cheap", "always"), ("expensive", "unsolved")]
    assert recipe.teacher.model == "embedded:qwen2.5-coder-0.5b-instruct"


def test_plan_counts_calls_per_teacher_an_unsolved_ones_as_an_upper_bound(
    tmp_path, tiny_teacher, tiny_task_cfg, problems
):
    from distill.plan import plan, print_plan

    cheap = _replay(tmp_path / "cheap.jsonl", problems, lambda i, g: g)
    p = plan(
        _recipe(
            tmp_path, tiny_task_cfg, [{"model": cheap, "name": "cheap"}, _model_teacher(tiny_teacher, when="unsolved")]
        )
    )
    by = {(s["teacher"], s["part"]): s for s in p["stages"]}
    assert by[("cheap", "replay")]["calls"]["max"] == 0
    reason = by[("expensive", "reason")]
    assert reason["calls"] == {"min": 0, "estimate": 18, "max": 18} and reason["upper_bound_estimate"]
    assert any(n.startswith("expensive: when: unsolved") and "upper bound" in n for n in p["notes"])
    assert p["total"]["calls"]["max"] == sum(s["calls"]["max"] for s in p["stages"])
    from rich.console import Console

    console = Console(record=True, width=200)
    print_plan(p, console)
    assert "generate expensive: reason" in console.export_text()
