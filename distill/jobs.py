"""Generation jobs you can submit, watch, cancel and resume.

The job store is SQLite: ``--store PATH``, else ``$DISTILL_JOB_STORE``, else the nearest
``.distill/jobs.sqlite`` from the current folder up (so any subfolder of a project sees its jobs),
else ``./.distill/jobs.sqlite``, created by the first ``submit``. ``submit`` validates
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
from distill.core.locks import ensure_free, pid_alive, run_lock

STORE = Path(".distill") / "jobs.sqlite"
STORE_ENV = "DISTILL_JOB_STORE"
LEGACY_STORE_ENV = "DISTILL_JOBS_DB"  # the variable's earlier name, still honoured
FINAL_STATES = ("done", "partial", "budget", "failed", "cancelled")  # a runner sets no other after these


def find_store(start: Path | None = None) -> Path:
    """The nearest ``.distill/jobs.sqlite`` from ``start`` (default: the current folder) up to the
    filesystem root, as git finds ``.git``; none there: ``start/.distill/jobs.sqlite``.

    The store file itself is looked for, not any ``.distill/`` folder: a runner started in a subfolder
    writes its completion cache there (``.distill/cache.sqlite``), which must not hide the project's jobs."""
    start = Path(start or Path.cwd()).absolute()
    for folder in (start, *start.parents):
        if (folder / STORE).is_file():
            return folder / STORE
    return start / STORE


def store_path(store: str | Path | None = None) -> Path:
    """The job store to use: ``store`` (``--store``), else ``$DISTILL_JOB_STORE``, else ``find_store()``."""
    chosen = store or os.environ.get(STORE_ENV) or os.environ.get(LEGACY_STORE_ENV)
    return Path(chosen).expanduser() if chosen else find_store()


# Columns added after the first release: a store written before them gets them on open (NULL in old rows).
# name: the recipe's name after overrides; cancelled_by: who asked for the stop and when (the runner
# writes it to the log); start_rows: rows already done when the current run started (the ETA's base).
ADDED_COLUMNS = {"name": "TEXT", "cancelled_by": "TEXT", "start_rows": "INTEGER"}


class JobStore:
    """The jobs table; every write is its own transaction (several processes share the file).

    ``create=False`` (the commands that only read or act on existing jobs) refuses a store that does
    not exist instead of making an empty one where the user did not mean to. A store that cannot be
    opened (a folder, not a database, no permission) is one ``DistillError``."""

    def __init__(self, path: Path | None = None, create: bool = True):
        self.path = Path(path or store_path())
        if not create and not self.path.exists():
            raise DistillError(
                f"no job store at {self.path}",
                f"run from the project's folder (its nearest {STORE} from here up is used), "
                f"or pass --store PATH / set {STORE_ENV}; `distill jobs submit` creates one",
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                """CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY, recipe TEXT, overrides TEXT, address TEXT, run_dir TEXT, state TEXT,
                    pid INTEGER, created REAL, started REAL, finished REAL, error TEXT, progress TEXT, log TEXT,
                    cwd TEXT, name TEXT, cancelled_by TEXT, start_rows INTEGER)"""
            )
            self._add_columns()
        except (OSError, sqlite3.Error) as e:
            raise DistillError(
                f"cannot open the job store {self.path} ({e.strerror if isinstance(e, OSError) else e})",
                f"pass --store (or set {STORE_ENV} to) a writable SQLite file, or neither to use the nearest {STORE}",
            ) from None

    def _add_columns(self) -> None:
        """Bring a store written by an earlier version up to the current columns."""
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                try:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as e:  # another process added it a moment ago
                    if "duplicate column" not in str(e):
                        raise

    def add(self, recipe: str, overrides: list[str], address: str | None, run_dir: str, name: str | None = None) -> str:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        log = str((self.path.parent / "jobs" / f"{job_id}.log").resolve())
        self.db.execute(
            "INSERT INTO jobs (id, recipe, overrides, address, run_dir, state, created, progress, log, cwd, name) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, '{}', ?, ?, ?)",
            (job_id, recipe, json.dumps(overrides), address, run_dir, time.time(), log, os.getcwd(), name),
        )
        return job_id

    def get(self, job_id: str) -> dict:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise DistillError(f"no job {job_id!r} in {self.path}", "see `distill jobs list` for job ids")
        job = dict(row)
        job["overrides"] = json.loads(job["overrides"])
        job["progress"] = json.loads(job["progress"] or "{}")
        if job["state"] == "running" and job["pid"] and not pid_alive(job["pid"]):
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
    store.update(
        job_id,
        state="running",
        pid=proc.pid,
        started=time.time(),
        finished=None,
        error=None,
        cancelled_by=None,
        start_rows=job["progress"].get("rows", 0),  # a resumed run's rate counts only its own rows
    )
    return proc.pid


