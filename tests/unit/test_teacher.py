import pytest

from distill.config import TeacherConfig
from distill.core.answers import Task
from distill.core.problems import load_problems
from distill.teachers.backends.base import Decoding, GenerationRequest
from distill.teachers.backends.transformers import TransformersBackend
from distill.teachers.cache import CachedTeacher, CompletionCache
from distill.teachers.methods import zero_shot_cot


def test_cache_key_ignores_batching_and_separates_decoding():
    r = GenerationRequest("Q: 1+1?", Decoding(max_new_tokens=8))
    assert r.key("m") == GenerationRequest("Q: 1+1?", Decoding(max_new_tokens=8)).key("m")
    assert r.key("m") != GenerationRequest("Q: 1+1?", Decoding(max_new_tokens=9)).key("m")
    assert r.key("m") != GenerationRequest("Q: 1+1?", Decoding(max_new_tokens=8), sample=1).key("m")
    assert r.key("m") != r.key("other-model")


def test_batched_generation_matches_one_by_one(tiny_teacher):
    backend = TransformersBackend(tiny_teacher, batch_size=4)
    prompts = [
        backend.chat_prompt([{"role": "user", "content": q}], "Let's think step by step.")
        for q in ["State 1 + 2 =", "State the final answer to the following arithmetic problem: 7 + 8 =", "9 - 4 ="]
    ]
    reqs = [GenerationRequest(p, Decoding(max_new_tokens=10)) for p in prompts]
    batched = backend.generate(reqs)
    single = [backend.generate([r])[0] for r in reqs]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.tokens_out <= 10 and c.finish_reason in ("stop", "length") for c in batched)


def test_cached_teacher_never_pays_twice(tiny_teacher, tmp_path):
    backend = TransformersBackend(tiny_teacher, batch_size=2)
    reqs = [GenerationRequest(f"Q{i}: {i} + 1 =", Decoding(max_new_tokens=6)) for i in range(5)]
    first = CachedTeacher(backend, CompletionCache(tmp_path / "c.sqlite"))
    out1 = first.generate(reqs)
    assert first.calls == 5
    # A new process-like instance over the same file, different batch size: zero calls, and the
    # weights are never even loaded.
    fresh = TransformersBackend(tiny_teacher, batch_size=5)
    second = CachedTeacher(fresh, CompletionCache(tmp_path / "c.sqlite"), cache_only=True)
    out2 = second.generate(reqs + reqs[:2])
    assert second.calls == 0 and fresh._model is None
    assert [c.text for c in out2[:5]] == [c.text for c in out1] and all(c.cached for c in out2)
    from distill.teachers.cache import CacheMiss

    with pytest.raises(CacheMiss):
        second.generate([GenerationRequest("never asked", Decoding(max_new_tokens=6))])


def test_zero_shot_cot_rows_score_and_keep_raw_output(tiny_teacher, tiny_task_cfg, tmp_path):
    train, evals = load_problems(tiny_task_cfg)
    teacher = CachedTeacher(TransformersBackend(tiny_teacher, batch_size=4), CompletionCache(tmp_path / "c.sqlite"))
    cfg = TeacherConfig(max_new_tokens=24, answer_extraction="fallback")
    rows = zero_shot_cot(teacher, train[:8], cfg, Task("number"))
    assert len(rows) == 8
    for r in rows:
        assert r["prompt"].endswith("Let's think step by step.")
        assert r["correct"] == (r["pred"] == r["gold"])
        assert (r["pred"] is None) == (r["parse_error"] is not None)
    # The fitted tiny teacher knows these problems: most answers are right.
    assert sum(r["correct"] for r in rows) >= 5
    # "always" runs the stage-2 answer prompt for every row.
    rows2 = zero_shot_cot(teacher, train[:4], cfg.model_copy(update={"answer_extraction": "always"}), Task("number"))
    assert all(r["answer_raw"] != "" or r["tokens_out"] > 0 for r in rows2)
    assert teacher.calls == 8 + 4  # stage 1 reused from the cache, only stage 2 paid


