"""Generation jobs you can submit, watch, cancel and resume.

The job store is SQLite (``.distill/jobs.sqlite`` under the project directory). ``submit`` validates
the recipe, records the job and starts a detached runner process (``python -m distill.jobs <id>``),
which runs the generate stage and writes its progress to the store after every batch. Cancelling
sends SIGTERM to the runner's process group; committed shards and the completion cache survive, so
``resume`` continues without paying for or duplicating a row. The runner holds its run folder's lock
(``distill.core.locks``, naming the job): a submission onto a folder a live process holds is refused
before it gets an id, and a runner that loses a race for the folder fails with the holder's name
without touching the folder.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

from distill.core.errors import DistillError
from distill.core.locks import ensure_free, run_lock


def store_path() -> Path:
    return Path(os.environ.get("DISTILL_JOBS_DB", ".distill/jobs.sqlite"))


class JobStore:
    """The jobs table; every write is its own transaction (several processes share the file)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or store_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, recipe TEXT, overrides TEXT, address TEXT, run_dir TEXT, state TEXT,
                pid INTEGER, created REAL, started REAL, finished REAL, error TEXT, progress TEXT, log TEXT,
                cwd TEXT)"""
        )

    def add(self, recipe: str, overrides: list[str], address: str | None, run_dir: str) -> str:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        log = str((self.path.parent / "jobs" / f"{job_id}.log").resolve())
        self.db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, 'queued', NULL, ?, NULL, NULL, NULL, '{}', ?, ?)",
            (job_id, recipe, json.dumps(overrides), address, run_dir, time.time(), log, os.getcwd()),
        )
        return job_id

    def get(self, job_id: str) -> dict:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise DistillError(f"no job {job_id!r}", "see `distill jobs list` for job ids")
        job = dict(row)
        job["overrides"] = json.loads(job["overrides"])
        job["progress"] = json.loads(job["progress"] or "{}")
        if job["state"] == "running" and job["pid"] and not _alive(job["pid"]):
            job["state"] = "failed"  # the runner died without saying so (kill -9, reboot)
            job["error"] = job["error"] or "runner process disappeared; `distill jobs resume` continues it"
        return job

    def all(self) -> list[dict]:
        return [self.get(r["id"]) for r in self.db.execute("SELECT id FROM jobs ORDER BY created")]

    def update(self, job_id: str, **fields) -> None:
        if "progress" in fields:
            fields["progress"] = json.dumps(fields["progress"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (exited, not yet reaped) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def start_runner(store: JobStore, job_id: str) -> int:
    """Start the detached runner for ``job_id``; returns its pid."""
    job = store.get(job_id)
    Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(job["log"], "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill.jobs", job_id, str(store.path.resolve())],
            cwd=job["cwd"],  # recipe paths are relative to where the job was submitted
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: cancel reaches Ray workers too
            env={**os.environ, "COLUMNS": "120"},
        )
    store.update(job_id, state="running", pid=proc.pid, started=time.time(), error=None)
    return proc.pid


def submit(recipe_path: Path, overrides: list[str], address: str | None = None) -> str:
    """Validate the recipe, record the job, start its runner; returns the job id at once.

    Refused (``RunFolderBusy``) while a live process holds the recipe's run folder."""
    from distill.config import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    ensure_free(recipe.run_dir)
    store = JobStore()
    job_id = store.add(str(Path(recipe_path).resolve()), overrides, address, str(recipe.run_dir.resolve()))
    start_runner(store, job_id)
    return job_id


