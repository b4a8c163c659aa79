"""A judge model end to end: the judge is a real tiny model, fitted to grade this task's answers, served by
`distill serve` on loopback; the teachers are recorded outputs (replay files). keep: judged keeps only rows
at or above the threshold with score and reasoning stored, judge calls are cached (a rerun sends the server
nothing), their cost is reported apart, an unparsable verdict is kept with its reason, and teachers_pick:
judged picks per question among two teachers' kept rows."""

import json
import os

import pyarrow.parquet as pq
import pytest
from serving import served

from distill.config import JudgeSettings, recipe_from_dict
from distill.core.answers import Task
from distill.core.problems import load_problems
from distill.pipeline import run_stage
from distill.teachers.judge import candidate_text, judge_messages
from distill.teachers.replay import ReplayTeacher

pytestmark = pytest.mark.integration

RUBRIC = "Is the final answer the reference answer?"
RIGHT, WRONG, UNSURE = "Right.\nScore: 7", "Wrong.\nScore: 2", "Unsure."


def _replay(path, problems, answer, words):
    lines = [
        {"question": p["question"], "rationale": f"{words} {answer(i, int(p['gold']))}.", "answer": str(a)}
        for i, p in enumerate(problems)
        if (a := answer(i, int(p["gold"]))) is not None
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _fit_judge(folder, examples: list[tuple[list[dict], str]]):
    """A tiny model fitted to answer each judge prompt (chat messages) with its verdict text."""
    import torch
    from tiny import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import StudentConfig
    from distill.students.data import tokenize_example
    from distill.students.trainer import train

    torch.set_num_threads(1)
    build_model(folder, "qwen2", seed=4, layers=2, hidden=96)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    data = [
        tokenize_example(tok, tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), target, 1024)
        for m, target in examples
    ]
    cfg = StudentConfig(model="unused", epochs=25, lr=3e-3, batch_size=4, micro_batch_size=4, warmup_ratio=0.05)
    train(model, data, cfg, tok.pad_token_id)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_task_cfg):
    """Two recorded teachers (cheap: right on even problems; sure: always right, other words), a judge
    fitted on their train rows' judge prompts (7 when right, 2 when wrong, no score on problem 2), served."""
    tmp = tmp_path_factory.mktemp("judge")
    train, evals = load_problems(tiny_task_cfg)
    problems = evals + train
    cheap = _replay(tmp / "cheap.jsonl", problems, lambda i, g: g if i % 2 == 0 else g + 50, "Adding up gives")
    sure = _replay(tmp / "sure.jsonl", problems, lambda i, g: g, "The sum is")
    settings = JudgeSettings(rubric=RUBRIC)
    task = Task("number")
    examples, verdicts = [], {}
    for path in (cheap, sure):
        for r in ReplayTeacher(str(path)).rows(train, task):
            target = UNSURE if r["id"] == train[2]["id"] and path == cheap else RIGHT if r["correct"] else WRONG
            examples.append((judge_messages(r["question"], candidate_text(r), settings, r["gold"]), target))
            verdicts[path.stem, r["id"]] = target
    model = _fit_judge(tmp / "judge-model", examples)
    log = tmp / "serve.log"
    with served(model, log, dict(os.environ), name="judge") as url:
        yield {"tmp": tmp, "url": url, "log": log, "cheap": cheap, "sure": sure, "train": train, "verdicts": verdicts}


def _judge(url, **kw):
    return {
        "model": "openai:judge",
        "base_url": f"{url}/v1",
        "rubric": RUBRIC,
        "max_new_tokens": 32,
        "price_per_1k_input": 1.0,
        "price_per_1k_output": 2.0,
        **kw,
    }


def _teacher(path, url, name=None, **kw):
    return {
        "model": f"replay:{path}",
        "keep": "judged",
        "judge": _judge(url),
        "executor": "local",
        "api_key_env": "DISTILL_TEST_NO_KEY",
        **({"name": name} if name else {}),
        **kw,
    }


def _recipe(setup, task_cfg, name, **sections):
    return recipe_from_dict(
        {
            "name": name,
            "output_dir": str(setup["tmp"] / "runs"),
            "cache": str(setup["tmp"] / "cache.sqlite"),
            "task": task_cfg.model_dump(),
            **sections,
        }
    )


def _requests(log) -> int:
    return sum(1 for line in log.read_text().splitlines() if "POST /v1/chat/completions 200" in line)


