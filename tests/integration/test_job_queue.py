"""The job queue with real runner and scheduler processes: at most ``max_running`` jobs at once, priority
then age, ``--after``, pause / resume / cancel of queued and running jobs, and every job run exactly once
while the scheduler is killed with SIGKILL at random moments."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from gate import Gate, gated_recipe, replay_project

from distill.jobs import FINAL_STATES, JobStore, scheduler_pid

pytestmark = pytest.mark.integration

STORE = Path(".distill") / "jobs.sqlite"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_JOBS_DB", "DISTILL_JOB_STORE")}
    return {**env, "COLUMNS": "160"}


def _cli(*args, cwd):
    res = subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _submit(cwd, recipe, *args) -> str:
    return _cli("jobs", "submit", recipe, *args, cwd=cwd).strip().splitlines()[-1]


def _jobs(cwd) -> dict[str, dict]:
    return {j["id"]: j for j in JobStore(cwd / STORE).all()}


def _wait(cwd, until, timeout=180, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        jobs = _jobs(cwd)
        if until(jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {[(j['id'], j['state']) for j in _jobs(cwd).values()]}")


def _starts(job: dict) -> int:
    """How many runners claimed this job (each writes one "started job" line to its log)."""
    log = Path(job["log"])
    return (
        sum(line.endswith(f"started job {job['id']}") for line in log.read_text().splitlines()) if log.exists() else 0
    )


def _max_overlap(jobs) -> int:
    """The most jobs whose [started, finished] intervals overlap at one moment."""
    events = sorted([(j["started"], 1) for j in jobs] + [(j["finished"], -1) for j in jobs], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _listed(cwd) -> dict[str, str]:
    """``distill jobs list``'s STATE column by job id (the column may hold spaces: read up to the name)."""
    out = _cli("jobs", "list", cwd=cwd).splitlines()
    header = out[0]
    state_at, name_at = header.index("STATE"), header.index("NAME")
    return {line.split()[0]: line[state_at:name_at].strip() for line in out[1:]}


@pytest.fixture
def project(tmp_path, tiny_task_cfg):
    return replay_project(tmp_path / "proj", tiny_task_cfg)


@pytest.fixture
def held(project):
    """``(gate, a)``: at most one job at a time, and job ``a`` running, its later requests held by ``gate``."""
    gate = Gate(free=2)
    try:
        _cli("jobs", "queue", "--max-running", "1", cwd=project)
        a = _submit(project, gated_recipe(project, gate).name, "name=a")
        _wait(project, lambda js: js[a]["state"] == "running" and js[a]["progress"].get("rows", 0) >= 2, what="a")
        yield gate, a
    finally:
        gate.close()


def test_priority_then_age_after_and_one_at_a_time(project, held):
    gate, a = held
    b = _submit(project, "recipe.yaml", "name=b")
    c = _submit(project, "recipe.yaml", "name=c", "--priority", "5")
    d = _submit(project, "recipe.yaml", "name=d", "--after", b)
    time.sleep(1.0)  # the scheduler is up: nothing else starts while a runs
    listed = _listed(project)
    assert listed[a] == "running" and listed[c] == "queued 1" and listed[b] == "queued 2", listed
    assert listed[d] == "waiting", listed
    status = _cli("jobs", "status", c, cwd=project)
    assert "  queue    queued 1; 1 running; priority 5" in status, status
    queue = _cli("jobs", "queue", cwd=project)
    assert queue.startswith("max running 1; 1 running; scheduler pid "), queue
    assert queue.splitlines()[1:] == [
        f"  {a}  running   a",
        f"  {c}  queued 1  c  priority 5",
        f"  {b}  queued 2  b  priority 0",
        f"  {d}  waiting   d  priority 0  (after {b} (queued))",
    ], queue
    gate.open()
    jobs = _wait(project, lambda js: all(j["state"] in FINAL_STATES for j in js.values()), what="the queue")
    assert [jobs[j]["state"] for j in (a, b, c, d)] == ["done"] * 4, jobs
    order = sorted((a, b, c, d), key=lambda j: jobs[j]["started"])
    assert order == [a, c, b, d], order
    assert _max_overlap(jobs.values()) == 1
    assert all(_starts(j) == 1 for j in jobs.values())
    status = _cli("jobs", "status", a, cwd=project)  # the plan made before its first call, beside the actual
    assert "  estimate vs actual" in status and "    tokens in " in status and "    time " in status, status
    calls = next(line.split() for line in status.splitlines() if line.startswith("    calls "))
    assert calls[4] == "actual" and int(calls[3]) == jobs[a]["progress"]["calls"] >= jobs[a]["progress"]["total"]