def test_self_consistency_votes_and_reports_agreement(tiny_teacher, tiny_task_cfg, tmp_path):
    train, _ = load_problems(tiny_task_cfg)
    teacher = CachedTeacher(TransformersBackend(tiny_teacher, batch_size=8), CompletionCache(tmp_path / "c.sqlite"))
    cfg = TeacherConfig(method="self_consistency", samples=4, temperature=1.0, max_new_tokens=24)
    rows = zero_shot_cot(teacher, train[:3], cfg, Task("number"))
    assert teacher.calls >= 12  # four sampled paths per problem (plus stage-2 prompts where needed)
    for r in rows:
        assert r["confidence"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert (r["pred"] is None) == (r["confidence"] == 0.0)
        assert r["pred"] is None or r["pred"] in r["rationale"] + r["answer_raw"]
    calls = teacher.calls
    again = zero_shot_cot(teacher, train[:3], cfg, Task("number"))
    assert teacher.calls == calls and again == [{**r, "cached": True} for r in rows]


def test_few_shot_prompt_carries_the_demonstrations(tiny_teacher, tiny_task_cfg, tmp_path):
    from distill.config import Demo

    train, _ = load_problems(tiny_task_cfg)
    demo = Demo(question="2 + 2 =", rationale="Two plus two is four.", answer="4")
    cfg = TeacherConfig(method="few_shot_cot", demos=[demo], max_new_tokens=24)
    rows = zero_shot_cot(TransformersBackend(tiny_teacher), train[:2], cfg, Task("number"))
    assert all("Two plus two is four.\nTherefore, the answer is 4." in r["prompt"] for r in rows)
    assert all(r["prompt"].index("2 + 2 =") < r["prompt"].index(r["question"]) for r in rows)


def test_few_shot_without_demos_is_a_config_error():
    import pytest

    from distill.config import load_recipe
    from distill.core.errors import DistillError

    with pytest.raises(DistillError, match="demos"):
        load_recipe(None, ["teacher.method=few_shot_cot"])


def test_subquestions_parse_numbered_lists_and_end_with_the_question():
    from distill.teachers.methods import _subquestions

    text = "1. What is 3 + 4?\n2) What is 7 - 2?\n- Then what?\nSome prose without a question mark"
    assert _subquestions(text, "3 + 4 - 2 = ?", 2) == ["What is 3 + 4?", "What is 7 - 2?", "3 + 4 - 2 = ?"]


def test_least_to_most_solves_each_step_and_keeps_the_transcript(tiny_teacher, tiny_task_cfg, tmp_path):
    from distill.teachers.methods import least_to_most

    train, _ = load_problems(tiny_task_cfg)
    teacher = CachedTeacher(TransformersBackend(tiny_teacher, batch_size=4), CompletionCache(tmp_path / "c.sqlite"))
    cfg = TeacherConfig(method="least_to_most", max_new_tokens=16)
    rows = least_to_most(teacher, train[:3], cfg, Task("number"))
    for r, p in zip(rows, train[:3]):
        # The original question is always the last step of the transcript.
        assert r["rationale"].split("Q: ")[-1].startswith(p["question"])
        assert (r["pred"] is None) == (r["parse_error"] is not None)
        assert r["correct"] == (r["pred"] == r["gold"])
    calls = teacher.calls
    assert least_to_most(teacher, train[:3], cfg, Task("number")) == [{**r, "cached": True} for r in rows]
    assert teacher.calls == calls  # a re-run pays nothing


def test_self_ask_prompt_uses_the_scaffold(tiny_teacher, tiny_task_cfg):
    from distill.teachers.methods import self_ask

    train, _ = load_problems(tiny_task_cfg)
    rows = self_ask(
        TransformersBackend(tiny_teacher),
        train[:2],
        TeacherConfig(method="self_ask", max_new_tokens=24),
        Task("number"),
    )
    for r, p in zip(rows, train[:2]):
        assert "Follow up: How much do 4 pens cost?" in r["prompt"]
        assert r["prompt"].endswith("Are follow up questions needed here:")
        assert r["prompt"].index("How much do 4 pens cost?") < r["prompt"].index(p["question"])


def test_prompt_longer_than_context_is_rejected_or_truncated(tiny_teacher, tmp_path):
    long = "1 + " * 600 + "1 ="  # ~1200 tokens; the tiny teacher's context is 1024
    dec = Decoding(max_new_tokens=8)
    reject = TransformersBackend(tiny_teacher, long_prompts="reject")
    short, too_long = reject.generate([GenerationRequest("2 + 2 =", dec), GenerationRequest(long, dec)])
    assert short.error is None and too_long.error and "context" in too_long.error
    assert too_long.finish_reason == "error" and too_long.tokens_out == 0
    # A rejected call is never cached: it is no paid result, and a later policy change must apply.
    cache = CompletionCache(tmp_path / "c.sqlite")
    CachedTeacher(reject, cache).generate([GenerationRequest(long, dec)])
    assert len(cache) == 0
    cut = TransformersBackend(tiny_teacher, long_prompts="truncate").generate([GenerationRequest(long, dec)])[0]
    assert cut.error is None and cut.tokens_in == 1024 - 8 and cut.tokens_out > 0


def test_damaged_cache_rows_and_files_are_not_trusted(tiny_teacher, tmp_path):
    import sqlite3

    backend = TransformersBackend(tiny_teacher)
    reqs = [GenerationRequest(q, Decoding(max_new_tokens=8)) for q in ("1 + 2 =", "3 + 4 =")]
    path = tmp_path / "c.sqlite"
    paid = CachedTeacher(backend, CompletionCache(path))
    first = paid.generate(reqs)
    paid.cache.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE completions SET value = replace(value, ?, ?)", (first[0].text[:3], "XyZ"))  # bit rot
    db.commit()
    db.close()
    teacher = CachedTeacher(backend, CompletionCache(path))
    again = teacher.generate(reqs)
    assert teacher.cache.rejected >= 1 and teacher.calls == teacher.cache.rejected  # regenerated, not trusted
    assert [c.text for c in again] == [c.text for c in first]
    third = CachedTeacher(backend, CompletionCache(path))
    assert third.generate(reqs)[0].cached  # repaired in place
    for t in (teacher, third):
        t.cache.close()
    path.write_bytes(b"this is not a database" * 100)
    fresh = CompletionCache(path)
    assert len(fresh) == 0 and list(tmp_path.glob("c.sqlite.corrupt-*"))  # the damaged file is kept aside


def test_shrinking_greedy_equals_hf_generate(tiny_teacher):
    """The row-dropping greedy loop writes exactly what generate(do_sample=False) writes, up to EOS."""
    import torch

    backend = TransformersBackend(tiny_teacher)
    tok = backend.tokenizer
    prompts = [backend.chat_prompt([{"role": "user", "content": q}]) for q in ("1 + 2 =", "7 - 3 + 1 =", "9 =")]
    batch = tok.pad({"input_ids": [tok(p, add_special_tokens=False).input_ids for p in prompts]}, return_tensors="pt")
    ours = backend.greedy(batch["input_ids"], batch["attention_mask"], 20)
    with torch.inference_mode():
        ref = backend.model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    for row, new in zip(ref[:, batch["input_ids"].shape[1] :].tolist(), ours):
        end = next((i + 1 for i, t in enumerate(row) if t in backend.eos_ids), len(row))
        assert new == row[:end]
    assert len({len(x) for x in ours}) > 1  # rows really ended at different steps


def test_samples_share_prefill_and_do_not_depend_on_batching(tiny_teacher):
    """Self-consistency samples of one prompt are prefilled once, and each request's sample is the
    same whether it runs alone or in a batch with others (per-request seeded generators)."""
    backend = TransformersBackend(tiny_teacher, batch_size=16)
    dec = Decoding(max_new_tokens=12, temperature=4.0, top_p=1.0)  # hot: the tiny teacher is peaked
    prompts = [backend.chat_prompt([{"role": "user", "content": q}]) for q in ("1 + 2 =", "7 - 3 + 1 =")]
    reqs = [GenerationRequest(prompts[0], dec, s) for s in range(5)] + [
        GenerationRequest(prompts[1], dec, s) for s in range(3)
    ]
    prefill_rows = []
    hook = backend.model.register_forward_pre_hook(
        lambda m, args, kwargs: (
            prefill_rows.append(kwargs["input_ids"].shape) if kwargs.get("logits_to_keep") else None
        ),
        with_kwargs=True,
    )
    together = backend.generate(reqs)
    hook.remove()
    assert [tuple(s)[0] for s in prefill_rows] == [2]  # 8 rows, 2 distinct prompts, one prefill pass
    alone = [TransformersBackend(tiny_teacher, batch_size=1).generate([r])[0] for r in reqs]
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in together[:5]}) > 1  # the samples really differ
    again = backend.generate(reqs)
    assert [c.text for c in again] == [c.text for c in together]  # and are reproducible


