"""Batch-API teachers (``teacher.api: batch``) against a real `distill serve` on loopback serving the
tiny teacher: its rows through /v1/files + /v1/batches equal the live chat API's, with batches that
expire part-way (a partial output file), lines that fail, and a runner killed while it polls. The
faults are the server's own (``--batch-faults-control``, set per test). No mock objects."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from serving import free_port

pytestmark = pytest.mark.integration


def _call(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _lines(server: str, file_id: str) -> list[dict]:
    """The JSONL lines of a file the server holds (a batch's input, output or error file)."""
    with urllib.request.urlopen(f"{server}/v1/files/{file_id}/content", timeout=10) as r:
        return [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory):
    """`distill serve` of the tiny teacher with its Batch API faults settable (``POST /_batch_faults``)."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    with open(log_path, "w") as log:
        cmd = [sys.executable, "-m", "distill", "serve", f"hf:{tiny_teacher}", "--port", str(port), "--name", "tiny"]
        proc = subprocess.Popen([*cmd, "--batch-faults-control"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(450):
            assert proc.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def faults(server):
    """Set the server's batch faults for one test; they are cleared after it."""
    yield lambda **f: _call(server + "/_batch_faults", f)
    _call(server + "/_batch_faults", {})


def _batches(server: str) -> list[dict]:
    """Every batch the server holds, oldest first."""
    out, after = [], None
    while True:
        page = _call(server + "/v1/batches?limit=100" + (f"&after={after}" if after else ""))
        out += page["data"]
        if not page["has_more"]:
            return out[::-1]
        after = page["last_id"]


def _custom_ids(server: str, batch: dict) -> list[str]:
    return [line["custom_id"] for line in _lines(server, batch["input_file_id"])]


@pytest.fixture(scope="module")
def task(tiny_task_cfg):
    return tiny_task_cfg.model_dump()  # 12 train + 6 eval problems


def _recipe(tmp: Path, server: str, task: dict, name: str, **teacher) -> Path:
    teacher = {
        "model": "openai:tiny",
        "base_url": server + "/v1",
        "api": "batch",
        "batch": {"poll_seconds": 0.1},
        "max_new_tokens": 24,
        "batch_size": 8,
        "keep": "all",
        "executor": "local",
        "retry_base": 0.05,
        **teacher,
    }
    recipe = {"name": name, "output_dir": str(tmp / "runs"), "task": task, "teacher": teacher}
    recipe["cache"] = str(tmp / ".distill" / "cache.sqlite")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _generate(recipe: Path, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", "generate", str(recipe), *args],
        cwd=recipe.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(run_dir: Path) -> list[tuple]:
    out = []
    for split in ("train", "eval"):
        for r in pq.read_table(run_dir / "generate" / "dataset" / f"{split}.parquet").to_pylist():
            out.append((r["id"], r["rationale"], r["pred"], r["correct"], r["error"]))
    return sorted(out)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "generate" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def chat_rows(server, task, tmp_path_factory):
    """The same problems through the live chat API (greedy decoding)."""
    tmp = tmp_path_factory.mktemp("chat")
    r = _generate(_recipe(tmp, server, task, "chat", api="chat"))
    assert r.returncode == 0, r.stdout + r.stderr
    return _rows(tmp / "runs" / "chat")


def test_batch_rows_equal_chat_rows_and_a_rerun_is_free(server, task, chat_rows, tmp_path):
    before = len(_batches(server))
    recipe = _recipe(tmp_path, server, task, "batch")
    r = _generate(recipe)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _rows(tmp_path / "runs" / "batch") == chat_rows
    made = _batches(server)[before:]
    assert made and all(b["status"] == "completed" for b in made)
    ids = [i for b in made for i in _custom_ids(server, b)]
    assert len(ids) == len(set(ids)) == sum(b["request_counts"]["completed"] for b in made)
    # The batches are recorded beside the completions and collected; every answered line is cached.
    db = sqlite3.connect(tmp_path / ".distill" / "cache.sqlite")
    assert {b for b, s in db.execute("SELECT batch_id, status FROM batches") if s == "collected"} == {
        b["id"] for b in made
    }
    assert {k for (k,) in db.execute("SELECT key FROM completions")} == set(ids)
    db.close()
    # A rerun pays for nothing: no batch, no line, no live request reaches the server.
    served = _call(server + "/health")["served"]
    r = _generate(recipe, "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_batches(server)) == before + len(made) and _call(server + "/health")["served"] == served
    assert _rows(tmp_path / "runs" / "batch") == chat_rows
    # A recorded batch the endpoint no longer knows (a restarted server) is abandoned, its request sent again.
    db = sqlite3.connect(tmp_path / ".distill" / "cache.sqlite", isolation_level=None)
    db.execute("DELETE FROM completions WHERE key = ?", (ids[0],))
    db.execute(
        "INSERT INTO batches VALUES ('file-gone', ?, 'tiny', ?, 'batch_gone', 'in_progress', 1, 0, 0)",
        (server + "/v1", made[0]["endpoint"]),
    )
    db.execute("INSERT INTO batch_requests VALUES (?, 'file-gone', '[]')", (ids[0],))
    r = _generate(recipe, "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "batch batch_gone is gone from the endpoint" in r.stderr
    assert [_custom_ids(server, b) for b in _batches(server)[before + len(made) :]] == [[ids[0]]]
    assert db.execute("SELECT status FROM batches WHERE file_id = 'file-gone'").fetchone() == ("abandoned",)
    assert _rows(tmp_path / "runs" / "batch") == chat_rows
    db.close()


def test_an_expired_batch_with_a_partial_result_file_completes_in_the_next(
    server, task, chat_rows, faults, tmp_path, capsys
):
    """In process, through the stage's progress callback: the job store's progress lists the batches."""
    from distill.config import load_recipe
    from distill.pipeline import run_stage

    faults(expire_after=3)
    before = len(_batches(server))
    progress: list[dict] = []
    result = run_stage(
        load_recipe(str(_recipe(tmp_path, server, task, "expiring"))), "generate", on_progress=progress.append
    )
    assert result.metrics["failed_rows"] == 0
    assert _rows(tmp_path / "runs" / "expiring") == chat_rows
    made = _batches(server)[before:]
    expired = [b for b in made if b["status"] == "expired"]
    assert expired and all(b["request_counts"]["completed"] == 3 < b["request_counts"]["total"] for b in expired)
    # What an expired batch did not answer went into a later batch; every request was answered once.
    for b in expired:
        answered = {line["custom_id"] for line in _lines(server, b["output_file_id"])}
        missing = set(_custom_ids(server, b)) - answered
        later = [x for x in made[made.index(b) + 1 :] if missing & set(_custom_ids(server, x))]
        assert len(missing) == b["request_counts"]["total"] - 3 and later
        assert missing <= set().union(*(_custom_ids(server, x) for x in later))
    answered = [line["custom_id"] for b in made if b["output_file_id"] for line in _lines(server, b["output_file_id"])]
    assert len(answered) == len(set(answered))
    assert "expired: 3 of" in capsys.readouterr().err
    shown = {b["id"]: b["status"] for p in progress for b in p["batches"]}
    assert shown.keys() == {b["id"] for b in made} and set(shown.values()) == {"collected"}


def test_failed_lines_are_retried_or_recorded_then_resumed(server, task, chat_rows, faults, tmp_path):
    """Two lines answered 500 and 503 go in the next batch; one refused with 400 fails its row with the
    reason (the run is partial, exit code 3); the same command again retries only that row."""
    faults(fail_statuses=[500, 503, 400])
    recipe = _recipe(tmp_path, server, task, "failing")
    r = _generate(recipe)
    assert r.returncode == 3, r.stdout + r.stderr
    m = _metrics(tmp_path / "runs" / "failing")
    assert m["failed_rows"] == 1 and len(m["failures"]) == 1
    assert m["failures"][0]["reason"].startswith("HTTP 400: injected fault")
    served = _call(server + "/health")["served"]
    r = _generate(recipe)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _rows(tmp_path / "runs" / "failing") == chat_rows
    assert 1 <= _call(server + "/health")["served"] - served <= 2  # the failed row's one or two calls


def test_a_runner_killed_while_polling_resumes_the_batch_and_pays_once(server, task, chat_rows, faults, tmp_path):
    faults(start_delay=2.0)
    before = len(_batches(server))
    recipe = _recipe(tmp_path, server, task, "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill", "generate", str(recipe)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(600):
            if len(_batches(server)) > before:
                break
            assert proc.poll() is None
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the runner, while its first batch waits on the server
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (first,) = _batches(server)[before:]
    assert first["status"] == "validating"
    faults()  # the next batches run at once; the first one still waits out its delay
    r = _generate(recipe)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"batch {first['id']}: polling it again" in r.stderr
    assert _rows(tmp_path / "runs" / "killed") == chat_rows
    made = _batches(server)[before:]
    assert made[0]["id"] == first["id"] and made[0]["status"] == "completed"
    ids = [i for b in made for i in _custom_ids(server, b)]
    assert len(ids) == len(set(ids))  # no request went into two batches: none was paid twice
