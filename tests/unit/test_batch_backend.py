"""The batch teacher's pieces on hand-written cases: result lines mapped back by custom_id (answers,
retryable and refused failures, OpenAI's expired lines, damaged lines), the batch store beside the
completion cache, and the recipe keys of ``teacher.api: batch``."""

import json

import pytest

from distill.config import TeacherConfig, content_hash, load_recipe
from distill.core.errors import DistillError
from distill.teachers.backends.base import Completion
from distill.teachers.backends.batch import BatchStore, LineFailure, batch_progress, read_result_line, read_results
from distill.teachers.cache import CompletionCache


def _answer(text: str, status: int = 200) -> dict:
    body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    return {"id": "batch_req_1", "custom_id": "a", "response": {"status_code": status, "body": body}, "error": None}


def test_an_answered_line_is_the_completion_with_its_stop_strings_applied():
    c = read_result_line(_answer("The answer is 4.\nMore"), ("\n",))
    assert isinstance(c, Completion)
    assert (c.text, c.tokens_in, c.tokens_out, c.finish_reason, c.error) == ("The answer is 4.", 7, 3, "stop", None)


@pytest.mark.parametrize(
    "line, reason, retryable",
    [
        (
            {"response": {"status_code": 500, "body": {"error": {"message": "boom"}}}},
            "HTTP 500: boom",
            True,
        ),
        (
            {"response": {"status_code": 429, "body": {"error": {"message": "slow down"}}}},
            "HTTP 429: slow down",
            True,
        ),
        (
            {"response": {"status_code": 400, "body": {"error": {"message": "max_tokens too big"}}}},
            "HTTP 400: max_tokens too big",
            False,
        ),
        (  # OpenAI lists the lines an expired batch never ran in its error file
            {"response": None, "error": {"code": "batch_expired", "message": "This request could not be executed"}},
            "batch_expired: This request could not be executed",
            True,
        ),
        ({"response": None, "error": {"code": "invalid_prompt", "message": "no"}}, "invalid_prompt: no", False),
        ({"response": {"status_code": 200, "body": {"choices": []}}}, "unreadable result (IndexError: ", True),
        ({"response": None, "error": None}, "a result line with neither a response nor an error", True),
    ],
)
def test_a_failed_line_says_why_and_whether_another_batch_may_answer_it(line, reason, retryable):
    f = read_result_line({"custom_id": "a", **line}, ())
    assert isinstance(f, LineFailure) and f.reason.startswith(reason) and f.retryable is retryable


def test_result_files_map_back_by_custom_id_skipping_damaged_and_foreign_lines():
    lines = [
        {**_answer("two"), "custom_id": "b"},
        {**_answer("one"), "custom_id": "a"},
        {**_answer("not ours"), "custom_id": "z"},
    ]
    raw = ("\n".join(json.dumps(x) for x in lines) + "\n{not json\n\n").encode()
    out = read_results(raw, {"a": (), "b": (), "c": ()})
    assert {k: v.text for k, v in out.items()} == {"a": "one", "b": "two"}  # c is missing: the next round's


def test_the_store_records_batches_beside_the_completions_until_collected(tmp_path):
    path = tmp_path / "cache.sqlite"
    cache = CompletionCache(path)
    store = BatchStore(path)
    url = "http://127.0.0.1:1/v1"
    store.record("file-1", url, "m", "/v1/chat/completions", {"a": ("\n",), "b": ()})
    store.record("file-2", url, "m", "/v1/chat/completions", {"c": ()})
    (pending,) = store.pending(url, "m", ["a", "x"])
    assert (pending.file_id, pending.batch_id, pending.status) == ("file-1", None, "submitting")
    assert pending.stops == {"a": ("\n",), "b": ()}  # every id the batch holds, not only those asked
    assert store.pending(url, "other-model", ["a"]) == [] and store.pending(url + "x", "m", ["a"]) == []
    store.update("file-1", "in_progress", "batch_1")
    assert store.pending(url, "m", ["b"])[0].batch_id == "batch_1"
    store.update("file-1", "collected")
    store.update("file-2", "abandoned")
    assert store.pending(url, "m", ["a", "b", "c"]) == []
    assert batch_progress(path, url, "m") == [
        {"id": "batch_1", "status": "collected", "requests": 2},
        {"id": "file-2", "status": "abandoned", "requests": 1},
    ]
    assert batch_progress(path, url, "m", since=1e12) == []  # nothing pending, nothing new
    # The completion cache shares the file and is untouched by the batch tables.
    cache.put_many("m", [("a", Completion("x", 1, 1, "stop"))])
    assert len(cache) == 1 and CompletionCache(path).get_many(["a"])["a"].text == "x"
    assert batch_progress(tmp_path / "none.sqlite", url, "m") == []


def test_api_batch_keys_validate_and_leave_the_stage_hash_alone():
    base = {"model": "openai:m", "base_url": "http://127.0.0.1:1/v1", "api": "batch"}
    a = TeacherConfig(**base)
    b = TeacherConfig(**base, batch={"poll_seconds": 0.2, "max_requests": 10, "rounds": 5})
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(TeacherConfig(**{**base, "api": "chat"}))
    with pytest.raises(DistillError, match="teacher.api=batch sends the requests through"):
        load_recipe(None, ["teacher.api=batch"])
    with pytest.raises(DistillError, match="teacher.batch.completion_window"):
        load_recipe(
            None,
            ["teacher.model=openai:m", "teacher.base_url=x", "teacher.api=batch", "teacher.batch.completion_window=1d"],
        )
    r = load_recipe(
        None, ["teacher.model=openai:m", "teacher.base_url=x", "teacher.api=batch", "teacher.batch.poll_seconds=0.2"]
    )
    assert r.teacher.batch.poll_seconds == 0.2


def test_the_readme_batch_recipe_loads():
    import re
    from pathlib import Path

    import yaml

    from distill.config import recipe_from_dict

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- batch-teacher -->\n```yaml\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- batch-teacher --> block"
    teacher = recipe_from_dict(yaml.safe_load(block.group(1))).teacher
    assert (teacher.api, teacher.batch_size, teacher.batch.poll_seconds) == ("batch", 5000, 60)