def test_nucleus_sampling_keeps_the_smallest_set_over_top_p():
    import math

    import torch

    from distill.teachers.backends.transformers import _sample

    scores = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]] * 4)
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    drawn = {int(t) for _ in range(200) for t in _sample(scores, 1.0, 0.6, g)}
    assert drawn == {0, 1}  # 0.5 < 0.6 needs the second token; the third is never drawn
    assert {int(t) for _ in range(50) for t in _sample(scores, 1.0, 0.4, g)} == {0}
    assert {int(t) for _ in range(300) for t in _sample(scores, 1.0, 1.0, g)} == {0, 1, 2}


@pytest.mark.parametrize("method", ["zero_shot_cot", "self_ask", "least_to_most"])
def test_a_conversation_prompt_keeps_its_system_turn_and_earlier_turns(tiny_teacher, method):
    import json

    from distill.teachers.methods import METHODS

    p = {
        "id": "train-000000",
        "split": "train",
        "question": "What is 2 + 2?",
        "gold": "4",
        "system": "Answer like a pirate.",
        "history": json.dumps([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Ahoy."}]),
    }
    cfg = TeacherConfig(method=method, system_prompt="Be brief.", max_new_tokens=8, max_subquestions=1)
    row = METHODS[method](TransformersBackend(tiny_teacher), [p], cfg, Task("number"))[0]
    prompt = row["prompt"]
    assert prompt.index("Be brief.\n\nAnswer like a pirate.") < prompt.index("What is 2 + 2?")
    if method != "least_to_most":  # decomposition sees the system turn, not the chat so far
        assert prompt.index("Hi there") < prompt.index("Ahoy.") < prompt.index("What is 2 + 2?")
