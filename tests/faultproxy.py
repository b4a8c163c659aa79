"""A fault-injecting HTTP proxy on loopback, in front of a real OpenAI-compatible server.

Each request is forwarded, or (with probability ``rate``) answered with one fault: 429 with
``Retry-After``, 500, 503, a hang past the client's timeout, a dropped connection, a reset
connection, a truncated body, or a 200 with a non-JSON body. Raw sockets, so the faults are the
bytes a real broken network or gateway produces.

    python tests/faultproxy.py --upstream http://127.0.0.1:8000 --port-file /tmp/port --rate 0.3

``POST /_faults {"rate": 0.0}`` changes the rate while running; ``GET /_faults`` returns counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import sys
from collections import Counter
from pathlib import Path

FAULTS = ("429", "500", "503", "hang", "drop", "reset", "truncate", "nonjson")


class FaultProxy:
    def __init__(self, upstream: str, rate: float, seed: int, hang: float, faults=FAULTS):
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.rng = random.Random(seed)
        self.hang = hang
        self.faults = list(faults)
        self.counts: Counter[str] = Counter()

    async def _read_request(self, reader) -> tuple[str, str, dict, bytes] | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        return method, path, headers, body

    @staticmethod
    def _response(status: int, body: bytes, ctype="application/json", extra: dict | None = None, length=None) -> bytes:
        reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
        headers = {
            "Content-Type": ctype,
            "Content-Length": str(len(body) if length is None else length),
            "Connection": "close",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status} {reason.get(status, 'Status')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        return head.encode() + b"\r\n" + body

    async def _forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
        import aiohttp

        fwd = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.upstream + path, data=body, headers=fwd) as resp:
                return resp.status, await resp.read()

    async def handle(self, reader, writer) -> None:
        try:
            req = await self._read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()
            return
        method, path, headers, body = req
        try:
            if path.startswith("/_faults"):
                if method == "POST":
                    self.rate = float(json.loads(body).get("rate", self.rate))
                payload = json.dumps({"rate": self.rate, "counts": self.counts}).encode()
                writer.write(self._response(200, payload))
                return
            # Which requests fail is random; the faults themselves take turns, so every kind shows up.
            if self.rng.random() < self.rate:
                fault = self.faults[sum(self.counts[f] for f in self.faults) % len(self.faults)]
            else:
                fault = "ok"
            self.counts[fault] += 1
            if fault == "429":
                err = b'{"error": {"message": "rate limited"}}'
                writer.write(self._response(429, err, extra={"Retry-After": "0.2"}))
            elif fault in ("500", "503"):
                writer.write(self._response(int(fault), b'{"error": {"message": "upstream failure"}}'))
            elif fault == "hang":
                await asyncio.sleep(self.hang)
            elif fault == "drop":
                pass  # close without a byte
            elif fault == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                status, data = await self._forward(method, path, headers, body)
                if fault == "truncate":
                    writer.write(self._response(status, data[: len(data) // 2], length=len(data)))
                elif fault == "nonjson":
                    writer.write(self._response(200, b"<html><body>502 Bad Gateway</body></html>", "text/html"))
                else:
                    writer.write(self._response(status, data))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def main_async(args) -> None:
    proxy = FaultProxy(args.upstream, args.rate, args.seed, args.hang)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.port)
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.rename(args.port_file)
    print(f"fault proxy on 127.0.0.1:{port} -> {args.upstream} (rate {args.rate})", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--rate", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang", type=float, default=3.0, help="seconds a 'hang' fault holds the connection")
    args = p.parse_args(argv)
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
