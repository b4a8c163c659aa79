"""Jobs as a user runs them: submit, watch, kill -9 at a random point, resume — exactly once."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from distill.jobs import FINAL_STATES

pytestmark = pytest.mark.integration


def _cli(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd, env=env, capture_output=True, text=True)


def _status(job, cwd, env):
    from distill.jobs import JobStore

    return JobStore(cwd / ".distill" / "jobs.sqlite").get(job)


def _wait(job, cwd, env, until, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = _status(job, cwd, env)
        if until(s):
            return s
        time.sleep(0.05)
    raise AssertionError(f"job {job} stuck in {_status(job, cwd, env)}")


def _rows(run_dir):
    out = []
    for split in ("train", "eval"):
        out += pq.read_table(run_dir / "generate" / "dataset" / f"{split}.parquet").to_pylist()
    return sorted(json.dumps({k: r[k] for k in ("id", "rationale", "pred", "correct")}) for r in out)


def test_killed_job_resumes_to_the_same_dataset(tmp_path, tiny_teacher, tiny_task_cfg):
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_JOBS_DB"}  # each folder's own store
    task = {**tiny_task_cfg.model_dump(), "train_size": 100}
    base = {
        "output_dir": "runs",
        "task": task,
        "teacher": {
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 24,
            "batch_size": 2,
            "executor": "local",
            "dtype": "float32",
            "keep": "all",
            "shard_rows": 4,
        },
    }
    recipes = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        recipes[name] = tmp_path / name / "recipe.yaml"
        recipes[name].write_text(yaml.safe_dump({**base, "name": name, "cache": ".distill/cache.sqlite"}))

    # Uninterrupted reference, through the same job machinery.
    ref = _cli("jobs", "submit", "recipe.yaml", cwd=tmp_path / "straight", env=env).stdout.strip()
    s = _wait(ref, tmp_path / "straight", env, lambda s: s["state"] in ("done", "failed"))
    assert s["state"] == "done", s

    cwd = tmp_path / "killed"
    job = _cli("jobs", "submit", "recipe.yaml", cwd=cwd, env=env).stdout.strip()
    kills = 0
    for _ in range(3):  # kill -9 at a random point, three times
        target = random.randint(2, 80)
        s = _wait(
            job,
            cwd,
            env,
            lambda s, t=target: (
                (s["state"] == "running" and s["progress"].get("rows", 0) >= t) or s["state"] in FINAL_STATES
            ),
        )
        if s["state"] != "running":
            break
        os.killpg(s["pid"], signal.SIGKILL)
        kills += 1
        s = _wait(job, cwd, env, lambda s: s["state"] == "failed")
        assert "disappeared" in s["error"]
        res = _cli("jobs", "resume", job, cwd=cwd, env=env)
        assert res.returncode == 0, res.stderr
    s = _wait(job, cwd, env, lambda s: s["state"] in ("done", "failed"))
    assert s["state"] == "done", (s, _cli("jobs", "logs", job, cwd=cwd, env=env).stdout)
    assert kills >= 1
    assert _rows(cwd / "runs" / "killed") == _rows(tmp_path / "straight" / "runs" / "straight")
    ids = pq.read_table(cwd / "runs" / "killed" / "generate" / "shards")["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 106
    status = _cli("jobs", "status", job, cwd=cwd, env=env).stdout
    assert "106/106 done" in status and "tokens" in status
