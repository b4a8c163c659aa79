"""task.split: a file sorted by problem type gets a seeded random eval split instead of its tail."""

import json


def _file(tmp_path):
    # sorted by kind, as MultiArith is: the tail is all one kind
    rows = [
        {"question": f"{kind} question {i}?", "answer": str(i)} for kind in ("add", "mul", "div") for i in range(20)
    ]
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_order_holds_out_the_tail_and_shuffle_a_seeded_mix(tmp_path):
    from distill.config import TaskConfig
    from distill.core.problems import load_problems

    name = _file(tmp_path)
    _, tail = load_problems(TaskConfig(source="file", name=name, train_size=40, eval_size=12))
    assert {p["question"].split()[0] for p in tail} == {"div"}
    cfg = TaskConfig(source="file", name=name, train_size=40, eval_size=12, split="shuffle")
    train, evals = load_problems(cfg)
    assert {p["question"].split()[0] for p in evals} == {"add", "mul", "div"}
    assert len(train) == 40 and not {p["question"] for p in train} & {p["question"] for p in evals}
    assert load_problems(cfg) == (train, evals)  # the same split for the same seed
    other = load_problems(cfg.model_copy(update={"seed": 1}))[1]
    assert [p["question"] for p in other] != [p["question"] for p in evals]


def test_the_default_split_keeps_stage_hashes():
    from distill.config import Recipe, content_hash

    recipe = Recipe()
    assert content_hash(recipe.task) == content_hash(recipe.task.model_copy(update={"split": "order"}))
    assert content_hash(recipe.task) != content_hash(recipe.task.model_copy(update={"split": "shuffle"}))
