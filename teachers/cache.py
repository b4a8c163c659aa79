"""CompletionCache: every paid teacher completion, keyed by request hash, in SQLite.

Safe for several worker processes at once (WAL, busy timeout); a row is committed as soon as its
batch returns, so a crash never loses a completion that was paid for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from distill.teachers.backends.base import Completion, GenerationRequest, ScoreRequest, TeacherBackend

log = logging.getLogger("distill.cache")


def _digest(key: str, value: str) -> str:
    return hashlib.sha256(f"{key}\0{value}".encode()).hexdigest()[:32]


class CompletionCache:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Ray calls actors from a thread pool: one connection, shared under a lock.
        self.lock = threading.Lock()
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if "not a database" not in str(e) and "malformed" not in str(e):
                raise
            # Unreadable as a whole: keep the file for inspection, start a fresh cache.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.rename(aside)
            log.warning("completion cache %s is corrupt (%s); moved to %s, starting a new one", self.path, e, aside)
            self.db = self._open()
        self.rejected = 0  # rows whose checksum did not match: treated as misses and regenerated

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        # Switching a new file to WAL takes an exclusive lock, and sqlite answers "database is locked"
        # at once instead of waiting when another worker opens the same new cache at that moment.
        for attempt in range(120):
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 119:
                    raise
                time.sleep(0.25)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS completions "
            "(key TEXT PRIMARY KEY, model TEXT, value TEXT, created REAL, sha TEXT)"
        )
        if "sha" not in {r[1] for r in db.execute("PRAGMA table_info(completions)")}:
            db.execute("ALTER TABLE completions ADD COLUMN sha TEXT")  # caches from before checksums
        return db

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        with self.lock:
            self._get_into(keys, found)
        return found

    def _get_into(self, keys: list[str], found: dict[str, Completion]) -> None:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = f"SELECT key, value, sha FROM completions WHERE key IN ({','.join('?' * len(chunk))})"
            for key, value, sha in self.db.execute(q, chunk):
                try:
                    if sha is not None and sha != _digest(key, value):
                        raise ValueError("checksum mismatch")
                    found[key] = Completion(**json.loads(value), cached=True)
                except (ValueError, TypeError) as e:  # damaged row: not trusted, asked again
                    self.rejected += 1
                    log.warning("cache row %s… is damaged (%s); regenerating it", key[:12], e)

    def put_many(self, model: str, items: list[tuple[str, Completion]]) -> None:
        rows = []
        for k, c in items:
            value = json.dumps({kk: v for kk, v in c.__dict__.items() if kk not in ("cached", "error")})
            rows.append((k, model, value, time.time(), _digest(k, value)))
        with self.lock, self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO completions (key, model, value, created, sha) VALUES (?, ?, ?, ?, ?)", rows
            )

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class CacheMiss(LookupError):
    """A cache-only teacher was asked for a completion it does not have."""


class CachedTeacher:
    """Wraps a backend: answers from the cache when it can, pays (and records) only for misses.

    With ``cache_only`` a miss raises ``CacheMiss`` instead of calling the backend.
    """

    def __init__(self, backend: TeacherBackend, cache: CompletionCache, cache_only: bool = False):
        self.backend = backend
        self.cache = cache
        self.cache_only = cache_only
        self.model_id = backend.model_id
        self.calls = 0  # completions actually generated (paid for)
        self.requests = 0  # every request answered, from the cache or the backend

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str:
        return self.backend.chat_prompt(messages, assistant_prefix)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        return self._answer(requests, self.backend.generate)

    def score(self, requests: list[ScoreRequest]) -> list[Completion]:
        """Teacher scores of given completions (on-policy distillation), cached like completions."""
        if not hasattr(self.backend, "score"):
            from distill.core.errors import DistillError

            raise DistillError(
                f"the teacher {self.model_id} cannot score given text",
                "use a local model teacher or an OpenAI-compatible endpoint with echo + logprobs (vLLM, distill serve)",
            )
        return self._answer(requests, self.backend.score)

    def _answer(self, requests: list, call) -> list[Completion]:
        self.requests += len(requests)
        keys = [r.key(self.model_id) for r in requests]
        hits = self.cache.get_many(list(set(keys)))
        missing = {k: r for k, r in zip(keys, requests) if k not in hits}
        if missing and self.cache_only:
            raise CacheMiss(f"{len(missing)} of {len(keys)} completions are not cached")
        if missing:
            fresh = call(list(missing.values()))
            self.calls += len(fresh)
            new = list(zip(missing.keys(), fresh))
            # A failed call is not a result: it is returned (the row records why) but never cached,
            # so the next run asks again.
            self.cache.put_many(self.model_id, [(k, c) for k, c in new if c.error is None])
            hits.update(new)
        return [hits[k] for k in keys]
