"""``distill serve``: a local teacher behind an OpenAI-compatible HTTP endpoint.

``POST /v1/chat/completions`` and ``/v1/completions`` (``GET /v1/models``, ``GET /health``).
Concurrent requests are gathered for a few milliseconds and generated as one length-bucketed
batch. Binds to 127.0.0.1 by default; any other address needs a token (from an environment
variable, never the command line), which clients send as their API key
(``Authorization: Bearer <token>``).

Chat requests whose last message is from the assistant with ``continue_final_message: true``
continue that message (the prefix of a zero-shot CoT turn), as vLLM does.

Completions with ``echo: true`` and ``logprobs: k`` score the prompt instead of continuing it (the
OpenAI/vLLM contract lm-eval and on-policy distillation use): ``tokens``, ``token_logprobs``,
``top_logprobs`` (``null`` for the first token) and ``text_offset`` of every prompt token;
``return_tokens_as_token_ids: true`` names tokens ``token_id:<id>``, as vLLM does.

``stream: true`` answers in server-sent events, OpenAI's chunk format (``chat.completion.chunk``
deltas, ``text_completion`` text pieces, a last chunk with ``finish_reason``, ``data: [DONE]``).
The backend generates whole batches, so a completion is streamed once it is finished, in
token-sized pieces. Message ``content`` may be a list of text parts (joined with newlines, as vLLM
does). A request naming another ``model`` than the served one gets OpenAI's 404 ``model_not_found``;
bad fields get a 400 naming the field. Every request logs one access line (method, path, status,
duration, tokens) to the ``distill.serve`` logger.

The Batch API (``/v1/files``, ``/v1/batches``, see ``BatchAPI``) runs a batch's lines through the
same checks and batcher as the live endpoints, in the background; ``BatchFaults`` (hidden
``--batch-*`` options) make batches expire part-way, lines fail or batches wait, for tests.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from distill.core.errors import DistillError
from distill.teachers.backends.base import Decoding, GenerationRequest

log = logging.getLogger("distill.serve")

MAX_TOKENS = 8192  # the most new tokens one request may ask for
STREAM_PIECE = 16  # characters per streamed piece when the tokenizer cannot give token offsets


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status and the OpenAI error fields to send back."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def _integer(body: dict, key: str, default: int) -> int:
    """``body[key]`` as an int, ``default`` when absent or null; a fraction, string or bool is refused
    (``int()`` would turn 1.5 into 1 and "x" into a 500)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {json.dumps(value)}", key)
    return value


