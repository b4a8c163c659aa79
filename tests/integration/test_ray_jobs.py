"""Jobs on a Ray cluster through its Jobs API: `distill jobs submit --address http://HEAD:PORT` hands the
job to the cluster (the store keeps Ray's job id), the submitting process exits at once and the job still
finishes, read back by `jobs status/logs/list` from fresh processes; `jobs cancel` stops one (STOPPED)."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster import RAY, Node, free_port
from gate import Gate, gated_recipe, replay_project

from distill.jobs import FINAL_STATES, JobStore

pytestmark = [pytest.mark.integration, pytest.mark.cluster]  # `make test-cluster`


@pytest.fixture(scope="module")
def jobs_head():
    """A one-node Ray head with the dashboard (the Jobs API) on loopback, in its own session and temp dir;
    its URL. Torn down by killing that session's processes only."""
    from distill.core.env import set_env_defaults

    set_env_defaults()
    root = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port())]
    cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(port), "--include-dashboard", "true"]
    cmd += ["--num-cpus", "2", "--temp-dir", str(root), "--disable-usage-stats"]
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"):
        cmd += [flag, str(free_port())]
    cmd += ["--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    log = (root / "start.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node = Node("head", root, session=proc.pid)
    try:
        assert proc.wait(timeout=90) == 0, (root / "start.log").read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        for _ in range(3):
            if not node.kill():
                break
            time.sleep(0.3)


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_JOB_STORE", "DISTILL_JOBS_DB")}
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _wait_state(job, cwd, until, timeout=45):
    """Poll `distill jobs status` (a fresh process each time) until its first line's state is in ``until``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = _cli("jobs", "status", job, cwd=cwd)
        assert out.returncode == 0, out.stderr
        state = out.stdout.splitlines()[0].split(": ", 1)[1]
        if state in until:
            return out.stdout
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state}: {out.stdout}")


def test_a_job_sent_to_the_cluster_runs_there_and_is_read_back(tmp_path, tiny_task_cfg, jobs_head):
    project = replay_project(tmp_path / "proj", tiny_task_cfg)
    sub = _cli("jobs", "submit", "recipe.yaml", "--address", jobs_head, cwd=project)
    assert sub.returncode == 0, sub.stderr  # the submitting process is gone from here on
    job = sub.stdout.strip()
    stored = JobStore(project / ".distill" / "jobs.sqlite").get(job)
    assert stored["ray_job_id"] == job and stored["address"] == jobs_head
    assert stored["state"] not in ("queued", "starting")  # never in the local queue

    status = _wait_state(job, project, FINAL_STATES)
    assert status.splitlines()[0] == f"job {job}: done", status
    assert "rows     18/18 done, 0 failed" in status and f"ray job {job} at {jobs_head}" in status
    rows = pq.read_table(project / "runs" / "demo" / "generate" / "dataset" / "train.parquet").to_pylist()
    assert len(rows) == 12 and all(r["rationale"] == "Add them up." for r in rows)

    logs = _cli("jobs", "logs", job, "-n", "200", cwd=project)
    assert logs.returncode == 0 and f"ray job {job} started" in logs.stdout, logs.stdout + logs.stderr
    last = [json.loads(x.split(" ", 1)[1]) for x in logs.stdout.splitlines() if x.startswith("distill-progress ")][-1]
    assert last["outcome"] == {"state": "done"} and last["rows"] == 18
    follow = _cli("jobs", "logs", job, "-f", "-n", "200", cwd=project)  # an ended job: the log, then exit 0
    assert follow.returncode == 0 and follow.stdout.strip() == logs.stdout.strip()
    listed = _cli("jobs", "list", cwd=project).stdout
    assert any(line.startswith(job) and " done " in line and line.endswith("18/18") for line in listed.splitlines())
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(jobs_head).get_job_status(job).value == "SUCCEEDED"


def test_cancel_stops_a_job_on_the_cluster(tmp_path, tiny_task_cfg, jobs_head):
    project = replay_project(tmp_path / "proj", tiny_task_cfg, name="held")
    gate = Gate(free=2)  # the job's later requests wait here: it is running when cancelled
    try:
        recipe = gated_recipe(project, gate).name
        sub = _cli("jobs", "submit", recipe, "--address", jobs_head, cwd=project)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip()
        t0 = time.monotonic()
        while gate.seen <= 2 and time.monotonic() - t0 < 40:  # running, its third request held
            time.sleep(0.2)
        assert gate.seen > 2
        out = _cli("jobs", "cancel", job, cwd=project)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == f"job {job}: cancelled", out.stdout
        assert "cancelled by `distill jobs cancel`" in out.stdout
    finally:
        gate.close()
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(jobs_head).get_job_status(job).value == "STOPPED"
    assert _wait_state(job, project, FINAL_STATES).splitlines()[0] == f"job {job}: cancelled"
