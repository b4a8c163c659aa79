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


@dataclass(frozen=True)
class GenerationRequest:
    """One fully rendered prompt to complete. ``sample`` distinguishes repeated samples."""

    prompt: str
    decoding: Decoding = field(default_factory=Decoding)
    sample: int = 0

    def key(self, model_id: str) -> str:
        """Cache key: model identity, prompt, decoding and sample index — nothing about batching."""
        payload = json.dumps([model_id, self.prompt, asdict(self.decoding), self.sample], sort_keys=True)
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


class TeacherBackend(Protocol):
    """Anything that completes prompts. ``model_id`` identifies the weights for cache keys."""

    model_id: str

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]: ...

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str: ...
