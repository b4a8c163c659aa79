"""Two writers on one run folder (issue #19): the second gets one line naming the holder, exit 2, and the
holder's files stay as they were — for `distill generate`, the Python API, `jobs submit` and a job runner."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import write_recipe

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JOB = "20260101-120000-abc123"

# The live holder: takes the run folder's lock as job JOB (as a job runner does), holds it until `stop`.
HOLD = """
import os, sys, time
from pathlib import Path
from distill.core.locks import run_lock
with run_lock(sys.argv[1], job=sys.argv[2]):
    print("held", os.getpid(), flush=True)
    while not Path(sys.argv[3]).exists():
        time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_task_cfg, tiny_student):
    """A replay-teacher recipe (a real generate stage in a second) over the tiny task's problems."""
    import json

    from distill.core.problems import load_problems

    root = tmp_path_factory.mktemp("lock")
    train, evals = load_problems(tiny_task_cfg)
    recs = [{"question": p["question"], "rationale": "Add them up.", "answer": str(p["gold"])} for p in train + evals]
    (root / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    teacher = {"model": f"replay:{root / 'teacher.jsonl'}", "executor": "local"}
    return write_recipe(root, "dup", tiny_task_cfg, teacher, {"model": f"hf:{tiny_student}"})


def _env():
    return {**os.environ, "COLUMNS": "400"}


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd, env=_env(), capture_output=True, text=True)


def _one_error_line(res) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stdout + res.stderr
    return lines[0]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (the lock file aside) with its content hash and mtime."""
    return {
        str(f.relative_to(folder)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != ".lock"
    }


@pytest.fixture
def held(recipe, tmp_path):
    """The run folder after one real generate, with an in-flight work folder, locked by a live process."""
    run_dir = recipe.parent / "runs" / "dup"
    res = _cli("generate", str(recipe), "--force")
    assert res.returncode == 0, res.stdout + res.stderr
    # What an in-flight first writer has on disk (as in the issue): its temp stage folder with a shard.
    (run_dir / ".generate.tmp" / "shards").mkdir(parents=True, exist_ok=True)
    (run_dir / ".generate.tmp" / "shards" / "part-00325.parquet").write_bytes(b"committed by the holder")
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), JOB, str(stop)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().split() == ["held", str(proc.pid)]
    yield run_dir, proc
    stop.touch()
    proc.wait(timeout=30)


def _names_the_holder(line: str, run_dir: Path, proc) -> None:
    assert line.startswith(
        f"error: run folder {run_dir} is in use by job {JOB} (pid {proc.pid} on {socket.gethostname()}, since "
    ), line
    assert line.endswith(f"(`distill jobs cancel {JOB}`), or give this run another name (name=...)"), line


def test_second_generate_exits_2_naming_the_holder_and_leaves_its_files(recipe, held):
    run_dir, proc = held
    before = _snapshot(run_dir)
    line = _one_error_line(_cli("generate", str(recipe), "--force"))
    _names_the_holder(line, run_dir, proc)
    assert _snapshot(run_dir) == before
    # The holder killed with SIGKILL: the next writer takes the folder over and runs.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    res = _cli("generate", str(recipe), "--force")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stopped without letting go of it; taking over" in res.stderr
    assert not (run_dir / ".generate.tmp").exists() and (run_dir / "generate" / "DONE.json").exists()


def test_python_api_in_another_process_raises_naming_the_holder(recipe, held):
    run_dir, proc = held
    before = _snapshot(run_dir)
    code = (
        "import sys, distill\n"
        "try:\n"
        "    distill.generate(sys.argv[1], force=True)\n"
        "except distill.DistillError as e:\n"
        "    print(e)\n"
        "    sys.exit(2)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(recipe)], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert res.returncode == 2, res.stdout + res.stderr
    _names_the_holder("error: " + res.stdout.strip(), run_dir, proc)
    assert _snapshot(run_dir) == before


def test_jobs_submit_onto_a_held_folder_is_refused_before_it_gets_an_id(recipe, held):
    run_dir, proc = held
    cwd = recipe.parent
    env = {k: v for k, v in _env().items() if k != "DISTILL_JOBS_DB"}
    res = subprocess.run(
        [sys.executable, "-m", "distill", "jobs", "submit", str(recipe), "name=dup"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    _names_the_holder(_one_error_line(res), run_dir, proc)
    assert not (cwd / ".distill" / "jobs.sqlite").exists()  # no job recorded, no runner started


def test_a_job_runner_that_loses_the_race_fails_with_the_reason_and_touches_nothing(recipe, held, tmp_path):
    """Two submissions at once both pass the cheap check; the runner that finds the folder held fails."""
    from distill.jobs import JobStore, start_runner, status_lines

    run_dir, proc = held
    before = _snapshot(run_dir)
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.add(str(recipe), [], None, str(run_dir))
    start_runner(store, job)
    t0 = time.time()
    while store.get(job)["state"] in ("starting", "running") and time.time() - t0 < 120:
        time.sleep(0.1)
    s = store.get(job)
    assert s["state"] == "failed" and s["progress"] == {}, s
    assert s["error"].startswith(f"run folder {run_dir} is in use by job {JOB} (pid {proc.pid} on "), s
    assert "reason   run folder" in "\n".join(status_lines(s))
    log = [ln for ln in Path(s["log"]).read_text().splitlines() if ln.strip()]
    assert log[1:] == [f"error: {s['error']}"] and log[0].endswith(f"started job {job}"), log
    assert _snapshot(run_dir) == before
