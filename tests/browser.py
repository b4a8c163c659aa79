"""A headless Chromium driven over the DevTools protocol, for tests of self-contained pages.

No playwright or selenium offline: Debian's ``chromium`` and a websocket (aiohttp) are enough.
Every wait is bounded, and the browser (its whole process group) is killed on exit, whatever
happened, so a failed test leaves no browser behind on a shared machine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

MISSING = "chromium not installed: run `make browser` or apt-get install chromium"


def chromium_binary() -> str | None:
    """The Chromium (or Chrome) on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


class Browser:
    """``with Browser(url) as b: b.evaluate("document.title")``: one page, one DevTools session."""

    def __init__(self, url: str, timeout: float = 30.0, width: int = 1280, height: int = 900):
        self.url, self.timeout, self.size = url, timeout, (width, height)
        self.proc: subprocess.Popen | None = None
        self.profile = tempfile.mkdtemp(prefix="distill-chromium-")
        self.loop = asyncio.new_event_loop()
        self.session = self.ws = None
        self._id = 0

    def __enter__(self) -> Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: close() kills renderers and helpers too
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x.decode(errors="replace")) for x in self.proc.stderr], daemon=True
        ).start()
        deadline, seen = time.monotonic() + self.timeout, []
        while True:
            try:
                line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"chromium printed no DevTools address in {self.timeout:.0f}s: {''.join(seen)[-2000:]}"
                ) from None
            seen.append(line)
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium printed no DevTools address: {''.join(seen)[-2000:]}")
        port = re.match(r"ws://[^:/]+:(\d+)/", m.group(1)).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self._run(self._connect(page["webSocketDebuggerUrl"]))
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.goto(self.url)

    async def _connect(self, ws_url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))

    def _run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, self.timeout))

    def send(self, method: str, **params) -> dict:
        """One DevTools command; its result (events in between are skipped)."""
        self._id += 1
        ident = self._id

        async def call():
            await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
            while True:
                msg = await self.ws.receive()
                if msg.type.name != "TEXT":
                    raise ConnectionError(f"DevTools connection ended ({msg.type.name}) during {method}")
                data = json.loads(msg.data)
                if data.get("id") == ident:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data["result"]

        return self._run(call())

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0):
        """Poll until ``expression`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed falsy for {timeout:.0f}s")
            time.sleep(0.05)
        return value

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def screenshot(self, path: Path, full_page: bool = True, max_height: int = 6000) -> Path:
        """Save a PNG of the page (its whole height up to ``max_height`` px with ``full_page``)."""
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params |= {
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1},
            }
        path = Path(path)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        """Close the connection and kill the browser's process group; remove its profile."""
        try:
            if self.ws is not None:
                self.loop.run_until_complete(asyncio.wait_for(self.ws.close(), 5))
            if self.session is not None:
                self.loop.run_until_complete(asyncio.wait_for(self.session.close(), 5))
        except Exception:
            pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self.loop.close()
        shutil.rmtree(self.profile, ignore_errors=True)
