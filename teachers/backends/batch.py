"""Batch-API teacher (``teacher.api: batch``): the chat requests of an OpenAI-compatible endpoint,
sent through its Batch API (``/v1/files`` + ``/v1/batches``), which providers bill at half price and
answer within the batch's completion window.

One ``generate`` call is one or more rounds of batches. A round writes the requests as JSONL lines
``{"custom_id": <request cache key>, "method": "POST", "url": "/v1/chat/completions", "body": ...}``
(the bodies the live chat backend would send; ``max_requests`` per file), uploads the file
(``POST /v1/files``, purpose ``batch``), creates the batch (``POST /v1/batches``), polls
``GET /v1/batches/{id}`` every ``poll_seconds`` until it is completed, failed, expired or cancelled,
downloads its output and error files (``GET /v1/files/{id}/content``) and maps their lines back by
``custom_id``. A request missing from the results (an expired or cancelled batch returns what it
finished) or whose line failed retryably (429/5xx, an expired line) goes into the next round's
batch; after ``rounds`` rounds, or when the endpoint refused its line (4xx), it comes back as a
``Completion`` with ``error`` set: the row records why and a resumed job asks again. Every HTTP call
is retried as the live backend's are (backoff with full jitter, ``Retry-After``); rejected
credentials stop the job (``AuthError``).

Never paid twice: the batches are recorded in the completion cache's SQLite file, in tables of
their own — ``batches`` (one row per uploaded input file: endpoint, model, the batch id once the
endpoint made it, its last status) and ``batch_requests`` (the custom ids each holds, with their
stop strings). The input file is recorded as soon as it is uploaded and the batch id as soon as the
batch exists, before the first poll. A ``generate`` asking for a request a pending batch holds polls
that batch instead of submitting the request again, so a runner killed while it waited resumes
polling; one killed between creating a batch and recording its id finds it among the endpoint's
batches (``GET /v1/batches``) by its input file, and a create retried after a lost reply looks there
first too. The cache file is the place because it already is "what was paid for" and is shared by
every run of the project: a batch one run submitted answers another's identical requests. Every
answered line is handed to ``keep`` (the completion cache's ``put_many``) as soon as the batch's
results are read, lines of requests no caller asks for any more included; only then is the batch
marked collected.

Scoring (``score``, on-policy distillation) is answered live by the chat backend: a training step
cannot wait for a batch.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from distill.core.errors import DistillError
from distill.teachers.backends.base import Completion, GenerationRequest, ScoreRequest
from distill.teachers.backends.openai import (
    RETRY_STATUS,
    AuthError,
    OpenAIBackend,
    backoff_seconds,
    retry_after_seconds,
)

TERMINAL = {"completed", "failed", "expired", "cancelled"}
DONE_LOCALLY = ("collected", "abandoned")  # a batch whose results were read, or that never came to exist
# Error codes of a result line that another batch may answer (the batch ran out of time, or the server failed).
RETRY_CODES = {"batch_expired", "batch_cancelled", "server_error", "internal_error", "rate_limit_exceeded", "timeout"}
QUIET = {"highlight": False, "soft_wrap": True}  # console lines kept whole (one per batch event), unstyled
LIST_PAGES = 20  # pages of 100 batches searched for one whose id was not recorded (the newest are listed first)


@dataclass
class LineFailure:
    """A request a batch did not answer: why, and whether another batch may."""

    reason: str
    retryable: bool


class CallFailed(Exception):
    """A Batch API call the endpoint refused (4xx) or whose retries were spent."""

    def __init__(self, reason: str, retryable: bool, status: int | None = None):
        super().__init__(reason)
        self.retryable, self.status = retryable, status


@dataclass
class PendingBatch:
    """A recorded batch not yet collected: its input file, batch id (None until known), status, and
    the stop strings of each custom id it holds."""

    file_id: str
    batch_id: str | None
    status: str
    stops: dict[str, tuple[str, ...]]


class BatchStore:
    """The batches submitted from one completion cache file (its ``batches`` and ``batch_requests``
    tables). Opened on a file the cache has already opened (and switched to WAL)."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        self.lock = threading.Lock()  # Ray calls actors from a thread pool: one connection, under a lock
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        with self.lock, self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS batches (file_id TEXT PRIMARY KEY, base_url TEXT, model TEXT, "
                "endpoint TEXT, batch_id TEXT, status TEXT, requests INTEGER, created REAL, updated REAL)"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS batch_requests "
                "(custom_id TEXT, file_id TEXT, stop TEXT, PRIMARY KEY (custom_id, file_id))"
            )

    def record(self, file_id: str, base_url: str, model: str, endpoint: str, stops: dict[str, tuple]) -> None:
        """An uploaded input file and the custom ids it holds, before its batch is created."""
        now = time.time()
        with self.lock, self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, NULL, 'submitting', ?, ?, ?)",
                (file_id, base_url, model, endpoint, len(stops), now, now),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO batch_requests VALUES (?, ?, ?)",
                [(k, file_id, json.dumps(list(s))) for k, s in stops.items()],
            )

    def update(self, file_id: str, status: str, batch_id: str | None = None) -> None:
        with self.lock, self.db:
            self.db.execute(
                "UPDATE batches SET status = ?, batch_id = COALESCE(?, batch_id), updated = ? WHERE file_id = ?",
                (status, batch_id, time.time(), file_id),
            )

    def pending(self, base_url: str, model: str, keys: list[str]) -> list[PendingBatch]:
        """The batches of this endpoint and model, not yet collected, that hold any of ``keys``."""
        files: dict[str, tuple] = {}
        with self.lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                q = (
                    "SELECT DISTINCT b.file_id, b.batch_id, b.status FROM batches b JOIN batch_requests r "
                    "ON r.file_id = b.file_id WHERE b.base_url = ? AND b.model = ? AND b.status NOT IN (?, ?) "
                    f"AND r.custom_id IN ({','.join('?' * len(chunk))})"
                )
                for row in self.db.execute(q, (base_url, model, *DONE_LOCALLY, *chunk)):
                    files[row[0]] = row
            out = []
            for file_id, batch_id, status in sorted(files.values()):
                rows = self.db.execute("SELECT custom_id, stop FROM batch_requests WHERE file_id = ?", (file_id,))
                out.append(PendingBatch(file_id, batch_id, status, {k: tuple(json.loads(s)) for k, s in rows}))
        return out

    def close(self) -> None:
        self.db.close()


