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
    """The HTTP front of one backend; ``batch_window_ms`` trades a little latency for batching."""

    def __init__(self, backend, name: str, token: str | None = None, max_batch: int = 32, batch_window_ms: float = 10):
        self.backend = backend
        self.name = name
        self.token = token
        self.max_batch = max_batch
        self.window = batch_window_ms / 1000
        self.queue: asyncio.Queue[_Pending] | None = None
        self.served = 0

    # --- auth and request parsing ---

    def _authorised(self, request) -> bool:
        """``Authorization: Bearer <token>``; the scheme is case-insensitive (RFC 9110), the token is not."""
        if not self.token:
            return True
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    @staticmethod
    def _error(status: int, message: str, param: str | None = None, code: str | None = None):
        """An OpenAI-shaped error body (``message``, ``type``, ``param``, ``code``), which clients show as is."""
        from aiohttp import web

        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return web.json_response(body, status=status)

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
        except RequestError as e:
            return self._error(e.status, e.message, e.param, e.code)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            return self._error(400, f"bad request: {e}")
        if echo:
            return await self._echo(prompt, body, request)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(GenerationRequest(prompt, decoding, sample=seed), future))
        try:
            c = await future
        except Exception as e:  # noqa: BLE001
            return self._error(500, f"generation failed: {type(e).__name__}")
        if c.error:
            return self._error(400, c.error)
        self.served += 1
        request["tokens"] = (c.tokens_in, c.tokens_out)
        if stream:
            return await self._stream(request, chat, c, include_usage)
        choice = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return web.json_response(
            {
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
        )

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
        app.on_startup.append(start)
        app.on_cleanup.append(stop)
        return app


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
) -> None:
    """Serve ``model_source`` until interrupted."""
    from aiohttp import web

    from distill.core.sources import resolve_model
    from distill.teachers.backends.transformers import TransformersBackend

    token = os.environ.get(token_env) or None
    check_bind(host, token, token_env)
    _log_to_stderr()
    backend = TransformersBackend(resolve_model(model_source), dtype=dtype, batch_size=max_batch)
    _ = backend.model  # load the weights before accepting requests
    server = Server(backend, name or backend.model_id, token, max_batch, batch_window_ms)

    async def ready(app):
        if on_ready:
            on_ready(server)

    app = server.app()
    app.on_startup.append(ready)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
