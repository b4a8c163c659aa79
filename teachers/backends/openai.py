"""OpenAI-compatible HTTP teacher: vLLM, TGI, llama.cpp server, OpenAI, or ``distill serve``.

Async with a concurrency cap, requests-per-minute and tokens-per-minute limits, and retries with
exponential backoff and full jitter on 429/5xx, timeouts, dropped connections and unreadable
bodies; ``Retry-After`` is honoured. The limits hold for the whole job: Ray workers share one count
(``distill.teachers.limits``), and a ``Retry-After`` on a 429 or 503 pauses every worker. A request whose retries are spent comes back as a
``Completion`` with ``error`` set (the row records why, the cache does not keep it, a resumed job
asks again). The API key is read from an environment variable and never stored anywhere.

Prompts: methods build prompts with ``chat_prompt`` and extend them by string concatenation (the
two-stage zero-shot CoT appends the rationale and the answer trigger). For the chat API the prompt
is therefore encoded as ``CHAT_MARK + json(messages) + PREFIX_MARK + assistant prefix``: anything
appended lands in the assistant prefix, which is sent as a final assistant message to continue
(``continue_final_message``, as vLLM and ``distill serve`` accept).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time

from distill.core.errors import DistillError
from distill.teachers.backends.base import Completion, GenerationRequest, ScoreRequest, render_chat
from distill.teachers.limits import SEND_MARGIN, Limits, LocalLimiter, lease_ttl, make_limiter

CHAT_MARK = "\x02chat:"
PREFIX_MARK = "\x1e"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
PAUSE_STATUS = {429, 503}  # the endpoint says "not now" to everyone: its Retry-After pauses every worker


def encode_chat(messages: list[dict], assistant_prefix: str = "") -> str:
    return CHAT_MARK + json.dumps(messages, ensure_ascii=False, sort_keys=True) + PREFIX_MARK + assistant_prefix


def decode_chat(prompt: str) -> tuple[list[dict], str] | None:
    """(messages, assistant prefix) for an encoded chat prompt; None for plain text."""
    if not prompt.startswith(CHAT_MARK):
        return None
    body, _, prefix = prompt[len(CHAT_MARK) :].partition(PREFIX_MARK)
    return json.loads(body), prefix


class AuthError(DistillError):
    """The endpoint refused the credentials: no row can succeed, so the job stops at once."""


class RateLimiter(LocalLimiter):
    """Requests-per-minute and tokens-per-minute caps over a sliding window (0 = no cap), in process."""

    def __init__(self, rpm: float = 0, tpm: float = 0, window: float = 60.0):
        super().__init__(Limits(rpm, tpm, 0, window))


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * 2**attempt))


class OpenAIBackend:
    """A teacher behind an OpenAI-compatible endpoint (``/v1/chat/completions`` or ``/v1/completions``)."""

    def __init__(
        self,
        model: str,
        base_url: str,
        api: str = "chat",
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        max_retries: int = 6,
        timeout: float = 120.0,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        retry_after_cap: float = 300.0,
        limits_bucket: str | None = None,
        workers: int = 1,
    ):
        """``limits_bucket``: the job's shared limit bucket (a Ray worker of a job of ``workers``);
        without one the limits are counted in this process."""
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.max_retries = max_retries
        self.timeout = timeout
        self.retry_base, self.retry_cap, self.retry_after_cap = retry_base, retry_cap, retry_after_cap
        # The served model's name is its identity; the URL is not (moving a server keeps the cache).
        self.model_id = f"openai:{model}"
        self.rng = random.Random()
        self.stats = {"attempts": 0, "retries": 0, "failed": 0}
        # One limiter for the backend's life: the window carries over from batch to batch.
        self.limits = Limits(requests_per_minute, tokens_per_minute, concurrency, margin=SEND_MARGIN)
        self.limiter = make_limiter(self.limits, lease_ttl(timeout), limits_bucket, workers)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str:
        if self.api == "chat":
            return encode_chat(messages, assistant_prefix)
        # Completions API: the server sees raw text; a template-less rendering.
        return render_chat(None, messages, assistant_prefix)

    def _body(self, r: GenerationRequest) -> tuple[str, dict]:
        d = r.decoding
        body: dict = {"model": self.model, "max_tokens": d.max_new_tokens, "temperature": d.temperature}
        if d.temperature > 0:
            body.update(top_p=d.top_p, seed=r.sample)  # the sample index makes each path reproducible
        if d.stop:
            body["stop"] = list(d.stop)[:4]
        chat = decode_chat(r.prompt)
        if chat is None:
            return "/completions", {**body, "prompt": r.prompt}
        messages, prefix = chat
        if prefix:
            messages = messages + [{"role": "assistant", "content": prefix}]
            body.update(continue_final_message=True, add_generation_prompt=False)
        return "/chat/completions", {**body, "messages": messages}

    @staticmethod
    def _parse(payload: dict, stop: tuple[str, ...]) -> Completion:
        choice = payload["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        if not isinstance(text, str):
            raise ValueError("choice has no text")
        for s in stop:  # servers cap stop lists at 4; apply every stop string ourselves
            if s in text:
                text = text[: text.index(s)]
        usage = payload.get("usage") or {}
        finish = choice.get("finish_reason") or "stop"
        return Completion(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), finish)

    async def _one(self, session, sem, path: str, body: dict, estimate: int, parse) -> Completion:
        """POST ``body`` to ``path`` with retries; ``parse(payload)`` turns the reply into a Completion.

        Each attempt takes a lease from the limiter (every attempt counts at the endpoint) and gives it
        back with the reply's real token usage; a 429/503's ``Retry-After`` pauses the limiter, so the
        retry, and every other worker's next request, waits it out there."""
        import aiohttp

        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            wait = None
            async with sem:
                lease = await self.limiter.acquire(estimate)
                used = None
                self.stats["attempts"] += 1
                try:
                    async with session.post(self.base_url + path, json=body, headers=self._headers()) as resp:
                        raw = await resp.read()
                        if resp.status in (401, 403):
                            raise AuthError(
                                f"the teacher endpoint {self.base_url} refused the credentials (HTTP {resp.status})",
                                f"set the API key in the environment variable {self.api_key_env}",
                            )
                        if resp.status in RETRY_STATUS:
                            last = f"HTTP {resp.status}: {raw[:200].decode(errors='replace')}"
                            wait = retry_after_seconds(resp.headers.get("Retry-After"))
                            if wait is not None and resp.status in PAUSE_STATUS:
                                self.limiter.pause(min(wait, self.retry_after_cap))
                                wait = 0.0  # the limiter holds the retry until then
                        elif resp.status >= 400:  # the request itself is wrong: retrying cannot help
                            detail = raw[:300].decode(errors="replace")
                            self.stats["failed"] += 1
                            return Completion("", 0, 0, "error", error=f"HTTP {resp.status}: {detail}")
                        else:
                            try:
                                c = parse(json.loads(raw))
                                used = (c.tokens_in + c.tokens_out) or None  # no usage: keep the estimate
                                return c
                            except (ValueError, KeyError, IndexError, TypeError) as e:
                                last = f"unreadable response body ({type(e).__name__}: {str(e)[:80]})"
                except AuthError:
                    raise
                except asyncio.TimeoutError:
                    last = f"timed out after {self.timeout:g}s"
                except (aiohttp.ClientError, ConnectionError) as e:
                    last = f"{type(e).__name__}: {str(e)[:120]}"
                finally:
                    self.limiter.release(lease, used)
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                if wait is not None:
                    wait = min(wait, self.retry_after_cap)
                else:
                    wait = backoff_seconds(attempt, self.retry_base, self.retry_cap, self.rng)
                await asyncio.sleep(wait)
        self.stats["failed"] += 1
        return Completion("", 0, 0, "error", error=f"{last} (after {self.max_retries + 1} attempts)")

    async def _run(self, calls: list[tuple]) -> list[Completion]:
        """Every ``(path, body, estimated tokens, parse)`` call, at most ``concurrency`` in flight here
        (and, through the limiter, in the whole job)."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        sem = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [asyncio.ensure_future(self._one(session, sem, *call)) for call in calls]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
            finally:
                self.limiter.flush()  # the last releases, before this event loop ends

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Complete every request concurrently (at most ``concurrency`` in flight)."""
        if not requests:
            return []
        calls = []
        for r in requests:
            path, body = self._body(r)
            estimate = len(r.prompt) // 4 + r.decoding.max_new_tokens
            calls.append((path, body, estimate, lambda payload, stop=r.decoding.stop: self._parse(payload, stop)))
        return asyncio.run(self._run(calls))

    def score(self, requests: list[ScoreRequest]) -> list[Completion]:
        """The teacher's top-k log-probabilities on each given completion, through ``/v1/completions``
        with ``echo`` (prompt + completion sent as one text, ``max_tokens: 1``, as lm-eval scores text
        on vLLM). A chat prompt is sent as plain text there: a completions endpoint applies no chat
        template. Token ids come back where the server honours vLLM's ``return_tokens_as_token_ids``
        (``distill serve`` does); elsewhere ``topk_ids`` is None and only the ULD loss can use them."""
        if not requests:
            return []
        calls = []
        for r in requests:
            chat = decode_chat(r.prompt)
            prompt = render_chat(None, *chat) if chat is not None else r.prompt
            body = {
                "model": self.model,
                "prompt": prompt + r.completion,
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": r.logprobs,
                "return_tokens_as_token_ids": True,
            }
            span = (len(prompt), len(prompt) + len(r.completion))
            estimate = (len(prompt) + len(r.completion)) // 4 + 1
            calls.append(
                ("/completions", body, estimate, lambda payload, r=r, span=span: parse_scores(payload, r, span))
            )
        return asyncio.run(self._run(calls))


