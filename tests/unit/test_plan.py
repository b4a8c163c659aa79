"""``distill.plan``: calls counted from the methods themselves, cache hits found by their real keys,
prompt tokens counted by the teacher's tokenizer, and no weights loaded without a pilot."""

import json

import pyarrow.parquet as pq
import pytest
import transformers

from distill.config import Recipe
from distill.plan import plan

N = 18  # the tiny task: 12 train + 6 eval problems


def _recipe(tmp_path, teacher, task_cfg, student=None, **teacher_kw) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "p",
            "output_dir": str(tmp_path / "runs"),
            "cache": str(tmp_path / "cache.sqlite"),
            "task": task_cfg.model_dump() if hasattr(task_cfg, "model_dump") else task_cfg,
            "teacher": {
                "model": f"hf:{teacher}",
                "max_new_tokens": 24,
                "batch_size": 6,
                "executor": "local",
                "dtype": "float32",
                "keep": "all",
                **teacher_kw,
            },
            **({"student": student} if student else {}),
        }
    )


def _part(p: dict, name: str) -> dict:
    return next(s for s in p["stages"] if s["part"] == name)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any causal LM's weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("teacher_kw", "expected"),
    [
        ({}, {"reason": (N, N, N), "answer": (0, N, N)}),  # fallback, nothing known: the max as estimate
        ({"answer_extraction": "always"}, {"reason": (N, N, N), "answer": (N, N, N)}),
        ({"method": "self_consistency", "samples": 3}, {"reason": (3 * N,) * 3, "answer": (0, 3 * N, 3 * N)}),
        ({"method": "least_to_most", "max_subquestions": 2}, {"decompose": (N, N, N), "solve": (N, 3 * N, 3 * N)}),
        ({"method": "self_ask"}, {"reason": (N, N, N), "answer": (0, N, N)}),
    ],
)
def test_calls_per_method(tmp_path, tiny_student, tiny_task_cfg, no_weights, teacher_kw, expected):
    p = plan(_recipe(tmp_path, tiny_student, tiny_task_cfg, **teacher_kw))
    got = {s["part"]: tuple(s["calls"][k] for k in ("min", "estimate", "max")) for s in p["stages"]}
    assert got == expected
    assert p["total"]["cached"] == 0 and p["tokenizer"] == "the teacher's tokenizer"
    assert not (tmp_path / "cache.sqlite").exists()  # planning writes nothing


def test_no_weights_without_pilot_but_a_pilot_loads_them(tmp_path, tiny_student, tiny_task_cfg, no_weights):
    recipe = _recipe(tmp_path, tiny_student, tiny_task_cfg)
    plan(recipe)  # tokenizer and chat template only
    with pytest.raises(AssertionError, match="weights were loaded"):  # the guard does catch a load
        plan(recipe, pilot=1)


def test_tokens_are_the_tokenizers_count_and_a_generated_run_is_free(tmp_path, tiny_teacher, tiny_task_cfg):
    from distill.pipeline import run_stage

    recipe = _recipe(
        tmp_path,
        tiny_teacher,
        tiny_task_cfg,
        answer_extraction="always",
        price_per_1k_input=1.0,
        price_per_1k_output=2.0,
    )
    before = plan(recipe)
    metrics = run_stage(recipe, "generate").metrics
    after = plan(recipe)

    # Stage-1 input tokens: the teacher tokenizer's count of the prompts the real run sent.
    tok = transformers.AutoTokenizer.from_pretrained(tiny_teacher)
    rows = pq.read_table(recipe.run_dir / "generate" / "shards").to_pylist()
    assert len(rows) == N
    sent = sum(len(tok(r["prompt"], add_special_tokens=False).input_ids) for r in rows)
    assert _part(before, "reason")["tokens_in"]["estimate"] == sent
    assert _part(before, "reason")["cost"]["max"] > 0

    # After the run every stage-1 call is a cache hit and costs nothing; stage 2 is known exactly.
    reason = _part(after, "reason")
    assert reason["cached"] == reason["calls"]["max"] == N
    assert reason["tokens_in"]["estimate"] == reason["tokens_out"]["max"] == 0
    assert reason["cost"] == {"estimate": 0.0, "max": 0.0}
    # Stage 2 was built on unknown rationales before; now they are cached, so are its requests.
    assert _part(before, "answer")["cached"] == 0
    assert _part(after, "answer")["calls"] == {"min": N, "estimate": N, "max": N}
    assert _part(after, "answer")["cached"] == N
    assert after["total"]["cost"]["max"] == 0.0
    # What the cache answers is what the run's meter counted.
    assert after["total"]["tokens_in"]["cached"] == metrics["tokens_in"]
    assert after["total"]["tokens_out"]["cached"] == metrics["tokens_out"]


