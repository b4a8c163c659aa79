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
        if not self.token:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode())

    @staticmethod
    def _error(status: int, message: str):
        from aiohttp import web

        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}}
        return web.json_response(body, status=status)

    def _decoding(self, body: dict) -> tuple[Decoding, int]:
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        temperature = float(body.get("temperature", 1.0))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        if not 1 <= max_tokens <= 8192 or not 0 <= temperature <= 2:
            raise ValueError("max_tokens must be in 1..8192 and temperature in 0..2")
        decoding = Decoding(max_new_tokens=max_tokens, temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        decoding = Decoding(**{**decoding.__dict__, "stop": stop})
        return decoding, int(body.get("seed") or 0)

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
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise ValueError("each message needs a role and string content")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
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
        from aiohttp import web

        if not self._authorised(request):
            return self._error(401, "missing or wrong API key")
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt = self._prompt(body, chat)
            decoding, seed = self._decoding(body)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            return self._error(400, f"bad request: {e}")
        if int(body.get("n", 1)) != 1:
            return self._error(400, "n must be 1 (send one request per sample, with its own seed)")
        if not chat and body.get("echo"):
            return await self._echo(prompt, body)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(GenerationRequest(prompt, decoding, sample=seed), future))
        try:
            c = await future
        except Exception as e:  # noqa: BLE001
            return self._error(500, f"generation failed: {type(e).__name__}")
        if c.error:
            return self._error(400, c.error)
        self.served += 1
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

    async def _echo(self, prompt: str, body: dict):
        """Score ``prompt``: the top-k log-probabilities of every token given the ones before it."""
        from aiohttp import web

        try:
            k = int(body.get("logprobs") or 0)
        except (TypeError, ValueError):
            k = -1
        if not 1 <= k <= 20 or int(body.get("max_tokens") or 0) > 1:
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

        app = web.Application(client_max_size=8 << 20)
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
    backend = TransformersBackend(resolve_model(model_source), dtype=dtype, batch_size=max_batch)
    _ = backend.model  # load the weights before accepting requests
    server = Server(backend, name or backend.model_id, token, max_batch, batch_window_ms)

    async def ready(app):
        if on_ready:
            on_ready(server)

    app = server.app()
    app.on_startup.append(ready)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
