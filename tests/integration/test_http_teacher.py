"""The HTTP teacher against real processes: `distill serve` on loopback serving a real tiny model,
and a fault-injecting proxy (raw sockets) between them. No mock objects."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from serving import free_port, served

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def secret() -> str:
    return f"sk-distill-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def server(tiny_teacher, secret, tmp_path_factory):
    """`distill serve` on loopback with a token, serving the tiny teacher."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with served(tiny_teacher, log_path, {**os.environ, "DISTILL_SERVE_TOKEN": secret}) as url:
        yield url


@pytest.fixture
def proxy(server, tmp_path):
    """A fault proxy in front of the server; yields (base_url, control_url)."""
    port_file = tmp_path / "proxy.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TESTS / "faultproxy.py"),
            "--upstream",
            server,
            "--port-file",
            str(port_file),
            "--rate",
            "0.35",
            "--seed",
            "3",
            "--hang",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if port_file.exists():
            break
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port_file.read_text()}"
    yield url, url + "/_faults"
    proc.terminate()
    proc.wait(10)


def _recipe(tmp_path: Path, task: dict, teacher: dict, name: str) -> Path:
    teacher = {"max_new_tokens": 24, "batch_size": 8, "keep": "all", "executor": "local", **teacher}
    recipe = {"name": name, "output_dir": str(tmp_path / "runs"), "task": task, "teacher": teacher}
    recipe["cache"] = str(tmp_path / ".distill" / "cache.sqlite")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rows(run_dir: Path) -> list[tuple]:
    out = []
    for split in ("train", "eval"):
        for r in pq.read_table(run_dir / "generate" / "dataset" / f"{split}.parquet").to_pylist():
            out.append((r["id"], r["rationale"], r["pred"], r["correct"]))
    return sorted(out)


