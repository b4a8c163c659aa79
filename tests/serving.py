"""`distill serve` as a real subprocess for tests: a free loopback port, the server started on it
with its output in a log file (a pipe nobody reads would fill up), up when ``/health`` answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on (bound once to pick it, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model_dir, log_path: Path, env: dict, name: str = "tiny", timeout: float = 90):
    """Run ``distill serve hf:<model_dir> --name <name>`` on a free port for the block; yields its URL
    (``http://127.0.0.1:<port>``). A server that exits or never answers fails with its log."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill", "serve", f"hf:{model_dir}", "--port", str(port), "--name", name],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"distill serve exited: {Path(log_path).read_text()}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() - t0 > timeout:
                    raise AssertionError(f"{url} never came up: {Path(log_path).read_text()}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
