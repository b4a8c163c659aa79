"""Teacher scoring of given text (on-policy distillation): the local backend against a plain forward
pass, the completion cache, an OpenAI-compatible reply read back, and the on-policy example layout."""

import math

import pytest


@pytest.fixture(scope="module")
def backend(tiny_teacher):
    from distill.teachers.backends.transformers import TransformersBackend

    return TransformersBackend(tiny_teacher, batch_size=2)


def test_local_scores_are_the_models_next_token_distribution(backend):
    import torch

    from distill.teachers.backends.base import ScoreRequest

    prompt = backend.chat_prompt([{"role": "user", "content": "What is 2 + 5?"}])
    requests = [
        ScoreRequest(prompt, "Let's think step by step. 2 + 5 = 7.", 4),
        ScoreRequest(prompt, " So the answer is 7.", 4),
        ScoreRequest(prompt + "Let's", " think", 2),
    ]
    out = backend.score(requests)
    tok = backend.tokenizer
    for r, c in zip(requests, out):
        p = tok(r.prompt, add_special_tokens=False).input_ids
        ids = tok(r.completion, add_special_tokens=False).input_ids
        with torch.inference_mode():
            logits = backend.model(input_ids=torch.tensor([p + ids])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        assert c.token_ids == ids and c.tokens_in == len(p) + len(ids) and c.tokens_out == 0
        assert len(c.topk_ids) == len(c.topk_logprobs) == len(ids)
        for j in range(len(ids)):
            values, top = lp[len(p) - 1 + j].topk(r.logprobs)
            assert c.topk_ids[j] == top.tolist()
            assert max(abs(a - b) for a, b in zip(c.topk_logprobs[j], values.tolist())) < 1e-5


def test_scores_are_cached_and_keyed_apart_from_generations(backend, tmp_path):
    from distill.teachers.backends.base import Decoding, GenerationRequest, ScoreRequest
    from distill.teachers.cache import CachedTeacher, CompletionCache

    calls = []

    class Counting:
        model_id = backend.model_id

        def score(self, requests):
            calls.append(len(requests))
            return backend.score(requests)

    teacher = CachedTeacher(Counting(), CompletionCache(tmp_path / "c.sqlite"))
    reqs = [ScoreRequest("Q: 1 + 2\nA:", " 3", 3), ScoreRequest("Q: 1 + 2\nA:", " 4", 3)]
    first = teacher.score(reqs)
    again = CachedTeacher(Counting(), CompletionCache(tmp_path / "c.sqlite")).score(reqs)
    assert calls == [2] and all(c.cached for c in again) and not any(c.cached for c in first)
    assert [c.topk_logprobs for c in again] == [c.topk_logprobs for c in first]
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    gen = GenerationRequest("Q: 1 + 2\nA:", Decoding(max_new_tokens=1))
    assert len({reqs[0].key("m"), reqs[1].key("m"), gen.key("m"), ScoreRequest("Q: 1 + 2\nA:", " 3", 4).key("m")}) == 4


def test_openai_echo_reply_is_read_by_character_span():
    """A vLLM-shaped `/v1/completions` echo reply: only the completion's tokens are kept, top-k by value."""
    from distill.teachers.backends.base import ScoreRequest
    from distill.teachers.backends.openai import parse_scores

    prompt, completion = "The step of boiling water is:", " 1 2"
    payload = {
        "choices": [
            {
                "text": prompt + completion + "3",
                "logprobs": {
                    "text_offset": [0, 3, 8, 11, 19, 25, 28, 29, 31, 33],
                    "tokens": ["The", " step", " of", " boiling", " water", " is", ":", " 1", " 2", "3"],
                    "token_logprobs": [None, -8.8, -1.5, -13.6, -2.0, -2.2, -8.5, -1.3, -0.4, -0.1],
                    "top_logprobs": [
                        None,
                        {" is": -0.8},
                        {" of": -1.5},
                        {" the": -0.2},
                        {" water": -2.0},
                        {" is": -2.2},
                        {":": -8.5, " a": -0.4},
                        {" 1": -1.3, " the": -0.9, " a": -2.5},
                        {" 2": -0.4, ".": -1.7, " 3": -3.0},
                        {"3": -0.1},
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 10},
    }
    c = parse_scores(payload, ScoreRequest(prompt, completion, 2), (len(prompt), len(prompt) + len(completion)))
    assert c.topk_logprobs == [[-0.9, -1.3], [-0.4, -1.7]] and c.tokens_in == 10
    assert c.token_ids is None and c.topk_ids is None  # token strings only: usable by ULD, not by JSD
    payload["choices"][0]["logprobs"]["tokens"][7:9] = ["token_id:16", "token_id:17"]
    payload["choices"][0]["logprobs"]["top_logprobs"][7:9] = [
        {"token_id:16": -1.3, "token_id:5": -0.9},
        {"token_id:17": -0.4, "token_id:2": -1.7},
    ]
    c = parse_scores(payload, ScoreRequest(prompt, completion, 2), (len(prompt), len(prompt) + len(completion)))
    assert c.token_ids == [16, 17] and c.topk_ids == [[5, 16], [17, 2]]
    with pytest.raises(ValueError, match="echo"):
        parse_scores({"choices": [{"text": "x", "logprobs": None}]}, ScoreRequest("a", "b", 1), (1, 2))


def test_on_policy_steps_follow_lambda_by_seed():
    from distill.config import OnPolicySettings
    from distill.students.on_policy import OnPolicy

    def picked(lmbda, seed):
        op = OnPolicy(None, None, None, "", OnPolicySettings(lmbda=lmbda), "jsd", 8, 64, seed)
        return [s for s in range(400) if op.use(s)]

    assert picked(0.0, 0) == [] and picked(1.0, 0) == list(range(400))
    assert picked(0.25, 3) == picked(0.25, 3) != picked(0.25, 4)
    n = len(picked(0.25, 3))
    assert abs(n - 100) < 3 * math.sqrt(400 * 0.25 * 0.75)


def test_on_policy_examples_put_the_teachers_distribution_on_each_sampled_token(backend, tiny_teacher):
    """The student's samples come back as KD examples: loss only on the sampled tokens, the teacher's
    top-k at each (shared tokenizer: as the teacher tokenized the text; ULD: by index on the student's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import OnPolicySettings
    from distill.students.data import prompt_template, render_prompt
    from distill.students.on_policy import OnPolicy
    from distill.teachers.backends.base import ScoreRequest

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)  # the teacher samples as its own student
    template = prompt_template(tok)
    questions = ["What is 2 + 5?", "What is 1 + 8?", "What is 2 + 5?"]
    for loss in ("jsd", "uld"):
        op = OnPolicy(
            backend,
            lambda q: backend.chat_prompt([{"role": "user", "content": q}]),
            tok,
            template,
            OnPolicySettings(topk=3, max_new_tokens=12),
            loss,
            12,
            128,
            seed=1,
        )
        examples = op.examples(model, questions, step=5)
        assert [e["question"] for e in examples] == questions[:2]  # one sample per distinct question
        again = op.examples(model, questions, step=5)
        assert [e["input_ids"] for e in again] == [e["input_ids"] for e in examples]  # seeded by step
        for e in examples:
            p = tok(render_prompt(template, e["question"]), add_special_tokens=False).input_ids
            assert e["input_ids"][: len(p)] == p and e["labels"][: len(p)] == [-100] * len(p)
            body = e["input_ids"][len(p) :]
            assert e["labels"][len(p) :] == body and e["kd_pos"] == list(range(len(p), len(e["input_ids"])))
            text = tok.decode(body, skip_special_tokens=True)
            score = backend.score([ScoreRequest(op.teacher_prompt(e["question"]), text, 3)])[0]
            assert e["kd_logprobs"] == score.topk_logprobs[: len(body)]
            assert ("kd_ids" in e) == (loss == "jsd")
            if loss == "jsd":
                assert e["kd_ids"] == score.topk_ids[: len(body)]
        assert op.state["samples"] == op.state["scored"] == 4 and op.state["steps"] == 2
        assert op.state["teacher_tokens"] > 0 and op.state["sampled_tokens"] >= sum(len(e["kd_pos"]) for e in examples)