def _token_id(token: str) -> int | None:
    """``token_id:123`` (vLLM's ``return_tokens_as_token_ids``) is 123; any other token string None."""
    if token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    return None


def parse_scores(payload: dict, r: ScoreRequest, span: tuple[int, int]) -> Completion:
    """The echoed completion's tokens and top-k from an OpenAI completions ``logprobs`` object: the
    tokens whose ``text_offset`` falls in ``span`` (the completion's characters), top-k by value."""
    lp = payload["choices"][0].get("logprobs")
    if not isinstance(lp, dict) or "text_offset" not in lp or "top_logprobs" not in lp:
        raise ValueError("no echoed log-probabilities in the reply (the endpoint needs echo + logprobs)")
    ids, top_ids, top_lps = [], [], []
    for offset, token, top in zip(lp["text_offset"], lp["tokens"], lp["top_logprobs"]):
        if not span[0] <= offset < span[1]:
            continue
        if not isinstance(top, dict) or not top:
            raise ValueError("a completion token came back without top log-probabilities")
        best = sorted(top.items(), key=lambda kv: -float(kv[1]))[: r.logprobs]
        ids.append(_token_id(str(token)))
        top_ids.append([_token_id(str(t)) for t, _ in best])
        top_lps.append([float(v) for _, v in best])
    known = all(i is not None for i in ids) and all(i is not None for row in top_ids for i in row)
    usage = payload.get("usage") or {}
    return Completion(
        r.completion,
        int(usage.get("prompt_tokens", 0)),
        0,
        "stop",
        token_ids=ids if known else None,
        topk_ids=top_ids if known else None,
        topk_logprobs=top_lps,
    )