def submit(recipe_path: Path, overrides: list[str], address: str | None = None, store: Path | None = None) -> str:
    """Validate the recipe, record the job, start its runner; returns the job id at once.

    Refused (``RunFolderBusy``) while a live process holds the recipe's run folder."""
    from distill.config import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    ensure_free(recipe.run_dir)
    jobs = JobStore(store)
    run_dir = str(recipe.run_dir.resolve())
    job_id = jobs.add(str(Path(recipe_path).resolve()), overrides, address, run_dir, name=recipe.name)
    start_runner(jobs, job_id)
    return job_id


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cancel(job_id: str, store: Path | None = None) -> dict:
    """SIGTERM the job's runner (its process group), wait up to 10 s for it, mark the job cancelled.

    Who asked and when is recorded first, so the runner's last log line can say so; a runner that died
    before it could write that line (killed before its handler was set) gets it from here."""
    jobs = JobStore(store, create=False)
    job = jobs.get(job_id)
    if job["state"] != "running":
        raise DistillError(f"job {job_id} is {job['state']}, not running", "only running jobs can be cancelled")
    note = f"cancelled by `distill jobs cancel` at {_clock(time.time())}"
    jobs.update(job_id, cancelled_by=note)
    try:
        os.killpg(job["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    for _ in range(100):
        if not pid_alive(job["pid"]):
            break
        time.sleep(0.1)
    if not pid_alive(job["pid"]):
        _end_log_with(Path(job["log"]), note)
    jobs.update(job_id, state="cancelled", finished=time.time(), error=note)
    return jobs.get(job_id)


def _end_log_with(log: Path, line: str) -> None:
    """Append ``line`` to ``log`` unless it is already the log's last line."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    if text.rstrip("\n").rsplit("\n", 1)[-1] != line:
        with open(log, "a") as f:
            f.write(("\n" if text and not text.endswith("\n") else "") + line + "\n")


def resume(job_id: str, store: Path | None = None) -> int:
    store = JobStore(store, create=False)
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
    metrics_file = Path(job["run_dir"]) / "generate" / "metrics.json"
    m = json.loads(metrics_file.read_text()) if job["state"] == "partial" and metrics_file.exists() else {}
    if m.get("failed_rows") and m.get("failures"):  # a partial job: its failed rows' reasons, counted
        from distill.teachers.budget import failures_text

        lines.append(
            f"  FAILED   {m['failed_rows']} rows ({failures_text(m['failures'], top=3)}): the run is partial, "
            f"they count in no accuracy; `distill jobs resume {job['id']}` retries only them"
        )
    elif job["error"]:
        lines.append(f"  reason   {job['error']}")
    lines.append(f"  output   {job['run_dir']}/generate   log {job['log']}")
    return lines


def job_name(job: dict) -> str:
    """The recipe's name after the job's overrides: stored at submission; for a job recorded before
    names were stored, read again from its recipe file when that is still there, else "—"."""
    if job.get("name"):
        return job["name"]
    try:
        from distill.config import load_recipe

        return load_recipe(job["recipe"], job["overrides"]).name
    except Exception:  # the file is gone, moved or no longer valid: the name is unknown
        return "—"


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, a cut one ending in "…"."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def list_lines(jobs: list[dict], width: int = 80) -> list[str]:
    """``distill jobs list``: id, state, name, overrides, submitted, progress, as aligned columns in
    ``width`` characters (name and overrides share what the fixed columns leave, cut with "…")."""
    rows = []
    for job in jobs:
        p = job["progress"]
        done = f"{p.get('rows', 0)}/{p['total']}" if p.get("total") else "—"
        submitted = time.strftime("%m-%d %H:%M", time.localtime(job["created"])) if job["created"] else "—"
        rows.append([job["id"], job["state"], job_name(job), " ".join(job["overrides"]), submitted, done])
    header = ["ID", "STATE", "NAME", "OVERRIDES", "SUBMITTED", "PROGRESS"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    room = width - sum(widths[i] for i in (0, 1, 4, 5)) - 2 * 5  # two spaces between columns
    name_w = min(widths[2], max(room // 2, room - widths[3], len(header[2])))
    widths[2], widths[3] = name_w, max(room - name_w, len(header[3]))
    return ["  ".join(_cut(cell, w).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _duration(seconds: float) -> str:
    """``45s``, ``3m 05s``, ``2h 03m``, ``1d 04h``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _is_runner(pid: int | None, job_id: str) -> bool:
    """Whether ``pid`` is alive and still this job's runner (not a later process that got the same pid)."""
    if not pid or not pid_alive(pid):
        return False
    try:
        return job_id in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # no /proc (macOS): alive is the best we know
        return True


def timing_lines(job: dict, now: float | None = None) -> list[str]:
    """``distill jobs status``'s runner, elapsed and ETA lines ("—" where unknown).

    Elapsed runs from the current run's start to now (running) or to its end. The ETA, only while
    running, divides the rows still to do by this run's rate: rows done or failed since it started
    (a resumed run starts from the rows done before) over its elapsed time."""
    now = time.time() if now is None else now
    pid, started, finished = job.get("pid"), job.get("started"), job.get("finished")
    running = job["state"] == "running"
    runner = f"pid {pid} ({'running' if _is_runner(pid, job['id']) else 'exited'})" if pid else "—"
    end = now if running else finished
    elapsed = end - started if started and end and end >= started else None
    elapsed_text = f"{_duration(elapsed)} (started {_clock(started)})" if elapsed is not None else "—"
    eta = "—"
    p = job["progress"]
    if running and elapsed and p.get("total"):
        processed = p.get("rows", 0) + p.get("failed", 0)
        rate = (processed - (job.get("start_rows") or 0)) / elapsed
        if rate > 0:
            left = max(p["total"] - processed, 0)
            eta = f"{_duration(left / rate)} ({left} rows at {rate:.2g} rows/s)"
    return [f"  runner   {runner}", f"  elapsed  {elapsed_text}", f"  eta      {eta}"]


def _tail_start(data: bytes, lines: int) -> int:
    """The offset in ``data`` where its last ``lines`` lines begin."""
    parts = data.splitlines(keepends=True)
    return sum(len(part) for part in parts[: max(len(parts) - lines, 0)])


def follow_log(store: JobStore, job_id: str, lines: int = 40, out=None, poll: float = 0.2, grace: float = 10.0):
    """Print the last ``lines`` lines of the job's log, then what is appended, like ``tail -f``, until
    the job is in a final state and its runner has exited (what it prints on its way out is shown).

    A runner still alive ``grace`` seconds after its job ended (stuck shutting down Ray) is not waited
    for. A job that stays queued is followed until interrupted."""
    out = out or sys.stdout.buffer
    log = Path(store.get(job_id)["log"])
    pos, ended = None, None
    while True:
        # Decided before the log is read, so whatever the runner wrote before it exited is shown.
        job = store.get(job_id)
        last = False
        if job["state"] in FINAL_STATES:
            ended = ended or time.monotonic()
            last = not _is_runner(job["pid"], job_id) or time.monotonic() - ended > grace
        data = log.read_bytes() if log.exists() else b""
        if pos is None or pos > len(data):  # first look, or the log was replaced
            pos = _tail_start(data, lines) if pos is None else 0
        if len(data) > pos:
            out.write(data[pos:])
            out.flush()
            pos = len(data)
        if last:
            return
        time.sleep(poll)


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

    signals: list[str] = []

    def on_term(signum, frame):
        signals.append(signal.Signals(signum).name)
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
    except KeyboardInterrupt:  # the log's last line says who stopped the job and when
        how = signals[0] if signals else "SIGINT"
        note = (
            store.get(job_id)["cancelled_by"]
            or f"cancelled by {how} at {_clock(time.time())} (not `distill jobs cancel`)"
        )
        print(note, flush=True)
        store.update(job_id, state="cancelled", finished=time.time(), error=note)
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
