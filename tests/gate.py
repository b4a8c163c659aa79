"""A gated OpenAI-compatible endpoint for job tests: a job that is really running, with rows done, held
for as long as a test needs."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


def replay_project(root: Path, task_cfg, name: str = "demo") -> Path:
    """A project folder with a replay-teacher recipe (``recipe.yaml``: a real generate stage in about a
    second) whose outputs and completion cache are relative to where the job was submitted, as a user's are."""
    from distill.core.problems import load_problems

    root.mkdir(parents=True, exist_ok=True)
    train, evals = load_problems(task_cfg)
    recs = [{"question": p["question"], "rationale": "Add them up.", "answer": str(p["gold"])} for p in train + evals]
    (root / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = {
        "name": name,
        "output_dir": "runs",
        "cache": ".distill/cache.sqlite",
        "task": task_cfg.model_dump(),
        "teacher": {"model": f"replay:{root / 'teacher.jsonl'}", "executor": "local"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def gated_recipe(project: Path, gate: Gate, name: str = "gated.yaml") -> Path:
    """The project's recipe on ``gate``'s endpoint (2-row batches and shards), written as ``name``."""
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["teacher"] = {
        "model": "openai:gated",
        "base_url": gate.url,
        "executor": "local",
        "batch_size": 2,
        "concurrency": 2,
        "shard_rows": 2,
        "request_timeout": 120,
    }
    (project / name).write_text(yaml.safe_dump(recipe))
    return project / name


class Gate:
    """An OpenAI-compatible chat endpoint on loopback that answers the first ``free`` requests at once
    and holds every later one until ``open()``: a job that is really running, with rows done, for as
    long as a test needs."""

    def __init__(self, free: int):
        self.free, self.seen, self.released = free, 0, threading.Event()
        self.lock = threading.Lock()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with gate.lock:
                    gate.seen += 1
                    held = gate.seen > gate.free
                if held:
                    gate.released.wait(90)
                body = json.dumps(
                    {
                        "choices": [{"message": {"content": "Add them up. The answer is 4."}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 20, "completion_tokens": 8},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no access lines on the test's stderr
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def open(self):
        self.released.set()

    def close(self):
        self.open()
        self.server.shutdown()
        self.server.server_close()
