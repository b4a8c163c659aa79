"""Job ergonomics (issue #19) with real runner processes: the store found from any folder of the project
(or --store, or DISTILL_JOB_STORE), `jobs list` with name and overrides in 80 columns, `status` with the
runner's pid, elapsed time and ETA, `logs -f` following to the end, a cancelled job's log saying so."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gate import Gate, gated_recipe, replay_project

pytestmark = pytest.mark.integration

STORE = Path(".distill") / "jobs.sqlite"


def _env(**extra) -> dict:
    """The environment without any job-store choice (each test picks its store), 80 columns wide."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_JOBS_DB", "DISTILL_JOB_STORE")}
    return {**env, "COLUMNS": "80", **extra}


def _cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], cwd=cwd, env=env or _env(), capture_output=True, text=True
    )


def _one_error_line(res) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stdout + res.stderr
    return lines[0]


def _job(store: Path, job_id: str) -> dict:
    from distill.jobs import JobStore

    return JobStore(store).get(job_id)


def _wait(store: Path, job_id: str, until, timeout: float = 120) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = _job(store, job_id)
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {_job(store, job_id)}\n{Path(job['log']).read_text()}")


def _ended(job: dict) -> bool:
    from distill.jobs import FINAL_STATES

    return job["state"] in FINAL_STATES


