"""The teacher backend contract: ``generate(requests) -> list[Completion]``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Decoding:
    """Decoding parameters; part of every cache key."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # also return the top-k log-probabilities of every generated token (0 = off)


@dataclass(frozen=True)
class GenerationRequest:
    """One fully rendered prompt to complete. ``sample`` distinguishes repeated samples."""

    prompt: str
    decoding: Decoding = field(default_factory=Decoding)
    sample: int = 0

    def key(self, model_id: str) -> str:
        """Cache key: model identity, prompt, decoding and sample index — nothing about batching."""
        decoding = asdict(self.decoding)
        if not decoding["logprobs"]:  # keys written before the field existed stay valid
            del decoding["logprobs"]
        payload = json.dumps([model_id, self.prompt, decoding, self.sample], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class ScoreRequest:
    """Score a given ``completion`` after ``prompt``: the teacher's top-``logprobs`` next-token
    log-probabilities at every completion token (on-policy distillation scores the student's samples)."""

    prompt: str
    completion: str
    logprobs: int = 20

    def key(self, model_id: str) -> str:
        """Cache key: model identity, prompt, completion and k; tagged apart from generation keys."""
        payload = json.dumps(["score", model_id, self.prompt, self.completion, self.logprobs], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Completion:
    """What the teacher wrote for one request."""

    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str  # "stop" | "length" | "error"
    cached: bool = False
    error: str | None = None  # set when the call failed for good (retries spent); never cached
    # With Decoding.logprobs = k: the generated token ids, and per token the teacher's k most likely
    # next tokens and their log-probabilities (at temperature 1, before sampling warpers).
    token_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def render_chat(tokenizer, messages: list[dict], assistant_prefix: str = "") -> str:
    """Messages as one prompt string: the tokenizer's chat template, or plain text when there is no
    tokenizer or it has no template. Every local backend renders through here, so the same weights
    get the same prompts (and cache keys) whichever engine runs them."""
    if tokenizer is not None and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{m['content']}\n\n" for m in messages)
    return text + assistant_prefix


class TeacherBackend(Protocol):
    """Anything that completes prompts. ``model_id`` identifies the weights for cache keys."""

    model_id: str

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str: ...


class ScoringBackend(TeacherBackend, Protocol):
    """A teacher that also scores given text: ``score(requests)`` returns one ``Completion`` per
    request whose ``text`` is the completion, ``token_ids`` its tokens in the teacher's vocabulary and
    ``topk_ids``/``topk_logprobs`` the teacher's distribution before each of them (``topk_ids`` is None
    where an endpoint returns log-probabilities without token ids); ``tokens_in`` counts all the
    tokens the teacher read, ``tokens_out`` is 0."""

    def score(self, requests: list[ScoreRequest]) -> list[Completion]: ...