def test_keep_judged_keeps_rows_at_or_above_the_threshold_cached_and_costed_apart(setup, tiny_task_cfg):
    recipe = _recipe(setup, tiny_task_cfg, "judged", teacher=_teacher(setup["cheap"], setup["url"]))
    before = _requests(setup["log"])
    m = run_stage(recipe, "generate").metrics
    gen = recipe.run_dir / "generate"
    rows = {r["id"]: r for r in pq.read_table(gen / "shards").to_pylist()}
    train_ids = [p["id"] for p in setup["train"]]
    assert _requests(setup["log"]) - before == len(train_ids) == 12  # one judge call per answered train row
    # every train row carries the judge's whole text and the score read from it
    for i in train_ids:
        r = rows[i]
        assert r["judge_reasoning"] is not None and r["judge_tokens_in"] > 0 and r["judge_cached"] is False
    fitted = sum(rows[i]["judge_reasoning"] == setup["verdicts"]["cheap", i] for i in train_ids)
    assert fitted >= 10, [rows[i]["judge_reasoning"] for i in train_ids]  # the fitted judge says what it learnt
    kept = [r["id"] for r in pq.read_table(gen / "dataset" / "train.parquet").to_pylist()]
    at_or_above = [i for i in train_ids if (rows[i]["judge_score"] or 0) >= 6]
    assert sorted(kept) == sorted(at_or_above) and 0 < len(kept) < 12
    assert all(rows[i]["judge_score"] == 7.0 for i in kept)
    unsure = rows[setup["train"][2]["id"]]
    if unsure["judge_reasoning"] == UNSURE:  # an unparsable verdict: no score, the reason and text kept
        assert unsure["judge_score"] is None
        assert unsure["judge_error"] == 'no score in the judge\'s output (expected "Score: N")'
        assert m["filtered"]["unjudged"] >= 1
    assert all(
        rows[p["id"]]["judge_score"] is None and rows[p["id"]]["judge_tokens_in"] is None
        for p in load_problems(tiny_task_cfg)[1]
    )
    # the judge's cost is reported apart, at its own prices; the replay teacher cost nothing
    j = m["judge"]
    tin = sum(rows[i]["judge_tokens_in"] for i in train_ids)
    tout = sum(rows[i]["judge_tokens_out"] for i in train_ids)
    assert (j["tokens_in"], j["tokens_out"], j["rows_judged"]) == (tin, tout, 12)
    assert j["cost"] == pytest.approx(tin / 1000 + 2 * tout / 1000) == j["paid_cost"]
    assert m["estimated_cost"] == 0.0 and m["tokens_in"] == 0
    assert m["filtered"]["below_threshold"] + m["filtered"]["unjudged"] == 12 - len(kept)
    from distill.stages.report import judge_lines

    assert judge_lines(m)[1].startswith("Judge (openai:judge): 12 train rows judged")

    # a rerun (another run folder, the same cache) asks the judge nothing and keeps the same rows
    again = _recipe(setup, tiny_task_cfg, "judged-again", teacher=_teacher(setup["cheap"], setup["url"]))
    n = _requests(setup["log"])
    m2 = run_stage(again, "generate").metrics
    assert _requests(setup["log"]) == n
    assert m2["judge"]["paid_cost"] == 0.0 and m2["judge"]["cost"] == pytest.approx(j["cost"])
    again_kept = [r["id"] for r in pq.read_table(again.run_dir / "generate" / "dataset" / "train.parquet").to_pylist()]
    assert again_kept == kept


def test_teachers_pick_judged_compares_two_teachers_kept_rows(setup, tiny_task_cfg):
    teachers = [_teacher(setup["cheap"], setup["url"], "cheap"), _teacher(setup["sure"], setup["url"], "sure")]
    recipe = _recipe(setup, tiny_task_cfg, "pick", teachers=teachers, teachers_pick="judged")
    m = run_stage(recipe, "generate").metrics
    gen = recipe.run_dir / "generate"
    per = {
        name: {r["id"]: r for r in pq.read_table(gen / "teachers" / folder / "shards").to_pylist()}
        for name, folder in (("cheap", "0-cheap"), ("sure", "1-sure"))
    }
    both = [i for i in per["cheap"] if all((per[t][i]["judge_score"] or 0) >= 6 for t in per)]
    pairwise = m["judge"]["pairwise"]
    assert pairwise["pairs"] == len(both) and pairwise["calls"] == 2 * len(both)  # both orders
    assert pairwise["outcomes"]["orders"] == 2 * len(both) and pairwise["debias"] == "both_orders"
    train = pq.read_table(gen / "dataset" / "train.parquet").to_pylist()
    for r in train:  # each kept row is one of its question's judged-kept rows
        assert (per[r["teacher"]][r["id"]]["judge_score"] or 0) >= 6
    solved = {i for i in per["cheap"] if any((per[t][i]["judge_score"] or 0) >= 6 for t in per)}
    assert {r["id"] for r in train} == solved
    assert sum(t["picked"] for t in m["teachers"]) == len(solved)
    # the pairwise calls are cached too: the same pick again asks nothing
    n = _requests(setup["log"])
    again = _recipe(setup, tiny_task_cfg, "pick-again", teachers=teachers, teachers_pick="judged")
    m2 = run_stage(again, "generate").metrics
    assert _requests(setup["log"]) == n and m2["judge"]["pairwise"]["paid_calls"] == 0
    assert [
        r["teacher"] for r in pq.read_table(again.run_dir / "generate" / "dataset" / "train.parquet").to_pylist()
    ] == [r["teacher"] for r in train]