def cancel(job_id: str) -> dict:
    store = JobStore()
    job = store.get(job_id)
    if job["state"] != "running":
        raise DistillError(f"job {job_id} is {job['state']}, not running", "only running jobs can be cancelled")
    try:
        os.killpg(job["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    for _ in range(100):
        if not _alive(job["pid"]):
            break
        time.sleep(0.1)
    store.update(job_id, state="cancelled", finished=time.time())
    return store.get(job_id)


def resume(job_id: str) -> int:
    store = JobStore()
    job = store.get(job_id)
    if job["state"] in ("running", "done"):
        raise DistillError(
            f"job {job_id} is {job['state']}", "only failed, partial, cancelled or budget-stopped jobs resume"
        )
    ensure_free(Path(job["run_dir"]))
    return start_runner(store, job_id)


def status_lines(job: dict, recipe=None) -> list[str]:
    """Human-readable status: rows done / failed / remaining, tokens, cost, rate."""
    p = job["progress"]
    total, rows = p.get("total"), p.get("rows", 0)
    lines = [f"job {job['id']}: {job['state']}", f"  recipe   {job['recipe']} {' '.join(job['overrides'])}".rstrip()]
    if total:
        failed = p.get("failed", 0)
        lines.append(
            f"  rows     {rows}/{total} done, {failed} failed, {p.get('parse_errors', 0)} unparsed, "
            f"{total - rows} remaining"
        )
    if p:
        rate = p.get("tokens_out", 0) / max(p.get("seconds", 0), 1e-9)
        lines.append(f"  tokens   {p.get('tokens_in', 0)} in, {p.get('tokens_out', 0)} out, {rate:.0f} tok/s")
        lines.append(f"  cost     {p.get('cost', 0.0):.4f} (estimated from the recipe's prices)")
        lines.append(f"  cached   {p.get('cached', 0)} rows served from the completion cache")
    if job["error"]:
        lines.append(f"  reason   {job['error']}")
    lines.append(f"  output   {job['run_dir']}/generate   log {job['log']}")
    return lines


def run_job(job_id: str, db: str) -> int:
    """The runner: generate for the job's recipe, recording progress; exit code 0 on success.

    It takes the run folder's lock (naming the job) before anything else touches the folder; when
    another process holds it the job fails with that one line (exit 2) and the folder is left as it is."""
    from distill.config import load_recipe
    from distill.core.executor import init_ray
    from distill.pipeline import run_stage
    from distill.teachers.budget import BudgetExceeded

    store = JobStore(Path(db))
    job = store.get(job_id)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        recipe = load_recipe(job["recipe"], job["overrides"])

        def progress(stats: dict) -> None:
            store.update(job_id, progress=stats)  # one small WAL write per batch

        with run_lock(recipe.run_dir, job=job_id):
            if recipe.teacher.executor == "ray":
                init_ray(address=job["address"])
            metrics = run_stage(recipe, "generate", on_progress=progress).metrics
        failed = metrics.get("failed_rows", 0)
        final = {
            **store.get(job_id)["progress"],
            "rows": metrics["problems"] - failed,
            "failed": failed,
            "total": metrics["problems"],
        }
        if failed:  # finished, but some rows spent their retries: `resume` retries only those
            reasons = "; ".join(metrics.get("failure_reasons", []))[:400]
            store.update(job_id, state="partial", finished=time.time(), progress=final, error=reasons)
            return 4
        store.update(job_id, state="done", finished=time.time(), progress=final)
        return 0
    except BudgetExceeded as e:
        store.update(job_id, state="budget", finished=time.time(), error=str(e))
        return 3
    except DistillError as e:  # bad input or a refused endpoint: the reason, no traceback
        store.update(job_id, state="failed", finished=time.time(), error=str(e)[:500])
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        store.update(job_id, state="cancelled", finished=time.time(), error="cancelled")
        return 130
    except Exception as e:  # recorded for `distill jobs status`; the traceback is in the log
        import traceback

        traceback.print_exc()
        store.update(job_id, state="failed", finished=time.time(), error=f"{type(e).__name__}: {e}"[:500])
        return 1


if __name__ == "__main__":
    from distill.core.env import set_env_defaults

    set_env_defaults()
    sys.exit(run_job(sys.argv[1], sys.argv[2]))