def _number(body: dict, key: str, default: float) -> float:
    """``body[key]`` as a float, ``default`` when absent or null; anything but a number is refused."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number, got {json.dumps(value)}", key)
    return float(value)


def _check_n(body: dict) -> None:
    """Only ``n: 1``: each sample is its own request with its own seed (cacheable, reproducible)."""
    n = _integer(body, "n", 1)
    if n < 1:
        raise RequestError(f"n must be a positive integer, got {n}", "n")
    if n != 1:
        raise RequestError("n must be 1 (send one request per sample, with its own seed)", "n")


def _text(content, i: int) -> str:
    """Message ``i``'s content as text: a string, or a list of OpenAI content parts whose ``text``
    parts are joined with newlines (as vLLM does); any other part is refused, named."""
    if isinstance(content, str):
        return content
    where = f"messages[{i}].content"
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of text parts, got {json.dumps(content)}", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            got = f"has type {json.dumps(kind)}" if kind else "is not a content part"
            raise RequestError(
                f'{where}[{j}] {got}: this server reads text only, send {{"type": "text", "text": "..."}} parts',
                f"{where}[{j}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _stream_options(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)`` from ``stream`` and ``stream_options.include_usage``."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {json.dumps(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return stream, bool(stream and options.get("include_usage"))


def _log_to_stderr() -> None:
    """Print this module's lines (one access line per request, generation failures) on stderr,
    unless the program embedding the server has configured logging itself."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, token_env: str) -> None:
    """Refuse to expose a model beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise DistillError(
            f"refusing to serve on {host} without a token",
            f"export a secret in {token_env} (clients send it as their API key) or bind to 127.0.0.1",
        )


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future = field(repr=False)


class Server:
    """The HTTP front of one backend; ``batch_window_ms`` trades a little latency for batching;
    ``faults``: test-facing faults of the Batch API, which ``faults_control`` lets a test change
    while the server runs (``POST /_batch_faults``)."""

    def __init__(
        self,
        backend,
        name: str,
        token: str | None = None,
        max_batch: int = 32,
        batch_window_ms: float = 10,
        faults: BatchFaults | None = None,
        faults_control: bool = False,
    ):
        self.backend = backend
        self.name = name
        self.token = token
        self.max_batch = max_batch
        self.window = batch_window_ms / 1000
        self.queue: asyncio.Queue[_Pending] | None = None
        self.served = 0
        self.batch_api = BatchAPI(self, faults or BatchFaults(), faults_control)

    # --- auth and request parsing ---

    def _authorised(self, request) -> bool:
        """``Authorization: Bearer <token>``; the scheme is case-insensitive (RFC 9110), the token is not."""
        if not self.token:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    @staticmethod
    def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
        """An OpenAI-shaped error body (``message``, ``type``, ``param``, ``code``), which clients show as is."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    @classmethod
    def _error(cls, status: int, message: str, param: str | None = None, code: str | None = None):
        """``_error_body`` as a JSON response with ``status``."""
        from aiohttp import web

        return web.json_response(cls._error_body(status, message, param, code), status=status)

    def _check_model(self, body: dict) -> None:
        """A request may omit ``model``; naming another model than the served one is OpenAI's 404."""
        model = body.get("model")
        if model is None or model == self.name:
            return
        if not isinstance(model, str):
            raise RequestError(f"model must be a string, got {json.dumps(model)}", "model")
        raise RequestError(
            f"the model {json.dumps(model)} does not exist: this server serves {json.dumps(self.name)}",
            "model",
            status=404,
            code="model_not_found",
        )

    def _decoding(self, body: dict) -> tuple[Decoding, int]:
        """Generation parameters and seed; ``max_tokens`` must be at least 1 (0 only scores, with echo)."""
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        max_tokens = _integer(body, key, 256)
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise RequestError(
                f"{key} must be in 1..{MAX_TOKENS}, got {max_tokens} "
                "(0 only with echo: true and logprobs on /v1/completions, which scores the prompt)",
                key,
            )
        temperature = _number(body, "temperature", 1.0)
        if not 0 <= temperature <= 2:
            raise RequestError(f"temperature must be in 0..2, got {temperature:g}", "temperature")
        decoding = Decoding(max_new_tokens=max_tokens, temperature=temperature, top_p=_number(body, "top_p", 1.0))
        decoding = Decoding(**{**decoding.__dict__, "stop": stop})
        return decoding, _integer(body, "seed", 0)

    def _prompt(self, body: dict, chat: bool) -> str:
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string")
            return prompt
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] needs a role and content", f"messages[{i}]")
        messages = [{"role": m["role"], "content": _text(m.get("content"), i)} for i, m in enumerate(messages)]
        if body.get("continue_final_message") and messages[-1]["role"] == "assistant":
            return self.backend.chat_prompt(messages[:-1], assistant_prefix=messages[-1]["content"])
        return self.backend.chat_prompt(messages)

    # --- batching ---

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = loop.time() + self.window
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            live = [p for p in batch if not p.future.done()]  # clients that hung up are skipped
            if not live:
                continue
            try:
                outs = await loop.run_in_executor(None, self.backend.generate, [p.request for p in live])
            except Exception as e:  # noqa: BLE001 — reported to each waiting client as a 500
                log.exception("generation failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, c in zip(live, outs):
                if not p.future.done():
                    p.future.set_result(c)

    async def _complete(self, request, chat: bool):
        """One chat or text completion: checked (401, 404 for another model, 400 naming the field),
        generated in the next batch, answered as one JSON body or, with ``stream: true``, as events."""
        from aiohttp import web

        if not self._authorised(request):
            return self._error(401, "missing or wrong API key")
        try:
            body = json.loads(await request.read())
            prompt, decoding, seed, stream, include_usage, echo = self._read(body, chat)
        except RequestError as e:
            return self._error(e.status, e.message, e.param, e.code)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            return self._error(400, f"bad request: {e}")
        if echo:
            return await self._echo(prompt, body, request)
        try:
            c = await self._generate(prompt, decoding, seed)
        except Exception as e:  # noqa: BLE001
            return self._error(500, f"generation failed: {type(e).__name__}")
        if c.error:
            return self._error(400, c.error)
        self.served += 1
        request["tokens"] = (c.tokens_in, c.tokens_out)
        if stream:
            return await self._stream(request, chat, c, include_usage)
        return web.json_response(self._completion(chat, c))

    def _read(self, body, chat: bool) -> tuple:
        """A completion request's checked fields: ``(prompt, decoding, seed, stream, include_usage,
        echo)``; raises ``RequestError`` (or ``ValueError``) naming what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        self._check_model(body)
        prompt = self._prompt(body, chat)
        _check_n(body)
        stream, include_usage = _stream_options(body)
        echo = not chat and bool(body.get("echo"))
        if echo and stream:
            raise RequestError("echo scores the prompt in one answer: send stream: false", "stream")
        decoding, seed = (None, 0) if echo else self._decoding(body)
        return prompt, decoding, seed, stream, include_usage, echo

    async def _generate(self, prompt: str, decoding: Decoding, seed: int):
        """The completion of one prompt, generated in the batcher's next batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(GenerationRequest(prompt, decoding, sample=seed), future))
        return await future

    def _completion(self, chat: bool, c) -> dict:
        """Completion ``c`` as OpenAI's ``chat.completion`` or ``text_completion`` object."""
        choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": c.tokens_in,
                "completion_tokens": c.tokens_out,
                "total_tokens": c.tokens_in + c.tokens_out,
            },
        }

    async def answer_line(self, url: str, body) -> tuple[int, dict]:
        """One line of a batch: ``(HTTP status, body)`` as ``POST url`` would have answered it, through
        the same checks and the same batcher; streaming and echo scoring are refused (400)."""
        chat = url.endswith("/chat/completions")
        try:
            prompt, decoding, seed, stream, _, echo = self._read(body, chat)
            if stream:
                raise RequestError("a batch line is answered whole: send stream: false", "stream")
            if echo:
                raise RequestError("echo scoring is not run in batches: call /v1/completions", "echo")
        except RequestError as e:
            return e.status, self._error_body(e.status, e.message, e.param, e.code)
        except (ValueError, TypeError) as e:
            return 400, self._error_body(400, f"bad request: {e}")
        try:
            c = await self._generate(prompt, decoding, seed)
        except Exception as e:  # noqa: BLE001 — the line fails, the batch goes on
            return 500, self._error_body(500, f"generation failed: {type(e).__name__}")
        if c.error:
            return 400, self._error_body(400, c.error)
        self.served += 1
        return 200, self._completion(chat, c)

    def _pieces(self, text: str) -> list[str]:
        """``text`` cut at its token boundaries: the stream's deltas, which join back to ``text``
        exactly; fixed-size pieces where the backend's tokenizer cannot give character offsets."""
        try:
            enc = self.backend.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            starts = [a for a, _ in enc.offset_mapping]
        except Exception:  # noqa: BLE001 — no tokenizer, or a slow one without offsets
            starts = list(range(0, len(text), STREAM_PIECE))
        cuts = sorted({0, len(text), *(a for a in starts if 0 < a < len(text))})
        return [text[a:b] for a, b in zip(cuts, cuts[1:])]

    def _chunks(self, chat: bool, c, include_usage: bool) -> list[dict]:
        """Completion ``c`` as OpenAI stream chunks: for chat a role delta, content deltas and an empty
        delta with the finish reason; for completions text pieces and an empty last one with it; then,
        with ``stream_options.include_usage``, a chunk with no choices and the usage."""
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.name,
        }
        if include_usage:
            head["usage"] = None

        def chunk(piece, finish_reason=None) -> dict:
            choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            choice["delta" if chat else "text"] = piece
            return {**head, "choices": [choice]}

        if chat:
            chunks = [chunk({"role": "assistant", "content": ""})]
            chunks += [chunk({"content": p}) for p in self._pieces(c.text)]
            chunks.append(chunk({}, c.finish_reason))
        else:
            chunks = [chunk(p) for p in self._pieces(c.text)] + [chunk("", c.finish_reason)]
        if include_usage:
            usage = {"prompt_tokens": c.tokens_in, "completion_tokens": c.tokens_out}
            chunks.append({**head, "choices": [], "usage": {**usage, "total_tokens": c.tokens_in + c.tokens_out}})
        return chunks

    async def _stream(self, request, chat: bool, c, include_usage: bool):
        """Send finished completion ``c`` as server-sent events (``data: <chunk>`` lines, then
        ``data: [DONE]``), the framing OpenAI clients read when they ask for ``stream: true``."""
        from aiohttp import web

        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        try:
            for chunk in self._chunks(chat, c, include_usage):
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the client stopped reading: nothing left to send it
            pass
        return response

    @staticmethod
    async def _access_log(request, handler):
        """Run ``handler`` and log one line: method, path, status, milliseconds, prompt and completion
        tokens (which the completion handlers leave in ``request["tokens"]``)."""
        from aiohttp import web

        t0, status = time.perf_counter(), 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client hung up first (nginx's code for it)
            raise
        finally:
            tokens_in, tokens_out = request.get("tokens", (0, 0))
            ms = (time.perf_counter() - t0) * 1000
            log.info(
                "%s %s %d %.1fms prompt_tokens=%d completion_tokens=%d",
                request.method,
                request.path,
                status,
                ms,
                tokens_in,
                tokens_out,
            )

    async def _echo(self, prompt: str, body: dict, request):
        """Score ``prompt``: the top-k log-probabilities of every token given the ones before it."""
        from aiohttp import web

        try:
            k = _integer(body, "logprobs", 0)
            max_tokens = _integer(body, "max_tokens", 0)
        except RequestError:
            k = max_tokens = -1
        if not 1 <= k <= 20 or not 0 <= max_tokens <= 1:
            return self._error(400, "echo scores the prompt: set logprobs to 1..20 and max_tokens to 0 or 1")
        tok = self.backend.tokenizer
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc.input_ids, [a for a, _ in enc.offset_mapping]
        if len(ids) > self.backend.context:
            return self._error(400, f"the prompt has {len(ids)} tokens, over the context of {self.backend.context}")
        loop = asyncio.get_running_loop()
        ((top_ids, top_lps),) = await loop.run_in_executor(None, self.backend.score_tokens, [([], ids)], k)
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def name(i: int) -> str:
            return f"token_id:{i}" if as_ids else tok.decode([i])

        tops = [None] + [{name(i): v for i, v in zip(row_i, row_v)} for row_i, row_v in zip(top_ids[1:], top_lps[1:])]
        chosen = [None] + [
            next((v for i, v in zip(row_i, row_v) if i == t), None)
            for t, row_i, row_v in zip(ids[1:], top_ids[1:], top_lps[1:])
        ]
        self.served += 1
        request["tokens"] = (len(ids), 0)
        logprobs = {
            "tokens": [name(i) for i in ids],
            "token_logprobs": chosen,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "text": prompt, "finish_reason": "length", "logprobs": logprobs}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)},
            }
        )

    def app(self):
        from aiohttp import web

        async def chat(request):
            return await self._complete(request, chat=True)

        async def completions(request):
            return await self._complete(request, chat=False)

        async def models(request):
            if not self._authorised(request):
                return self._error(401, "missing or wrong API key")
            return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model"}]})

        async def health(request):
            return web.json_response({"status": "ok", "served": self.served})

        async def start(app):
            self.queue = asyncio.Queue()
            app["batcher"] = asyncio.create_task(self._batcher())

        async def stop(app):
            app["batcher"].cancel()

        app = web.Application(client_max_size=8 << 20, middlewares=[web.middleware(self._access_log)])
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/health", health)
        self.batch_api.routes(app)
        app.on_startup.append(start)
        app.on_cleanup.append(stop)
        app.on_cleanup.append(self.batch_api.stop)
        return app