def _cli(*args, cwd, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def task(tiny_task_cfg):
    return {**tiny_task_cfg.model_dump(), "train_size": 30}


@pytest.fixture(scope="module")
def direct_rows(tiny_teacher, task, tmp_path_factory):
    """The same problems answered by the tiny teacher in-process (transformers backend)."""
    tmp = tmp_path_factory.mktemp("direct")
    recipe = _recipe(tmp, task, {"model": f"hf:{tiny_teacher}", "dtype": "float32"}, "direct")
    r = _cli("generate", str(recipe), cwd=tmp, env=os.environ)
    assert r.returncode == 0, r.stderr
    return _rows(tmp / "runs" / "direct")


def test_serve_auth_and_loopback_default(server, secret, tiny_teacher):
    assert _get(server + "/v1/models")[0] == 401
    assert _get(server + "/v1/models", "wrong")[0] == 401
    status, body = _get(server + "/v1/models", secret)
    assert status == 200 and body["data"][0]["id"] == "tiny"
    # Not loopback and no token: refused before any weight is loaded.
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_SERVE_TOKEN"}
    r = _cli("serve", f"hf:{tiny_teacher}", "--host", "0.0.0.0", "--port", str(free_port()), cwd=TESTS, env=env)
    assert r.returncode == 2
    lines = [ln for ln in r.stdout.splitlines() + r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "without a token" in lines[0] and "DISTILL_SERVE_TOKEN" in lines[0]


def test_http_teacher_through_faults_equals_direct(server, proxy, secret, task, direct_rows, tmp_path):
    """429/500/503/hangs/drops/resets/truncated and non-JSON bodies: retried, same dataset as direct."""
    base, control = proxy
    teacher = {
        "model": "openai:tiny",
        "base_url": base + "/v1",
        "retry_base": 0.05,
        "request_timeout": 1.0,
        "max_retries": 12,
        "concurrency": 4,
    }
    recipe = _recipe(tmp_path, task, teacher, "http")
    env = {**os.environ, "OPENAI_API_KEY": secret}
    r = _cli("generate", str(recipe), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _rows(tmp_path / "runs" / "http") == direct_rows
    counts = _get(control)[1]["counts"]
    assert all(counts.get(f, 0) >= 1 for f in ("429", "500", "503", "hang", "drop", "reset", "truncate", "nonjson"))
    # Re-running pays for nothing: every completion comes from the cache, the proxy sees no request.
    before = sum(counts.values())
    r = _cli("generate", str(recipe), "--force", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert sum(_get(control)[1]["counts"].values()) == before


def test_wrong_key_is_one_clear_line(server, task, tmp_path):
    recipe = _recipe(tmp_path, task, {"model": "openai:tiny", "base_url": server + "/v1"}, "nokey")
    env = {**os.environ, "OPENAI_API_KEY": "wrong"}
    r = _cli("generate", str(recipe), cwd=tmp_path, env=env)
    assert r.returncode == 2
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "HTTP 401" in lines[0] and "OPENAI_API_KEY" in lines[0]
    assert not (tmp_path / "runs" / "nokey" / "generate").exists()


def test_failed_rows_recorded_then_resumed_job_and_no_key_anywhere(server, proxy, secret, task, direct_rows, tmp_path):
    """Rows that spend their retries are kept with the reason; `jobs resume` retries only them, in
    Ray workers; afterwards the API key appears in no file the job wrote."""
    base, control = proxy
    _post(control, {"rate": 0.5})
    teacher = {
        "model": "openai:tiny",
        "base_url": base + "/v1",
        "retry_base": 0.01,
        "request_timeout": 1.0,
        "max_retries": 0,
        "executor": "ray",
        "workers": 2,
        "shard_rows": 4,
    }
    recipe = _recipe(tmp_path, task, teacher, "jobs")
    env = {**os.environ, "OPENAI_API_KEY": secret}
    env.pop("DISTILL_JOBS_DB", None)
    job = _cli("jobs", "submit", str(recipe), cwd=tmp_path, env=env).stdout.split()[-1]
    from distill.jobs import JobStore

    store = JobStore(tmp_path / ".distill" / "jobs.sqlite")
    for _ in range(600):
        state = store.get(job)["state"]
        if state not in ("queued", "starting", "running"):
            break
        time.sleep(0.2)
    status = store.get(job)
    assert status["state"] == "partial", (status, (tmp_path / ".distill" / "jobs" / f"{job}.log").read_text())
    assert status["progress"]["failed"] > 0 and "after 1 attempts" in status["error"]
    shown = _cli("jobs", "status", job, cwd=tmp_path, env=env).stdout
    assert f"{status['progress']['failed']} failed" in shown
    _post(control, {"rate": 0.0})
    seen_before = sum(_get(control)[1]["counts"].values())
    assert _cli("jobs", "resume", job, cwd=tmp_path, env=env).returncode == 0
    for _ in range(600):
        if store.get(job)["state"] not in ("queued", "starting", "running"):
            break
        time.sleep(0.2)
    assert store.get(job)["state"] == "done", (tmp_path / ".distill" / "jobs" / f"{job}.log").read_text()
    assert _rows(tmp_path / "runs" / "jobs") == direct_rows
    # Only the failed rows were asked again (each needs one or two calls), not the whole job.
    asked = sum(_get(control)[1]["counts"].values()) - seen_before
    assert 0 < asked <= 2 * status["progress"]["failed"]
    # The key is in no log, job store, cache, Parquet file, metadata or report.
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []


def test_endpoint_scores_equal_local_scores(server, secret, tiny_teacher, monkeypatch):
    """On-policy scoring over HTTP: `distill serve`'s echo + logprobs, read by the OpenAI backend, gives
    the local backend's tokens and top-k (ids through vLLM's `return_tokens_as_token_ids`)."""
    from distill.teachers.backends.base import ScoreRequest
    from distill.teachers.backends.openai import OpenAIBackend
    from distill.teachers.backends.transformers import TransformersBackend

    monkeypatch.setenv("DISTILL_TEST_KEY", secret)
    local = TransformersBackend(tiny_teacher)
    prompt = local.chat_prompt([{"role": "user", "content": "What is 3 + 4?"}])
    requests = [ScoreRequest(prompt, "Let's think step by step. 3 + 4 = 7. So the answer is 7.", 5)]
    requests.append(ScoreRequest(prompt, " the answer is 9", 3))
    remote = OpenAIBackend("tiny", server + "/v1", api="completions", api_key_env="DISTILL_TEST_KEY").score(requests)
    for r, want, got in zip(requests, local.score(requests), remote):
        assert got.error is None and want.error is None
        assert got.token_ids == want.token_ids and len(got.token_ids) > 3
        assert got.topk_ids == want.topk_ids and all(len(row) == r.logprobs for row in got.topk_ids)
        for a, b in zip(got.topk_logprobs, want.topk_logprobs):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
        assert got.tokens_in == want.tokens_in == len(local.tokenizer(prompt + r.completion).input_ids)

    # echo asks for scoring only: a request that also wants new tokens is refused, clearly
    req = urllib.request.Request(
        server + "/v1/completions",
        data=json.dumps({"prompt": "1 + 1", "echo": True, "logprobs": 2, "max_tokens": 8}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    assert "echo scores the prompt" in json.loads(e.value.read())["error"]["message"]