def _submit(recipe: Path, *overrides, cwd: Path, env=None) -> str:
    res = _cli("jobs", "submit", str(recipe), *overrides, cwd=cwd, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip()


@pytest.fixture
def project(tmp_path, tiny_task_cfg):
    """A project folder with a replay-teacher recipe (``recipe.yaml``, a real generate stage in a second)."""
    return replay_project(tmp_path / "proj", tiny_task_cfg)


@pytest.fixture
def gated(project):
    """``(recipe, gate)``: the project's recipe on a gated endpoint, 2-row batches, 2 requests free."""
    gate = Gate(free=2)
    yield gated_recipe(project, gate), gate
    gate.close()


def _blocked(store: Path, job_id: str) -> dict:
    """The gated job once its free rows are done and it waits on the held requests."""
    return _wait(store, job_id, lambda j: _ended(j) or j["progress"].get("rows", 0) >= 2)


def _wait_exit(pid: int, timeout: float = 60) -> None:
    """Until the runner ``pid`` has exited (it records the final state, then shuts its interpreter down)."""
    from distill.core.locks import pid_alive

    t0 = time.time()
    while pid_alive(pid) and time.time() - t0 < timeout:
        time.sleep(0.05)
    assert not pid_alive(pid), f"runner {pid} still running {timeout}s after its job ended"


def _log_lines(job: dict) -> list[str]:
    return [ln for ln in Path(job["log"]).read_text().splitlines() if ln.strip()]


def test_the_store_is_found_from_any_subfolder_of_the_project(project, tmp_path):
    job = _submit(project / "recipe.yaml", cwd=project)
    assert _wait(project / STORE, job, _ended)["state"] == "done"
    deep = project / "notes" / "today"
    deep.mkdir(parents=True)
    # A job submitted from a subfolder writes its cache there: that .distill/ must not hide the store.
    (project / "notes" / ".distill").mkdir()
    (project / "notes" / ".distill" / "cache.sqlite").write_bytes(b"")
    listed = _cli("jobs", "list", cwd=deep)
    assert listed.returncode == 0 and job in listed.stdout, listed.stdout + listed.stderr
    status = _cli("jobs", "status", job, cwd=deep)
    assert status.returncode == 0 and f"job {job}: done" in status.stdout, status.stdout + status.stderr
    logs = _cli("jobs", "logs", job, cwd=deep)
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    # A submission from a subfolder goes to the project's store too (and says where it went).
    sub = _cli("jobs", "submit", str(project / "recipe.yaml"), "name=from-sub", cwd=deep)
    assert sub.returncode == 0, sub.stderr
    second = sub.stdout.strip()
    assert f"job recorded in {project / STORE}" in sub.stderr
    assert _wait(project / STORE, second, _ended)["state"] == "done"
    assert not (deep / STORE).exists() and not (project / "notes" / STORE).exists()
    # Outside the project there is no store: list says so without making one, status is one error line.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    empty = _cli("jobs", "list", cwd=elsewhere)
    assert empty.returncode == 0 and empty.stdout.strip() == f"no jobs in {elsewhere / STORE}", empty.stdout
    assert not (elsewhere / ".distill").exists()
    assert f"no job store at {elsewhere / STORE}" in _one_error_line(_cli("jobs", "status", job, cwd=elsewhere))


def test_store_flag_and_environment_variable(project, tmp_path):
    from distill.jobs import JobStore

    job = _submit(project / "recipe.yaml", cwd=project)
    store = project / STORE
    assert _wait(store, job, _ended)["state"] == "done"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = tmp_path / "other.sqlite"
    JobStore(other)  # an empty store
    assert job in _cli("jobs", "list", "--store", str(store), cwd=elsewhere).stdout
    assert job in _cli("jobs", "list", cwd=elsewhere, env=_env(DISTILL_JOB_STORE=str(store))).stdout
    # The flag beats the variable, the variable beats the store found from the current folder.
    assert (
        job in _cli("jobs", "list", "--store", str(store), cwd=project, env=_env(DISTILL_JOB_STORE=str(other))).stdout
    )
    by_env = _cli("jobs", "list", cwd=project, env=_env(DISTILL_JOB_STORE=str(other)))
    assert by_env.returncode == 0 and job not in by_env.stdout and by_env.stdout.strip() == f"no jobs in {other}"
    for args in (("status", job), ("logs", job), ("logs", job, "-f")):
        res = _cli("jobs", *args, "--store", str(store), cwd=elsewhere)
        assert res.returncode == 0 and res.stdout.strip(), (args, res.stdout + res.stderr)
    # submit --store records the job there; its runner finds the store it was given.
    mine = _submit(project / "recipe.yaml", "name=flagged", "--store", str(other), cwd=elsewhere)
    assert _wait(other, mine, _ended)["state"] == "done"
    assert mine not in _cli("jobs", "list", cwd=project).stdout
    # A store that cannot be opened is one error line naming it.
    (tmp_path / "notes.txt").write_text("not a database, just notes\n" * 200)
    for bad in (tmp_path / "notes.txt", elsewhere):
        for args in (("list",), ("status", job), ("submit", str(project / "recipe.yaml"))):
            line = _one_error_line(_cli("jobs", *args, "--store", str(bad), cwd=elsewhere))
            assert f"cannot open the job store {bad}" in line, line


def test_list_shows_name_and_overrides_in_80_columns(project, tmp_path):
    overrides = ["name=listed", "teacher.shard_rows=3", "teacher.batch_size=3", "task.eval_size=6"]
    job = _submit(project / "recipe.yaml", *overrides, cwd=project)
    plain = _submit(project / "recipe.yaml", cwd=project)
    for j in (job, plain):
        assert _wait(project / STORE, j, _ended)["state"] == "done"
    res = _cli("jobs", "list", cwd=project)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split() == ["ID", "STATE", "NAME", "OVERRIDES", "SUBMITTED", "PROGRESS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == [job, plain]
    # the job's name after overrides, its overrides joined and cut with …, when it was submitted, its rows
    assert rows[job].split()[1:3] == ["done", "listed"], rows[job]
    shown = re.search(r" listed  (\S.*…) ", rows[job])
    assert shown and " ".join(overrides).startswith(shown.group(1)[:-1]) and len(shown.group(1)) > 10, rows[job]
    submitted = time.strftime("%m-%d %H:%M", time.localtime(_job(project / STORE, job)["created"]))
    assert f" {submitted}  " in rows[job] and rows[job].endswith("18/18"), rows[job]
    assert rows[plain].split()[1:3] == ["done", "demo"] and "…" not in rows[plain], rows[plain]
    # A wider terminal shows all of the overrides.
    wide = _cli("jobs", "list", cwd=project, env=_env(COLUMNS="200")).stdout
    assert " ".join(overrides) in wide and "…" not in wide


def test_list_reads_a_store_written_before_names_were_stored(project, tmp_path):
    """An old store (no name column) is brought up to date on open; its rows' names come from their recipe
    file while it is there, else "—"."""
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old)
    db.execute(
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY, recipe TEXT, overrides TEXT, address TEXT, run_dir TEXT, state TEXT,
            pid INTEGER, created REAL, started REAL, finished REAL, error TEXT, progress TEXT, log TEXT,
            cwd TEXT)"""
    )
    progress = json.dumps({"rows": 18, "total": 18})
    for job_id, recipe in (
        ("20250101-000000-aaaaaa", project / "recipe.yaml"),
        ("20250101-000001-bbbbbb", tmp_path / "gone.yaml"),
    ):
        db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, NULL, ?, 'done', 4242, 1.7e9, 1.7e9, 1.7e9 + 65, NULL, ?, ?, ?)",
            (
                job_id,
                str(recipe),
                json.dumps(["name=old-one"]),
                str(project / "runs" / "old-one"),
                progress,
                "/nowhere.log",
                str(project),
            ),
        )
    db.commit()
    db.close()
    res = _cli("jobs", "list", "--store", str(old), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:]}
    assert rows["20250101-000000-aaaaaa"][1:4] == ["done", "old-one", "name=old-one"], rows
    assert rows["20250101-000001-bbbbbb"][1:4] == ["done", "—", "name=old-one"], rows
    status = _cli("jobs", "status", "20250101-000000-aaaaaa", "--store", str(old), cwd=tmp_path)
    assert status.returncode == 0 and "  elapsed  1m 05s (started " in status.stdout, status.stdout + status.stderr


def test_status_shows_runner_pid_elapsed_and_eta(gated):
    recipe, gate = gated
    project = recipe.parent
    job = _submit(recipe, cwd=project)
    running = _blocked(project / STORE, job)
    assert running["state"] == "running", (running, Path(running["log"]).read_text())
    time.sleep(1.1)  # at least a second elapsed
    out = _cli("jobs", "status", job, cwd=project).stdout
    assert f"  runner   pid {running['pid']} (running)" in out, out
    assert re.search(r"^  elapsed  (\d+s|\d+m \d\ds) \(started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)$", out, re.M), out
    eta = re.search(r"^  eta      (\S+.*) \((\d+) rows at \S+ rows/s\)$", out, re.M)
    assert eta and int(eta.group(2)) == 18 - running["progress"]["rows"], out
    gate.open()
    done = _wait(project / STORE, job, _ended)
    assert done["state"] == "done", Path(done["log"]).read_text()
    _wait_exit(done["pid"])
    out = _cli("jobs", "status", job, cwd=project).stdout
    assert f"  runner   pid {done['pid']} (exited)" in out and "  eta      —" in out, out
    took = re.search(r"^  elapsed  (\d+)s \(started ", out, re.M)
    assert took and int(took.group(1)) <= done["finished"] - done["started"] + 1, out


def test_eta_is_from_the_current_runs_own_rate():
    """The arithmetic, exactly: 25 of 100 rows in 100 s is 0.25 rows/s, 75 left: 5 minutes; a resumed run
    that started at 20 rows did 5 in those 100 s: 0.05 rows/s, 1500 s."""
    from distill.jobs import timing_lines

    job = {
        "id": "j",
        "state": "running",
        "pid": None,
        "started": 1000.0,
        "finished": None,
        "progress": {"rows": 25, "failed": 0, "total": 100},
    }
    assert timing_lines(job, now=1100.0) == [
        "  runner   —",
        f"  elapsed  1m 40s (started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(1000.0))})",
        "  eta      5m 00s (75 rows at 0.25 rows/s)",
    ]
    assert timing_lines({**job, "start_rows": 20}, now=1100.0)[2] == "  eta      25m 00s (75 rows at 0.05 rows/s)"
    assert timing_lines({**job, "progress": {}}, now=1100.0)[2] == "  eta      —"
    assert timing_lines({**job, "state": "queued", "started": None}, now=1100.0)[1:] == [
        "  elapsed  —",
        "  eta      —",
    ]


def test_logs_follow_prints_the_whole_log_until_the_job_ends(gated, tmp_path):
    recipe, gate = gated
    project = recipe.parent
    job = _submit(recipe, cwd=project)
    out = open(tmp_path / "follow.out", "w+b")
    follower = subprocess.Popen(
        [sys.executable, "-m", "distill", "jobs", "logs", job, "-f", "-n", "100000"],
        cwd=project,
        env=_env(),
        stdout=out,
        stderr=subprocess.PIPE,
    )
    running = _blocked(project / STORE, job)
    assert running["state"] == "running", running
    # Ctrl-C on a second follower stops it quietly (and not the job).
    second_out = open(tmp_path / "second.out", "w+b")
    second = subprocess.Popen(
        [sys.executable, "-m", "distill", "jobs", "logs", job, "--follow"],
        cwd=project,
        env=_env(),
        stdout=second_out,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a test run started in the background of a non-interactive shell inherits
        # SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    t0 = time.time()
    while not (tmp_path / "second.out").stat().st_size and time.time() - t0 < 60:
        time.sleep(0.05)
    second.send_signal(signal.SIGINT)
    assert second.wait(timeout=30) == 130
    err = second.stderr.read()
    assert "Traceback" not in err and f"stopped following; job {job} goes on" in err, err
    time.sleep(1)
    assert follower.poll() is None  # still following the running job
    assert _job(project / STORE, job)["state"] == "running"
    gate.open()
    assert follower.wait(timeout=120) == 0, follower.stderr.read()
    assert _job(project / STORE, job)["state"] == "done"
    out.seek(0)
    followed = out.read()
    assert followed == Path(running["log"]).read_bytes() and b"generate" in followed


def test_a_cancelled_jobs_log_ends_saying_so(gated):
    recipe, gate = gated
    project = recipe.parent
    job = _submit(recipe, cwd=project)
    running = _blocked(project / STORE, job)
    assert running["state"] == "running", running
    res = _cli("jobs", "cancel", job, cwd=project)
    assert res.returncode == 0, res.stdout + res.stderr
    last = _log_lines(running)[-1]
    assert re.fullmatch(r"cancelled by `distill jobs cancel` at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", last), last
    shown = _cli("jobs", "status", job, cwd=project).stdout
    assert f"job {job}: cancelled" in shown and f"  reason   {last}" in shown, shown
    # A runner stopped with a plain SIGTERM says that instead, after a resume.
    assert _cli("jobs", "resume", job, cwd=project).returncode == 0
    again = _wait(project / STORE, job, lambda j: _ended(j) or (j["state"] == "running" and j["pid"] != running["pid"]))
    assert again["state"] == "running"
    t0 = time.time()  # its SIGTERM handler is set before it says what it has to do
    while sum("train +" in ln for ln in _log_lines(again)) < 2 and time.time() - t0 < 120:
        time.sleep(0.05)
    os.killpg(again["pid"], signal.SIGTERM)
    stopped = _wait(project / STORE, job, _ended)
    assert stopped["state"] == "cancelled", stopped
    last = _log_lines(stopped)[-1]
    assert re.fullmatch(r"cancelled by SIGTERM at \S+ \S+ \(not `distill jobs cancel`\)", last), last