def test_synthesis_requests(tmp_path, tiny_student, no_weights):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"question": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)}) + "\n" for i in range(12)
        )
    )
    task = {"source": "synthetic", "name": str(seeds), "train_size": 6, "eval_size": 4}
    p = plan(_recipe(tmp_path, tiny_student, task, method="self_consistency", samples=2))
    first = 6 + 6 // 2 + 1  # synthesis asks for half as many again as it needs, in up to 8 rounds
    assert _part(p, "synthesize")["calls"] == {"min": first, "estimate": first, "max": 8 * first}
    assert _part(p, "synthesize")["stage"] == "synthesize"
    assert _part(p, "reason")["calls"]["max"] == (6 + 4) * 2  # the problems it will write, and the eval ones


def test_on_policy_scoring_and_budget_warning(tmp_path, tiny_student, tiny_task_cfg, no_weights):
    student = {"model": f"hf:{tiny_student}", "epochs": 2, "batch_size": 4, "micro_batch_size": 4}
    student["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 10}
    p = plan(_recipe(tmp_path, tiny_student, tiny_task_cfg, student=student, max_tokens=50))
    scoring = _part(p, "on-policy scoring")
    # ≤ 12 rows / batch 4 = 3 steps an epoch, 2 epochs: 6 steps, λ 0.5 of them, 4 samples each
    assert scoring["stage"] == "train" and scoring["calls"]["estimate"] == 3 * 4
    assert scoring["tokens_in"]["estimate"] > 3 * 4 * 10  # prompt + sample read per call
    assert any("teacher.max_tokens=50" in w and "would stop" in w for w in p["warnings"])
    assert not any("on_policy" in w for w in p["warnings"])  # no on-policy cap set


def test_endpoint_teacher_counts_without_a_tokenizer(tmp_path, tiny_task_cfg):
    import importlib.util

    recipe = _recipe(tmp_path, "x", tiny_task_cfg, base_url="http://127.0.0.1:9/v1")
    recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"model": "openai:tiny"})})
    p = plan(recipe)  # nothing listens on port 9: planning calls no endpoint
    assert ("tiktoken" if importlib.util.find_spec("tiktoken") else "chars/4") in p["tokenizer"]
    assert _part(p, "reason")["calls"]["max"] == N and _part(p, "reason")["tokens_in"]["estimate"] > N


def test_replay_costs_nothing(tmp_path, tiny_task_cfg):
    from distill.core.problems import load_problems

    train, _ = load_problems(tiny_task_cfg)
    f = tmp_path / "recorded.jsonl"
    f.write_text(
        "".join(
            json.dumps({"question": q["question"], "rationale": "r", "answer": q["gold"]}) + "\n" for q in train[:5]
        )
    )
    recipe = _recipe(tmp_path, "x", tiny_task_cfg)
    recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"model": f"replay:{f}"})})
    p = plan(recipe)
    assert p["total"]["calls"]["max"] == 0 and p["total"]["cost"]["max"] == 0
    assert any("5 of 18 problems" in n for n in p["notes"])


def test_time_without_a_pilot_from_the_recorded_throughput_of_an_embedded_teacher(tmp_path, tiny_task_cfg):
    """No pilot and no earlier run: the embedded teacher's figure recorded on the project's machine gives
    the time, bounded by every call at its cap while the output length is unknown."""
    from distill.core.sources import EMBEDDED
    from distill.plan import _seconds_or_max, _throughput

    r = _recipe(tmp_path, "unused", tiny_task_cfg, workers=2, executor="ray")
    r.teacher.model = "embedded:qwen2.5-coder-0.5b-instruct"
    rate, workers, source = _throughput(r, None)
    assert (rate, workers) == (EMBEDDED["qwen2.5-coder-0.5b-instruct"].tokens_per_second, 2)
    assert "recorded" in source and "pilot" in source
    r.teacher.model = "hf:/some/model"
    assert _throughput(r, None) == (None, 1, None)
    assert _seconds_or_max(None, 123.0) == "≤ 2m 03s" and _seconds_or_max(5.0, 123.0) == "5s"
    assert _seconds_or_max(None, None) == "unknown"