def batch_progress(cache_path: Path | str, base_url: str, model: str, since: float = 0.0) -> list[dict]:
    """The batches of this endpoint and model recorded in the cache at ``cache_path`` that were created
    or updated since ``since`` or are still pending: id (the input file's while the batch id is unknown),
    status and request count, oldest first; [] when no batch was ever recorded there."""
    if not Path(cache_path).exists():
        return []
    try:
        db = sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        rows = db.execute(
            "SELECT file_id, batch_id, status, requests FROM batches WHERE base_url = ? AND model = ? "
            "AND (updated >= ? OR status NOT IN (?, ?)) ORDER BY created",
            (base_url.rstrip("/"), model, since, *DONE_LOCALLY),
        ).fetchall()
    except sqlite3.Error:  # no batch was ever submitted from this cache
        return []
    finally:
        db.close()
    return [{"id": b or f, "status": s, "requests": n} for f, b, s, n in rows]


def _message(body) -> str:
    """The error message of an OpenAI-shaped error body (or the body itself, shortened)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or body["error"])[:300]
    return json.dumps(body)[:300]


def read_result_line(line: dict, stop: tuple[str, ...]) -> Completion | LineFailure:
    """One line of a batch's output or error file as the request's completion, or why it has none."""
    response, error = line.get("response"), line.get("error")
    if isinstance(response, dict):
        status, body = response.get("status_code"), response.get("body")
        if status == 200:
            try:
                return OpenAIBackend._parse(body, stop)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return LineFailure(f"unreadable result ({type(e).__name__}: {str(e)[:80]})", True)
        return LineFailure(f"HTTP {status}: {_message(body)}", status in RETRY_STATUS)
    if isinstance(error, dict):
        code = error.get("code")
        return LineFailure(f"{code}: {str(error.get('message'))[:300]}", code in RETRY_CODES)
    return LineFailure("a result line with neither a response nor an error", True)


def read_results(raw: bytes, stops: dict[str, tuple[str, ...]]) -> dict[str, Completion | LineFailure]:
    """A batch's output or error file mapped by custom id (ids not in ``stops`` are not ours: skipped)."""
    out: dict[str, Completion | LineFailure] = {}
    for text in raw.decode("utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            key = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line: its request counts as missing and goes in the next batch
        if key in stops:
            out[key] = read_result_line(line, stops[key])
    return out


def _failed(reason: str) -> Completion:
    return Completion("", 0, 0, "error", error=reason)


class BatchBackend:
    """A teacher behind an OpenAI-compatible endpoint's Batch API; ``store`` is the completion cache
    file the batches are recorded in, ``keep(model_id, [(key, completion)])`` caches answered lines."""

    def __init__(
        self,
        model: str,
        base_url: str,
        store: Path | str | None = None,
        keep=None,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int = 6,
        timeout: float = 120.0,
        retry_base: float = 0.5,
        poll_seconds: float = 30.0,
        completion_window: str = "24h",
        max_requests: int = 50000,
        rounds: int = 3,
        **live,
    ):
        """``live``: more ``OpenAIBackend`` settings (concurrency, limits) for the calls answered live (``score``)."""
        self.live = OpenAIBackend(
            model,
            base_url,
            api="chat",
            api_key_env=api_key_env,
            max_retries=max_retries,
            timeout=timeout,
            retry_base=retry_base,
            **live,
        )
        self.model, self.base_url, self.model_id = model, self.live.base_url, self.live.model_id
        self.prefix = urlparse(self.base_url).path.rstrip("/")  # /v1: the lines' url is the endpoint's path
        self.store = BatchStore(store) if store is not None else None
        self.keep = keep
        self.poll_seconds, self.completion_window = poll_seconds, completion_window
        self.max_requests, self.rounds = max_requests, rounds
        self.stats = {"batches": 0, "adopted": 0, "lines": 0}

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str:
        return self.live.chat_prompt(messages, assistant_prefix)

    def score(self, requests: list[ScoreRequest]) -> list[Completion]:
        """Scores of given completions, answered live (``OpenAIBackend.score``)."""
        return self.live.score(requests)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Complete every request through batches (a request asked twice is sent once)."""
        if not requests:
            return []
        if self.store is None:
            raise DistillError(
                "the batch teacher records its batches in the completion cache, and none was given",
                "build BatchBackend with store=<the cache file> (the generate stage does)",
            )
        keys = [r.key(self.model_id) for r in requests]
        done = asyncio.run(self._rounds(dict(zip(keys, requests))))
        return [done[k] for k in keys]

    # --- rounds ---

    async def _rounds(self, todo: dict[str, GenerationRequest]) -> dict[str, Completion]:
        import aiohttp

        done: dict[str, Completion] = {}
        reasons = dict.fromkeys(todo, "never sent")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.live.timeout, sock_read=self.live.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(self.rounds):
                if not todo:
                    break
                entries, fresh = await self._adopt(session, todo, reasons)
                for url, chunk in self._files([(k, todo[k]) for k in fresh]):
                    try:
                        entries.append(await self._submit(session, url, chunk))
                    except CallFailed as e:
                        for key, _, _ in chunk:
                            reasons[key] = f"batch not created: {e}"
                            if not e.retryable:
                                done[key] = _failed(reasons[key])
                for results in await asyncio.gather(*(self._settle(session, e) for e in entries)):
                    for key, outcome in results.items():
                        if key not in todo or key in done:
                            continue  # another caller's request (already cached), or answered by another batch
                        if isinstance(outcome, Completion):
                            done[key] = outcome
                        elif outcome.retryable:
                            reasons[key] = outcome.reason
                        else:
                            done[key] = _failed(outcome.reason)
                todo = {k: r for k, r in todo.items() if k not in done}
        for key in todo:
            done[key] = _failed(f"{reasons[key]} (after {self.rounds} batch rounds)")
        return done

    async def _adopt(self, session, todo: dict, reasons: dict) -> tuple[list[PendingBatch], list[str]]:
        """The recorded batches holding any of ``todo`` (polled, not submitted again) and the keys no
        batch holds. A batch whose id was never recorded is looked up by its input file; one that was
        never created is abandoned and its requests are fresh again."""
        from distill.core.progress import console

        entries, unsure = [], set()
        for e in self.store.pending(self.base_url, self.model, list(todo)):
            if e.batch_id is None:
                try:
                    found = await self._find(session, e.file_id)
                except CallFailed as err:  # unknown whether it exists: its requests wait, none is sent twice
                    for key in e.stops:
                        reasons[key] = f"could not look up the batch of input file {e.file_id}: {err}"
                    unsure.update(e.stops)
                    continue
                if found is None:
                    self.store.update(e.file_id, "abandoned")
                    continue
                e.batch_id, e.status = found["id"], found["status"]
                self.store.update(e.file_id, e.status, e.batch_id)
            ours = len(e.stops.keys() & todo.keys())
            console.print(f"batch {e.batch_id}: polling it again ({ours} of the requests, submitted earlier)", **QUIET)
            self.stats["adopted"] += 1
            entries.append(e)
        held = unsure.union(*(e.stops for e in entries))
        return entries, [k for k in todo if k not in held]

    def _files(self, keys_requests) -> list[tuple[str, list[tuple[str, dict]]]]:
        """The fresh requests as (endpoint url, [(custom id, request)]) batch files, by endpoint, at most
        ``max_requests`` per file."""
        by_url: dict[str, list] = {}
        for key, request in keys_requests:
            path, body = self.live._body(request)
            by_url.setdefault(self.prefix + path, []).append((key, request, body))
        return [
            (url, items[start : start + self.max_requests])
            for url, items in by_url.items()
            for start in range(0, len(items), self.max_requests)
        ]

    async def _submit(self, session, url: str, chunk: list[tuple]) -> PendingBatch:
        """Upload ``chunk`` as a JSONL file, record it, create its batch and record the batch id."""
        import aiohttp

        from distill.core.progress import console

        lines = "".join(
            json.dumps({"custom_id": key, "method": "POST", "url": url, "body": body}, ensure_ascii=False) + "\n"
            for key, _, body in chunk
        ).encode()

        def form():
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", lines, filename="distill-batch.jsonl", content_type="application/jsonl")
            return data

        uploaded = await self._call(session, "POST", "/files", form=form)
        stops = {key: request.decoding.stop for key, request, _ in chunk}
        self.store.record(uploaded["id"], self.base_url, self.model, url, stops)
        batch = await self._create(session, uploaded["id"], url)
        self.store.update(uploaded["id"], batch["status"], batch["id"])
        self.stats["batches"] += 1
        self.stats["lines"] += len(chunk)
        console.print(
            f"batch {batch['id']}: {len(chunk)} requests submitted to {self.base_url} "
            f"(polled every {self.poll_seconds:g}s, window {self.completion_window})",
            **QUIET,
        )
        return PendingBatch(uploaded["id"], batch["id"], batch["status"], stops)

    async def _create(self, session, file_id: str, url: str) -> dict:
        """``POST /batches`` for ``file_id``; a retry first looks for the batch the lost attempt made."""
        body = {"input_file_id": file_id, "endpoint": url, "completion_window": self.completion_window}
        last: CallFailed | None = None
        for attempt in range(self.live.max_retries + 1):
            if attempt:
                found = await self._find(session, file_id)
                if found is not None:
                    return found
                await asyncio.sleep(
                    backoff_seconds(attempt - 1, self.live.retry_base, self.live.retry_cap, self.live.rng)
                )
            try:
                return await self._call(session, "POST", "/batches", json_body=body, retries=0)
            except CallFailed as e:
                if not e.retryable:
                    self.store.update(file_id, "abandoned")
                    raise
                last = e
        raise CallFailed(f"{last} (after {self.live.max_retries + 1} attempts)", True)

    async def _find(self, session, file_id: str) -> dict | None:
        """The endpoint's batch made from input file ``file_id``, or None (``GET /batches``, newest first)."""
        after = None
        for _ in range(LIST_PAGES):
            page = await self._call(session, "GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            for batch in page.get("data") or []:
                if batch.get("input_file_id") == file_id:
                    return batch
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None

    async def _settle(self, session, e: PendingBatch) -> dict[str, Completion | LineFailure]:
        """Poll batch ``e`` until it ends, read its output and error files, cache what it answered and
        mark it collected; every custom id it holds maps to a completion or why it has none. When the
        endpoint cannot be reached the batch stays pending (a later call polls it again); when it
        answers 404 (a restarted ``distill serve``, a deleted batch) the batch is abandoned and its
        requests go in the next round."""
        from distill.core.progress import console

        try:
            batch = await self._wait(session, e)
            results: dict[str, Completion | LineFailure] = {}
            for file_id in (batch.get("error_file_id"), batch.get("output_file_id")):  # answers win
                if file_id:
                    results.update(read_results(await self._call(session, "GET", f"/files/{file_id}/content"), e.stops))
        except CallFailed as err:
            if err.status == 404:  # the endpoint no longer knows the batch or its files: its requests are sent again
                self.store.update(e.file_id, "abandoned")
                console.print(
                    f"batch {e.batch_id} is gone from the endpoint ({err}): sending its requests again", **QUIET
                )
            return {key: LineFailure(f"batch {e.batch_id}: {err}", True) for key in e.stops}
        answered = [(k, c) for k, c in results.items() if isinstance(c, Completion)]
        if self.keep is not None and answered:
            self.keep(self.model_id, answered)
        self.store.update(e.file_id, "collected")
        status = batch["status"]
        if status == "failed":
            why = f"batch {e.batch_id} failed ({_batch_errors(batch)})"
        else:
            why = f"batch {e.batch_id} {status} without an answer to it"
        if status != "completed" or len(answered) < len(e.stops):
            console.print(f"batch {e.batch_id} {status}: {len(answered)} of {len(e.stops)} requests answered", **QUIET)
        for key in e.stops:
            results.setdefault(key, LineFailure(why, True))
        return results

    async def _wait(self, session, e: PendingBatch) -> dict:
        """``GET /batches/{id}`` every ``poll_seconds`` until the batch ends; its status is recorded as it changes."""
        while True:
            batch = await self._call(session, "GET", f"/batches/{e.batch_id}")
            if batch.get("status") != e.status:
                e.status = batch.get("status")
                self.store.update(e.file_id, e.status)
            if e.status in TERMINAL:
                return batch
            await asyncio.sleep(self.poll_seconds)

    async def _call(self, session, method: str, path: str, json_body=None, form=None, retries: int | None = None):
        """One Batch API call, retried as the live backend retries (429/5xx, timeouts, dropped
        connections, unreadable bodies; ``Retry-After`` honoured): the JSON reply, or the bytes of a
        file's content. Raises ``AuthError`` on 401/403 and ``CallFailed`` when refused or retries are spent."""
        import aiohttp

        retries = self.live.max_retries if retries is None else retries
        headers = {k: v for k, v in self.live._headers().items() if k != "Content-Type"}
        raw = path.endswith("/content")
        last = "no attempt made"
        for attempt in range(retries + 1):
            wait = None
            try:
                data = form() if form is not None else None
                async with session.request(
                    method, self.base_url + path, json=json_body, data=data, headers=headers
                ) as resp:
                    body = await resp.read()
                    if resp.status in (401, 403):
                        raise AuthError(
                            f"the teacher endpoint {self.base_url} refused the credentials (HTTP {resp.status})",
                            f"set the API key in the environment variable {self.live.api_key_env}",
                        )
                    if resp.status in RETRY_STATUS:
                        last = f"{method} {path}: HTTP {resp.status}: {body[:200].decode(errors='replace')}"
                        wait = retry_after_seconds(resp.headers.get("Retry-After"))
                    elif resp.status >= 400:
                        detail = body[:300].decode(errors="replace")
                        raise CallFailed(f"{method} {path}: HTTP {resp.status}: {detail}", False, resp.status)
                    elif raw:
                        return body
                    else:
                        try:
                            return json.loads(body)
                        except ValueError as e:
                            last = f"{method} {path}: unreadable response body ({str(e)[:80]})"
            except (AuthError, CallFailed):
                raise
            except asyncio.TimeoutError:
                last = f"{method} {path}: timed out after {self.live.timeout:g}s"
            except (aiohttp.ClientError, ConnectionError) as e:
                last = f"{method} {path}: {type(e).__name__}: {str(e)[:120]}"
            if attempt < retries:
                if wait is None:
                    wait = backoff_seconds(attempt, self.live.retry_base, self.live.retry_cap, self.live.rng)
                await asyncio.sleep(min(wait, self.live.retry_after_cap))
        raise CallFailed(f"{last} (after {retries + 1} attempts)" if retries else last, True)


def _batch_errors(batch: dict) -> str:
    """A failed batch's errors (``errors.data[].message``) as one short phrase."""
    errors = (batch.get("errors") or {}).get("data") or []
    return "; ".join(str(e.get("message") or e.get("code")) for e in errors[:3])[:300] or "no reason given"
