"""`distill serve` speaks the OpenAI protocol: a real server process on loopback serving the tiny
teacher, driven by the official `openai` client (streaming, content parts, errors) and raw HTTP
(SSE framing, auth scheme, missing model). No mock objects."""

import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from serving import served

pytestmark = pytest.mark.integration

QUESTION = "State the final answer to the following arithmetic problem: 3 + 4 ="
PROMPT = "Let's think step by step. First 12 + 7 ="
GREEDY = {"model": "tiny", "max_tokens": 16, "temperature": 0}


def _raw(url: str, body: dict | None = None, auth: str | None = None) -> tuple[int, dict, bytes]:
    """POST ``body`` (GET without one) with an ``Authorization`` header as given: status, headers, body."""
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def secret() -> str:
    return f"sk-distill-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def server(tiny_teacher, secret, tmp_path_factory):
    """`distill serve` on loopback with a token, serving the tiny teacher; yields (url, log file)."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with served(tiny_teacher, log_path, {**os.environ, "DISTILL_SERVE_TOKEN": secret}) as url:
        yield url, log_path


@pytest.fixture(scope="module")
def client(server, secret) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=secret, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_reply(client):
    return client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], **GREEDY)


@pytest.fixture(scope="module")
def text_reply(client):
    return client.completions.create(prompt=PROMPT, **GREEDY)


def test_non_streamed_chat_and_completions_equal_the_local_backend(tiny_teacher, chat_reply, text_reply):
    from distill.teachers.backends.base import Decoding, GenerationRequest
    from distill.teachers.backends.transformers import TransformersBackend

    local = TransformersBackend(tiny_teacher)
    greedy = Decoding(max_new_tokens=16, temperature=0)
    chat_prompt = local.chat_prompt([{"role": "user", "content": QUESTION}])
    want_chat, want_text = local.generate([GenerationRequest(chat_prompt, greedy), GenerationRequest(PROMPT, greedy)])

    assert chat_reply.object == "chat.completion" and chat_reply.model == "tiny"
    (choice,) = chat_reply.choices
    assert choice.message.role == "assistant" and choice.message.content == want_chat.text
    assert choice.finish_reason == want_chat.finish_reason
    usage = chat_reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (want_chat.tokens_in, want_chat.tokens_out)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    assert text_reply.object == "text_completion" and text_reply.model == "tiny"
    assert text_reply.choices[0].text == want_text.text and len(want_text.text) > 0
    assert text_reply.choices[0].finish_reason == want_text.finish_reason
    assert text_reply.usage.completion_tokens == want_text.tokens_out > 0


def test_streamed_chat_deltas_join_to_the_non_streamed_reply(client, chat_reply):
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and {c.model for c in chunks} == {"tiny"}
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    text = chat_reply.choices[0].message.content
    assert "".join(pieces) == text and len(pieces) > 1  # streamed in pieces, not one blob
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == chat_reply.choices[0].finish_reason and set(finishes[:-1]) == {None}
    # include_usage: one last chunk without choices carries the same usage as the plain reply
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == chat_reply.usage.model_dump()


def test_streamed_completion_pieces_join_to_the_non_streamed_text(client, text_reply):
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, **GREEDY))
    assert {c.object for c in chunks} == {"text_completion"}
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == text_reply.choices[0].text and len([p for p in pieces if p]) > 1
    assert chunks[-1].choices[0].finish_reason == text_reply.choices[0].finish_reason
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_stream_is_server_sent_events(server, secret, text_reply):
    status, headers, body = _raw(
        server[0] + "/v1/completions", {**GREEDY, "prompt": PROMPT, "stream": True}, f"Bearer {secret}"
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]  # every event ends with a blank line, [DONE] last
    assert all(e.startswith("data: {") for e in events[:-2])
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]) == text_reply.choices[0].text


def test_content_parts_are_joined_text(client):
    parts = [{"type": "text", "text": "State the final answer"}, {"type": "text", "text": "3 + 4 ="}]
    got = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **GREEDY)
    joined = "State the final answer\n3 + 4 ="
    want = client.chat.completions.create(messages=[{"role": "user", "content": joined}], **GREEDY)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens

    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=[{"role": "user", "content": image}], **GREEDY)
    assert e.value.status_code == 400
    assert 'messages[0].content[1] has type "image_url"' in e.value.message and "text only" in e.value.message


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"max_tokens": 0}, "max_tokens must be in 1..8192, got 0"),
        ({"n": 1.5}, "n must be an integer, got 1.5"),
        ({"n": "two"}, 'n must be an integer, got "two"'),
        ({"n": 0}, "n must be a positive integer, got 0"),
        ({"n": -2}, "n must be a positive integer, got -2"),
        ({"n": 2}, "n must be 1 (send one request per sample"),
    ],
)
def test_bad_fields_are_400s_naming_the_field(client, fields, names):
    for create, what in (
        (client.chat.completions.create, {"messages": [{"role": "user", "content": QUESTION}]}),
        (client.completions.create, {"prompt": PROMPT}),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            create(**what, **{**GREEDY, **fields})
        assert e.value.status_code == 400 and names in e.value.message
        assert e.value.type == "invalid_request_error" and e.value.param == next(iter(fields))


def test_echo_scoring_still_takes_max_tokens_zero(client):
    reply = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    (choice,) = reply.choices
    assert choice.text == PROMPT and reply.usage.completion_tokens == 0
    tokens = choice.logprobs.tokens
    assert "".join(tokens) == PROMPT and len(tokens) == reply.usage.prompt_tokens > 3
    assert choice.logprobs.top_logprobs[0] is None and all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0, stream=True)
    assert "echo scores the prompt in one answer: send stream: false" in e.value.message


def test_another_model_is_404_and_no_model_is_the_served_one(client, server, secret):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            messages=[{"role": "user", "content": QUESTION}], **{**GREEDY, "model": "gpt-4o"}
        )
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.type == "invalid_request_error"
    assert '"gpt-4o" does not exist' in e.value.message and 'serves "tiny"' in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(prompt=PROMPT, **{**GREEDY, "model": "tinyx"})
    assert e.value.code == "model_not_found"

    status, _, body = _raw(server[0] + "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, f"Bearer {secret}")
    assert status == 200 and json.loads(body)["model"] == "tiny"


def test_bearer_scheme_is_case_insensitive(server, secret):
    models = server[0] + "/v1/models"
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, _, body = _raw(models, auth=f"{scheme} {secret}")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    for auth in (f"Basic {secret}", "bearer wrong", secret, f"bearer {secret.upper()}"):
        assert _raw(models, auth=auth)[0] == 401


def _new_lines(log_path, offset: int, pattern: str, timeout: float = 10) -> list[str]:
    """Lines of the server's output after ``offset`` matching ``pattern`` (waits for the first one)."""
    t0 = time.time()
    while True:
        lines = [ln for ln in log_path.read_text()[offset:].splitlines() if re.search(pattern, ln)]
        if lines or time.time() - t0 > timeout:
            return lines
        time.sleep(0.1)


def test_one_access_line_per_request(client, server):
    _, log_path = server
    offset = len(log_path.read_text())
    reply = client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], **GREEDY)
    u = reply.usage
    want = r"distill\.serve INFO POST /v1/chat/completions 200 \d+\.\dms "
    want += rf"prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens}$"
    lines = _new_lines(log_path, offset, r"distill\.serve INFO ")
    assert len(lines) == 1 and re.search(want, lines[0]), lines

    offset = len(log_path.read_text())
    with pytest.raises(openai.NotFoundError):
        client.completions.create(prompt=PROMPT, **{**GREEDY, "model": "nope"})
    lines = _new_lines(log_path, offset, r"distill\.serve INFO ")
    assert len(lines) == 1 and re.search(
        r"POST /v1/completions 404 \d+\.\dms prompt_tokens=0 completion_tokens=0$", lines[0]
    )

    offset = len(log_path.read_text())
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, **GREEDY))
    assert chunks[-1].choices[0].finish_reason is not None
    lines = _new_lines(log_path, offset, r"distill\.serve INFO ")
    assert len(lines) == 1 and re.search(
        r"POST /v1/completions 200 \d+\.\dms prompt_tokens=\d+ completion_tokens=[1-9]", lines[0]
    )