def test_pause_resume_and_cancel(project, held):
    gate, a = held
    b = _submit(project, "recipe.yaml", "name=b")
    c = _submit(project, "recipe.yaml", "name=c")
    assert "job " + b + ": paused" in _cli("jobs", "pause", b, cwd=project)
    assert "job " + c + ": cancelled" in _cli("jobs", "cancel", c, cwd=project)
    assert "job " + a + ": paused" in _cli("jobs", "pause", a, cwd=project)  # a running job stops
    time.sleep(1.0)
    jobs = _jobs(project)
    assert [jobs[j]["state"] for j in (a, b, c)] == ["paused", "paused", "cancelled"], jobs
    assert _listed(project)[a] == "paused"
    assert scheduler_pid(JobStore(project / STORE)) is None  # nothing can start: it exited
    _cli("jobs", "resume", b, cwd=project)
    _wait(project, lambda js: js[b]["state"] == "done", what="b")
    gate.open()
    _cli("jobs", "resume", a, cwd=project)
    jobs = _wait(project, lambda js: js[a]["state"] in FINAL_STATES, what="a")
    assert jobs[a]["state"] == "done", Path(jobs[a]["log"]).read_text()
    assert _starts(jobs[a]) == 2 and _starts(jobs[b]) == 1 and _starts(jobs[c]) == 0
    ids = pq.read_table(project / "runs" / "a" / "generate" / "shards")["id"].to_pylist()
    assert len(ids) == len(set(ids)) == jobs[a]["progress"]["total"]  # the paused rows were not redone


def test_twenty_jobs_two_at_a_time_each_once_while_the_scheduler_is_killed(project):
    rng = random.Random(7)
    _cli("jobs", "queue", "--max-running", "2", cwd=project)
    ids = [_submit(project, "recipe.yaml", f"name=q{i:02d}") for i in range(20)]
    store = JobStore(project / STORE)
    kills = 0
    t0 = time.time()
    while time.time() - t0 < 600:
        jobs = _jobs(project)
        if all(j["state"] in FINAL_STATES for j in jobs.values()):
            break
        pid = scheduler_pid(store)
        if pid and kills < 6 and rng.random() < 0.5:
            time.sleep(rng.uniform(0, 1.5))  # a random moment: between claims, mid-spawn, while idle
            try:
                os.kill(pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
            if rng.random() < 0.5:
                _cli("jobs", "list", cwd=project)  # a user's next command starts it again
            # else: the next runner to finish starts it again
        elif pid is None:
            time.sleep(2.0)
            if scheduler_pid(store) is None and not any(
                j["state"] in ("starting", "running") for j in _jobs(project).values()
            ):
                _cli("jobs", "list", cwd=project)  # nothing would wake it but a user
        time.sleep(0.3)
    jobs = _jobs(project)
    assert kills >= 3
    assert [jobs[j]["state"] for j in ids] == ["done"] * 20, [(j, jobs[j]["state"], jobs[j]["error"]) for j in ids]
    assert [_starts(jobs[j]) for j in ids] == [1] * 20
    assert _max_overlap(jobs.values()) <= 2
    for i in range(20):
        rows = pq.read_table(project / "runs" / f"q{i:02d}" / "generate" / "shards")["id"].to_pylist()
        assert len(rows) == len(set(rows)) == jobs[ids[i]]["progress"]["total"]