@dataclass(frozen=True)
class BatchFaults:
    """Faults of the Batch API, for tests only (hidden ``distill serve --batch-*`` options)."""

    expire_after: int = 0  # a batch expires once it answered this many lines; the rest are in no file (0 = never)
    fail_statuses: tuple[int, ...] = ()  # the server's first batch lines get these HTTP statuses, one each
    start_delay: float = 0.0  # seconds a new batch stays ``validating`` before its lines run


BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_FILE_BYTES = 200 << 20  # OpenAI's cap on an uploaded file
MAX_BATCH_LINES = 50_000  # OpenAI's cap on the requests of one batch


class BatchAPI:
    """OpenAI's Files and Batches endpoints, in memory: ``POST /v1/files`` (multipart, any purpose),
    ``GET /v1/files/{id}`` and ``/content``, ``POST /v1/batches``, ``GET /v1/batches`` (newest first,
    ``limit`` and ``after``), ``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``, with
    OpenAI's object shapes. A batch's lines run in the background through ``Server.answer_line`` (the
    live endpoints' checks and batcher), a few batcher batches at a time so live requests interleave;
    answered lines go to its output file, refused or failed ones to its error file, each line
    ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``. A file
    that is not valid batch JSONL fails the batch with ``errors`` naming the line. A cancelled or
    expired batch keeps the lines it answered; the lines it never ran are in neither file."""

    def __init__(self, server: Server, faults: BatchFaults, control: bool = False):
        self.server, self.control = server, control
        self.files: dict[str, dict] = {}  # id -> {"object": "file", ..., "_data": bytes}
        self.batches: dict[str, dict] = {}  # id -> OpenAI batch object (insertion order = creation order)
        self.tasks: dict[str, asyncio.Task] = {}
        self.set_faults(faults)

    def set_faults(self, faults: BatchFaults) -> None:
        """Faults for the batches created from now on (``fail_statuses`` counts from now)."""
        self.faults, self.fail_left = faults, list(faults.fail_statuses)

    def routes(self, app) -> None:
        app.router.add_post("/v1/files", self._guard(self.upload))
        app.router.add_get("/v1/files/{id}", self._guard(self.file))
        app.router.add_get("/v1/files/{id}/content", self._guard(self.content))
        app.router.add_post("/v1/batches", self._guard(self.create))
        app.router.add_get("/v1/batches", self._guard(self.listing))
        app.router.add_get("/v1/batches/{id}", self._guard(self.get))
        app.router.add_post("/v1/batches/{id}/cancel", self._guard(self.cancel))
        if self.control:
            app.router.add_route("*", "/_batch_faults", self._guard(self.faults_control))

    async def faults_control(self, request):
        """Tests only (``--batch-faults-control``): ``POST /_batch_faults`` with ``BatchFaults`` fields
        sets the faults (absent fields: none), ``GET`` shows them; either answers the current ones."""
        from dataclasses import asdict

        from aiohttp import web

        if request.method == "POST":
            try:
                body = json.loads(await request.read())
                faults = BatchFaults(**{**body, "fail_statuses": tuple(body.get("fail_statuses", ()))})
            except (ValueError, TypeError) as e:
                raise RequestError(f"bad faults: {e}") from None
            self.set_faults(faults)
        return web.json_response({**asdict(self.faults), "fail_left": self.fail_left})

    async def stop(self, app) -> None:
        for task in self.tasks.values():
            task.cancel()

    def _guard(self, handler):
        """``handler`` behind the token check, with a ``RequestError`` answered as OpenAI's error body."""

        async def guarded(request):
            if not self.server._authorised(request):
                return self.server._error(401, "missing or wrong API key")
            try:
                return await handler(request)
            except RequestError as e:
                return self.server._error(e.status, e.message, e.param, e.code)

        return guarded

    def _add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        meta = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[meta["id"]] = {**meta, "_data": data}
        return meta

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise RequestError(f"no such file: {file_id}", "file_id", status=404, code="not_found")
        return self.files[file_id]

    def _batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise RequestError(f"no such batch: {batch_id}", "batch_id", status=404, code="not_found")
        return self.batches[batch_id]

    # --- files ---

    async def upload(self, request):
        """``POST /v1/files``: multipart fields ``purpose`` and ``file``; the file object."""
        from aiohttp import web

        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError):  # not multipart/form-data
            raise RequestError("send multipart/form-data with fields purpose and file", "file") from None
        purpose, data, filename = None, None, "upload.jsonl"
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or filename
                chunks, size = [], 0
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        raise RequestError(f"the file is over {MAX_FILE_BYTES >> 20} MB", "file", status=413)
                    chunks.append(chunk)
                data = b"".join(chunks)
        if not purpose:
            raise RequestError("purpose is required (batch for a batch's input)", "purpose")
        if data is None:
            raise RequestError("file is required", "file")
        return web.json_response(self._add_file(data, filename, purpose))

    async def file(self, request):
        from aiohttp import web

        return web.json_response({k: v for k, v in self._file(request.match_info["id"]).items() if k != "_data"})

    async def content(self, request):
        from aiohttp import web

        return web.Response(body=self._file(request.match_info["id"])["_data"], content_type="application/octet-stream")

    # --- batches ---

    async def create(self, request):
        """``POST /v1/batches``: ``input_file_id``, ``endpoint``, ``completion_window`` (``<n>h``),
        optional ``metadata``; the batch object, ``validating``, its lines run in the background."""
        from aiohttp import web

        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"bad request: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
        if not isinstance(file_id, str):
            raise RequestError("input_file_id is required", "input_file_id")
        if self._file(file_id)["purpose"] != "batch":
            raise RequestError(f"file {file_id} was not uploaded with purpose batch", "input_file_id")
        if endpoint not in BATCH_ENDPOINTS:
            raise RequestError(
                f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, got {json.dumps(endpoint)}", "endpoint"
            )
        if not isinstance(window, str) or not window.endswith("h") or not window[:-1].isdigit() or window == "0h":
            raise RequestError(f"completion_window must be like 24h, got {json.dumps(window)}", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise RequestError("metadata must be an object", "metadata")
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + int(window[:-1]) * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        self.batches[batch["id"]] = batch
        self.tasks[batch["id"]] = asyncio.create_task(self._run(batch))
        return web.json_response(batch)

    async def get(self, request):
        from aiohttp import web

        return web.json_response(self._batch(request.match_info["id"]))

    async def listing(self, request):
        """``GET /v1/batches``: newest first, ``limit`` (1..100, default 20) after the batch ``after``."""
        from aiohttp import web

        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise RequestError("limit must be an integer", "limit") from None
        if not 1 <= limit <= 100:
            raise RequestError(f"limit must be in 1..100, got {limit}", "limit")
        ids = list(reversed(self.batches))
        after = request.query.get("after")
        if after:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        page = [self.batches[i] for i in ids[:limit]]
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(ids) > limit,
            }
        )

    async def cancel(self, request):
        """``POST /v1/batches/{id}/cancel``: a running batch stops starting lines (``cancelling``, then
        ``cancelled`` with what it answered); an ended one is a 409."""
        from aiohttp import web

        batch = self._batch(request.match_info["id"])
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            raise RequestError(f"batch {batch['id']} is already {batch['status']}", status=409)
        if batch["status"] != "cancelling":
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return web.json_response(batch)

    def _lines(self, batch: dict) -> list[dict]:
        """The input file's requests, checked: one JSON object a line with a unique ``custom_id``,
        ``method`` POST, ``url`` the batch's endpoint and a ``body`` object. Raises ``ValueError(line
        number, message)`` on the first bad line."""
        lines, seen = [], set()
        text = self.files[batch["input_file_id"]]["_data"].decode("utf-8", errors="replace")
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                raise ValueError(n, "the line is not JSON") from None
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                raise ValueError(n, "each line needs a custom_id string")
            if line["custom_id"] in seen:
                raise ValueError(n, f"custom_id {json.dumps(line['custom_id'])} is not unique in the file")
            if line.get("method") != "POST" or line.get("url") != batch["endpoint"]:
                raise ValueError(n, f"method must be POST and url {batch['endpoint']}, the batch's endpoint")
            if not isinstance(line.get("body"), dict):
                raise ValueError(n, "body must be an object")
            seen.add(line["custom_id"])
            lines.append(line)
        if not lines:
            raise ValueError(0, "the input file holds no request")
        if len(lines) > MAX_BATCH_LINES:
            raise ValueError(0, f"a batch holds at most {MAX_BATCH_LINES} requests, the file has {len(lines)}")
        return lines

    async def _run(self, batch: dict) -> None:
        """Validate, run the lines (at most ``expire_after`` of them), write the output and error files."""
        await asyncio.sleep(self.faults.start_delay)
        try:
            lines = self._lines(batch)
        except ValueError as e:
            n, message = e.args
            error = {"code": "invalid_request", "message": message, "param": None, "line": n or None}
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [error]})
            return
        counts = batch["request_counts"]
        counts["total"] = len(lines)
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        answered: list[dict] = []
        refused: list[dict] = []
        slots = asyncio.Semaphore(2 * self.server.max_batch)  # live requests get into the batcher between lines

        async def one(line: dict) -> None:
            async with slots:
                if batch["status"] == "cancelling":
                    return
                if self.fail_left:
                    status = self.fail_left.pop(0)
                    body = self.server._error_body(status, "injected fault (distill serve --batch-fail-lines)")
                else:
                    status, body = await self.server.answer_line(batch["endpoint"], line["body"])
            out = {
                "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                "custom_id": line["custom_id"],
                "response": {"status_code": status, "request_id": uuid.uuid4().hex[:24], "body": body},
                "error": None,
            }
            (answered if status == 200 else refused).append(out)
            counts["completed" if status == 200 else "failed"] += 1

        ran = lines[: self.faults.expire_after] if self.faults.expire_after else lines
        await asyncio.gather(*(one(line) for line in ran))
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        for key, rows in (("output_file_id", answered), ("error_file_id", refused)):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[key] = self._add_file(data, f"{batch['id']}_{key[:-8]}.jsonl", "batch_output")["id"]
        now = int(time.time())
        if batch["cancelling_at"]:
            batch.update(status="cancelled", cancelled_at=now)
        elif len(ran) < len(lines):
            batch.update(status="expired", expired_at=now)
        else:
            batch.update(status="completed", completed_at=now)
        log.info(
            "batch %s %s: %d answered, %d failed, of %d",
            batch["id"],
            batch["status"],
            counts["completed"],
            counts["failed"],
            counts["total"],
        )


def serve(
    model_source: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_env: str = "DISTILL_SERVE_TOKEN",
    name: str | None = None,
    dtype: str = "float32",
    max_batch: int = 32,
    batch_window_ms: float = 10,
    on_ready=None,
    faults: BatchFaults | None = None,
    faults_control: bool = False,
) -> None:
    """Serve ``model_source`` until interrupted (``faults``, ``faults_control``: the Batch API's, for tests)."""
    from aiohttp import web

    from distill.core.sources import resolve_model
    from distill.teachers.backends.transformers import TransformersBackend

    token = os.environ.get(token_env) or None
    check_bind(host, token, token_env)
    _log_to_stderr()
    backend = TransformersBackend(resolve_model(model_source), dtype=dtype, batch_size=max_batch)
    _ = backend.model  # load the weights before accepting requests
    server = Server(backend, name or backend.model_id, token, max_batch, batch_window_ms, faults, faults_control)

    async def ready(app):
        if on_ready:
            on_ready(server)

    app = server.app()
    app.on_startup.append(ready)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
