"""Pure pieces of the HTTP teacher: chat encoding, Retry-After, backoff, rate limits, recipe rules."""

import asyncio
import email.utils
import random
import time

import pytest

from distill.config import content_hash, load_recipe
from distill.core.errors import DistillError
from distill.teachers.backends.openai import RateLimiter, backoff_seconds, decode_chat, encode_chat, retry_after_seconds


def test_chat_prompt_survives_concatenation():
    """Methods extend prompts by appending text; for the chat API that text joins the assistant turn."""
    messages = [{"role": "user", "content": "2 + 2 = ?\n\x1e odd bytes é"}]
    prompt = encode_chat(messages, "Let's think step by step.") + " It is 4.\nTherefore"
    got, prefix = decode_chat(prompt)
    assert got == messages and prefix == "Let's think step by step. It is 4.\nTherefore"
    assert decode_chat("plain text") is None


def test_retry_after_forms():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.25") == 0.25
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(date) <= 31


def test_backoff_is_capped_full_jitter():
    rng = random.Random(0)
    waits = [backoff_seconds(a, 0.5, 4.0, rng) for a in range(10) for _ in range(50)]
    assert all(0 <= w <= 4.0 for w in waits)
    first = [backoff_seconds(0, 0.5, 4.0, rng) for _ in range(200)]
    assert max(first) <= 0.5 and min(first) < 0.1  # jitter spreads retries out


def test_rate_limiter_holds_requests_and_tokens_to_the_window():
    async def run(limiter, n, tokens):
        t0 = time.monotonic()
        for _ in range(n):
            await limiter.acquire(tokens)
        return time.monotonic() - t0

    assert asyncio.run(run(RateLimiter(rpm=3, window=0.3), 3, 1)) < 0.2  # within the cap: no wait
    assert asyncio.run(run(RateLimiter(rpm=3, window=0.3), 4, 1)) >= 0.29  # the 4th waits for the window
    assert asyncio.run(run(RateLimiter(tpm=100, window=0.3), 2, 60)) >= 0.29  # 120 tokens > 100 per window
    assert asyncio.run(run(RateLimiter(), 100, 10**6)) < 0.1  # no caps


def test_recipe_rules_for_http_teachers():
    with pytest.raises(DistillError, match="base_url"):
        load_recipe(None, ["teacher.model=openai:gpt-4o-mini"])
    with pytest.raises(DistillError, match="environment variable"):
        load_recipe(None, ["teacher.api_key=sk-123"])
    a = load_recipe(None, ["teacher.model=openai:m", "teacher.base_url=http://127.0.0.1:1/v1"])
    b = load_recipe(
        None,
        [
            "teacher.model=openai:m",
            "teacher.base_url=http://10.0.0.2:8000/v1",
            "teacher.concurrency=64",
            "teacher.max_retries=2",
            "teacher.requests_per_minute=30",
        ],
    )
    assert content_hash(a.teacher) == content_hash(b.teacher)  # how it is reached is not what it answers
