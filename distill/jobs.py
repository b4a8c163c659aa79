"""Generation jobs you can submit, watch, cancel and resume.

The job store is SQLite: ``--store PATH``, else ``$DISTILL_JOB_STORE``, else the nearest
``.distill/jobs.sqlite`` from the current folder up (so any subfolder of a project sees its jobs),
else ``./.distill/jobs.sqlite``, created by the first ``submit``. ``submit`` validates
the recipe and enqueues the job; the queue's scheduler (below) starts a detached runner process
(``python -m distill.jobs <id>``), which runs the generate stage and writes its progress to the store
after every batch. Cancelling
sends SIGTERM to the runner's process group; committed shards and the completion cache survive, so
``resume`` continues without paying for or duplicating a row. The runner holds its run folder's lock
(``distill.core.locks``, naming the job): a submission onto a folder a live process holds is refused
before it gets an id, and a runner that loses a race for the folder fails with the holder's name
without touching the folder.

The queue: at most ``max_running`` jobs run at once (``distill jobs queue --max-running N``, kept in
the store; default 1, as a generation job on the embedded teacher uses every core), the next by
priority (higher first), then by submission; a job given ``--after ID`` waits until that job is done;
a paused job waits until resumed; a job whose run folder another job of the store is using waits for
it. One scheduler process per store (``python -m distill.jobs --scheduler STORE``) starts them: it
holds ``jobs/scheduler.lock`` beside the store (an ``fcntl.flock``, dropped by the kernel however it
ends), is started on demand by ``submit``/``resume`` and by every ``distill jobs`` command and runner
exit that finds queued jobs without one, and exits when nothing queued can start. Each job starts
exactly once, even when the scheduler is killed at any point: the scheduler claims a job
(``queued`` → ``starting``, one atomic UPDATE) before it spawns its runner, and the runner claims it
again (``starting`` → ``running``, with its own pid) before anything else; a runner that loses that
claim exits without touching the job. A ``starting`` job whose runner never appeared (the scheduler
died between its claim and the spawn) goes back to the queue after ``STARTING_TIMEOUT`` seconds.
The job store suffices as the queue (a maintained queue such as huey would add a second database
and a worker daemon for what one SQLite table and one lock do here); on a Ray cluster, Ray's own
scheduling decides where a job's actors run.

Jobs on a cluster (``--address http://HEAD:8265``, the dashboard's Jobs API): ``submit`` hands the job to
Ray (``JobSubmissionClient.submit_job``, submission id = the distill job id, one entrypoint CPU) instead of
the queue, so it runs on the cluster and outlives the submitting machine; the store keeps ``ray_job_id``
and the address. The entrypoint (``python -m distill.jobs --ray-job ...``) runs in the submitting folder's
path on the cluster (a shared folder, as ``student.storage_path`` needs) and prints one ``distill-progress``
JSON line per batch and a last one with the outcome; ``status``, ``list``, ``logs`` and ``cancel`` read
Ray's status and log (``sync_ray_job``) and write what they learn back to the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
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
WAITING_STATES = ("queued", "paused")  # not started yet, or stopped by `pause` and waiting for `resume`
ACTIVE_STATES = ("starting", "running")  # counted against max_running
STARTING_TIMEOUT = 15.0  # seconds a claimed job may wait for its runner before it is queued again
MAX_START_ATTEMPTS = 3  # runners that died before claiming their job: then the job fails
SCHEDULER_POLL = 0.2  # seconds between the scheduler's looks at the queue
RAY_PENDING = "pending"  # a Ray job the cluster has not started yet (Ray's PENDING): not in the local queue
RAY_JOB_CPUS = 1  # the entrypoint's CPU on the cluster (the stage's driver; the local executor runs in it)
PROGRESS_MARK = "distill-progress "  # a Ray job's log line: this, then the progress as JSON


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
# priority/after: the queue's order and dependencies; claimed/attempts: when the scheduler claimed the job
# and how many runners it spawned for it; stop_as: the state a SIGTERM'd runner records ("paused" for
# `pause`, else "cancelled"); estimate: the plan's calls, tokens, cost and time, made before the first call.
ADDED_COLUMNS = {
    "name": "TEXT",
    "cancelled_by": "TEXT",
    "start_rows": "INTEGER",
    "priority": "INTEGER",
    "after": "TEXT",
    "claimed": "REAL",
    "attempts": "INTEGER",
    "stop_as": "TEXT",
    "estimate": "TEXT",
    "ray_job_id": "TEXT",  # a job sent through Ray's Jobs API (its submission id); the Jobs address is `address`
}
DEFAULT_MAX_RUNNING = 1


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
            self.db.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT)")
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

    def add(
        self,
        recipe: str,
        overrides: list[str],
        address: str | None,
        run_dir: str,
        name: str | None = None,
        priority: int = 0,
        after: list[str] | tuple = (),
        state: str = "queued",
    ) -> str:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        log = str((self.path.parent / "jobs" / f"{job_id}.log").resolve())
        self.db.execute(
            "INSERT INTO jobs (id, recipe, overrides, address, run_dir, state, created, progress, log, cwd, name, "
            "priority, after, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?, ?, ?, ?, ?, 0)",
            (
                job_id,
                recipe,
                json.dumps(overrides),
                address,
                run_dir,
                state,  # a Ray job is never "queued": the local scheduler must not start it
                time.time(),
                log,
                os.getcwd(),
                name,
                priority,
                json.dumps(list(after)),
            ),
        )
        return job_id

    def get(self, job_id: str) -> dict:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise DistillError(f"no job {job_id!r} in {self.path}", "see `distill jobs list` for job ids")
        job = dict(row)
        job["overrides"] = json.loads(job["overrides"])
        job["progress"] = json.loads(job["progress"] or "{}")
        job["after"] = json.loads(job.get("after") or "[]")
        job["priority"] = job.get("priority") or 0
        job["estimate"] = json.loads(job["estimate"]) if job.get("estimate") else None
        if job["state"] == "running" and job["pid"] and not pid_alive(job["pid"]):
            job["state"] = "failed"  # the runner died without saying so (kill -9, reboot)
            job["error"] = job["error"] or "runner process disappeared; `distill jobs resume` continues it"
        return job

    def all(self) -> list[dict]:
        return [self.get(r["id"]) for r in self.db.execute("SELECT id FROM jobs ORDER BY created")]

    def update(self, job_id: str, **fields) -> None:
        self.update_if(job_id, None, **fields)

    def update_if(self, job_id: str, states: tuple[str, ...] | None, **fields) -> bool:
        """Set ``fields`` on the job, only while its state is one of ``states`` (None: any); one
        atomic UPDATE, so of several processes making the same move exactly one succeeds."""
        for key in ("progress", "estimate"):
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k} = ?" for k in fields)
        where, args = "id = ?", [job_id]
        if states is not None:
            where += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        return self.db.execute(f"UPDATE jobs SET {sets} WHERE {where}", (*fields.values(), *args)).rowcount == 1

    def max_running(self) -> int:
        row = self.db.execute("SELECT value FROM settings WHERE key = 'max_running'").fetchone()
        return int(row["value"]) if row else DEFAULT_MAX_RUNNING

    def set_max_running(self, n: int) -> None:
        if n < 1:
            raise DistillError(f"--max-running {n} is below 1", "pass a whole number of jobs, 1 or more")
        self.db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('max_running', ?)", (str(n),))


def start_runner(store: JobStore, job_id: str) -> int | None:
    """Claim the queued ``job_id`` (``queued`` → ``starting``) and start its detached runner; returns its
    pid, or None when another scheduler claimed the job first. The runner itself moves the job to
    ``running``; the scheduler only starts runners within ``max_running``."""
    job = store.get(job_id)
    if not store.update_if(job_id, ("queued",), state="starting", claimed=time.time(), pid=None):
        return None
    store.db.execute("UPDATE jobs SET attempts = COALESCE(attempts, 0) + 1 WHERE id = ?", (job_id,))
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
    store.update_if(job_id, ("starting",), pid=proc.pid)  # the runner may have claimed it already
    return proc.pid


def submit(
    recipe_path: Path,
    overrides: list[str],
    address: str | None = None,
    store: Path | None = None,
    priority: int = 0,
    after: list[str] | tuple = (),
) -> str:
    """Validate the recipe and enqueue the job; returns its id at once (the scheduler starts it when a
    slot is free, its ``after`` jobs are done and no other job of the store uses its run folder).

    Refused (``RunFolderBusy``) while a live process holds the recipe's run folder; refused when an
    ``after`` id is not a job of this store. A Jobs API ``address`` (``http://HEAD:8265``) sends the job to
    that cluster instead (``submit_to_ray``)."""
    from distill.config import load_recipe

    if is_jobs_address(address):
        if after or priority:
            raise DistillError(
                "--after and --priority order the local queue; a job sent to a Ray cluster is scheduled by Ray",
                "drop them, or submit without an http:// --address",
            )
        return submit_to_ray(recipe_path, overrides, address, store)
    recipe = load_recipe(recipe_path, overrides)
    ensure_free(recipe.run_dir)
    jobs = JobStore(store)
    for dep in after:
        jobs.get(dep)  # one clear line naming an unknown id
    run_dir = str(recipe.run_dir.resolve())
    job_id = jobs.add(
        str(Path(recipe_path).resolve()), overrides, address, run_dir, name=recipe.name, priority=priority, after=after
    )
    ensure_scheduler(jobs)
    return job_id


# --- the queue ---------------------------------------------------------------------------------------


def _blocked_by(job: dict, by_id: dict[str, dict]) -> list[str]:
    """The ``after`` jobs ``job`` still waits for (not done; an id no longer in the store counts as done)."""
    return [dep for dep in job["after"] if dep in by_id and by_id[dep]["state"] != "done"]


def _local(jobs: list[dict]) -> list[dict]:
    """The jobs of the local queue (a job sent to a Ray cluster is Ray's to schedule)."""
    return [j for j in jobs if not j.get("ray_job_id")]


def queue_order(jobs: list[dict]) -> list[dict]:
    """The queued jobs in the order the scheduler will consider them: priority (higher first), then
    submission time."""
    queued = [j for j in jobs if j["state"] == "queued" and not j.get("ray_job_id")]
    return sorted(queued, key=lambda j: (-(j["priority"] or 0), j["created"] or 0, j["id"]))


def waiting_reason(job: dict, jobs: list[dict]) -> str | None:
    """Why a queued job is not started yet (None for one that starts when a slot is free)."""
    by_id = {j["id"]: j for j in jobs}
    blocked = _blocked_by(job, by_id)
    if blocked:
        return "after " + ", ".join(f"{dep} ({by_id[dep]['state']})" for dep in blocked)
    holder = next(
        (
            j
            for j in _local(jobs)
            if j["id"] != job["id"] and j["state"] in ACTIVE_STATES and j["run_dir"] == job["run_dir"]
        ),
        None,
    )
    return f"run folder in use by job {holder['id']}" if holder else None


def schedule_once(store: JobStore) -> list[str]:
    """One look at the queue: queue again the claimed jobs whose runner never appeared, then start the
    queued jobs that may start, within ``max_running``. Returns the ids started."""
    now = time.time()
    for job in store.all():
        if job["state"] != "starting" or now - (job["claimed"] or 0) < STARTING_TIMEOUT:
            continue
        if _is_runner(job["pid"], job["id"]):
            continue  # spawned and alive: it claims the job in a moment
        if (job["attempts"] or 0) >= MAX_START_ATTEMPTS:
            store.update_if(
                job["id"],
                ("starting",),
                state="failed",
                finished=now,
                error=f"{job['attempts']} runners died before starting; see the log {job['log']}",
            )
        else:
            store.update_if(job["id"], ("starting",), state="queued", pid=None)
    started: list[str] = []
    jobs = store.all()
    slots = store.max_running() - sum(j["state"] in ACTIVE_STATES for j in _local(jobs))
    for job in queue_order(jobs):
        if slots <= 0:
            break
        if waiting_reason(job, jobs) is None and start_runner(store, job["id"]):
            started.append(job["id"])
            slots -= 1
            jobs = store.all()
    return started


def _can_progress(jobs: list[dict]) -> bool:
    """Whether the scheduler has work: a queued job that may start now or once an active job ends, or a
    claimed job still waiting for its runner. Jobs that wait only on paused or ended jobs need a user."""
    if any(j["state"] == "starting" for j in jobs):
        return True
    queued = queue_order(jobs)
    if not queued:
        return False
    if any(j["state"] in ACTIVE_STATES for j in _local(jobs)):
        return True
    return any(waiting_reason(j, jobs) is None for j in queued)


def _scheduler_lock_path(store_file: Path) -> Path:
    return Path(store_file).resolve().parent / "jobs" / "scheduler.lock"


def scheduler_pid(store: JobStore) -> int | None:
    """The live scheduler's pid for this store (None when none holds the lock)."""
    path = _scheduler_lock_path(store.path)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int(json.loads(path.read_text() or "{}").get("pid") or 0) or None
        except (ValueError, OSError):
            return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def ensure_scheduler(store: JobStore) -> int | None:
    """Start the store's scheduler when there is queue work and none runs; returns the pid of the one
    running or started (None: nothing to do). Two callers at once may both start one: the second finds
    the lock held and exits at once."""
    pid = scheduler_pid(store)
    if pid is not None or not _can_progress(store.all()):
        return pid
    path = _scheduler_lock_path(store.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill.jobs", "--scheduler", str(store.path.resolve())],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the command that started it; its runners outlive it
        )
    return proc.pid


def run_scheduler(db: str) -> int:
    """The scheduler: hold the store's scheduler lock, start jobs as slots free up, exit when nothing
    queued can start (or another scheduler holds the lock)."""
    store = JobStore(Path(db))
    path = _scheduler_lock_path(store.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another scheduler runs this queue
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
    print(f"{_clock(time.time())} scheduler {os.getpid()} started", flush=True)
    while True:
        for job_id in schedule_once(store):
            print(f"{_clock(time.time())} started job {job_id}", flush=True)
        if not _can_progress(store.all()):
            break
        time.sleep(SCHEDULER_POLL)
    print(f"{_clock(time.time())} scheduler {os.getpid()} exits: nothing queued can start", flush=True)
    os.ftruncate(fd, 0)
    return 0


def queue_lines(store: JobStore) -> list[str]:
    """``distill jobs queue``: the limit, the scheduler, the running jobs, then the queued ones in order."""
    jobs = store.all()
    pid = scheduler_pid(store)
    active = [j for j in _local(jobs) if j["state"] in ACTIVE_STATES]
    lines = [
        f"max running {store.max_running()}; {len(active)} running; "
        f"scheduler {'pid ' + str(pid) if pid else 'not running (nothing queued can start)'}"
    ]
    for j in active:
        lines.append(f"  {j['id']}  {j['state']:<9} {job_name(j)}")
    places = queue_places(jobs)
    for j in queue_order(jobs):
        reason = waiting_reason(j, jobs)
        lines.append(
            f"  {j['id']}  {queue_label(j, jobs, True, places):<9} {job_name(j)}  priority {j['priority']}"
            + (f"  ({reason})" if reason else "")
        )
    for j in jobs:
        if j["state"] == "paused":
            lines.append(f"  {j['id']}  paused    {job_name(j)}  (`distill jobs resume {j['id']}` releases it)")
    return lines


def wake(store: JobStore) -> None:
    """Restart the scheduler if queued jobs wait and none runs (after a kill -9, a reboot)."""
    try:
        ensure_scheduler(store)
    except OSError:  # a read-only store: the listing still works
        pass


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cancel(job_id: str, store: Path | None = None) -> dict:
    """Stop the job: a queued or paused one is taken off the queue; a running one's runner (its process
    group) gets SIGTERM and up to 10 s to stop, and the job is marked cancelled.

    Who asked and when is recorded first, so the runner's last log line can say so; a runner that died
    before it could write that line (killed before its handler was set) gets it from here."""
    return _stop(job_id, store, "cancelled")


def pause(job_id: str, store: Path | None = None) -> dict:
    """Hold the job: a queued one stays queued but does not start; a running one stops as ``cancel`` stops
    it (committed rows and cached completions kept) and waits in the queue. ``resume`` releases it."""
    return _stop(job_id, store, "paused")


def _stop(job_id: str, store: Path | None, state: str) -> dict:
    jobs = JobStore(store, create=False)
    job = jobs.get(job_id)
    if job.get("ray_job_id"):
        return _stop_ray(jobs, job, state)
    verb = "cancel" if state == "cancelled" else "pause"
    note = f"{state} by `distill jobs {verb}` at {_clock(time.time())}"
    waiting = ("queued", "paused") if state == "cancelled" else ("queued",)
    if jobs.update_if(job_id, waiting, state=state, error=note if state == "cancelled" else None, cancelled_by=note):
        if state == "cancelled":
            jobs.update(job_id, finished=time.time())
        wake(jobs)
        return jobs.get(job_id)
    if job["state"] not in ACTIVE_STATES:
        can = "queued, paused or running" if state == "cancelled" else "queued or running"
        raise DistillError(f"job {job_id} is {job['state']}, not {can}", f"only {can} jobs can be {state}")
    jobs.update(job_id, cancelled_by=note, stop_as=state)
    for _ in range(100):  # a runner still starting: wait for its pid
        job = jobs.get(job_id)
        if job["pid"] or job["state"] not in ACTIVE_STATES:
            break
        time.sleep(0.1)
    if job["pid"]:
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
    fields = {"state": state, "stop_as": None}
    fields.update({"finished": time.time(), "error": note} if state == "cancelled" else {"error": None})
    jobs.update(job_id, **fields)
    wake(jobs)  # a slot is free
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


def resume(job_id: str, store: Path | None = None) -> str:
    """Put a paused, failed, partial, cancelled or budget-stopped job back in the queue; it continues where
    it stopped (committed rows kept, cached completions free). Returns its new state."""
    jobs = JobStore(store, create=False)
    job = jobs.get(job_id)
    if job.get("ray_job_id"):
        job = sync_ray_job(jobs, job_id)
    if job["state"] in ("running", "starting", "done", "queued", RAY_PENDING):
        raise DistillError(
            f"job {job_id} is {job['state']}", "only paused, failed, partial, cancelled or budget-stopped jobs resume"
        )
    ensure_free(Path(job["run_dir"]))
    if job.get("ray_job_id"):  # submitted again under a new Ray submission id; committed rows are kept
        return _resubmit_ray(jobs, job)
    jobs.update(job_id, state="queued", error=None, cancelled_by=None, finished=None, attempts=0, pid=None)
    ensure_scheduler(jobs)
    return jobs.get(job_id)["state"]


def queue_places(jobs: list[dict]) -> dict[str, int]:
    """Each queued job's place (1, 2, ...) among those that start when a slot frees, in queue order."""
    ready = [j["id"] for j in queue_order(jobs) if waiting_reason(j, jobs) is None]
    return {job_id: k + 1 for k, job_id in enumerate(ready)}


def queue_label(job: dict, jobs: list[dict], short: bool = False, places: dict[str, int] | None = None) -> str:
    """The state as ``jobs list`` shows it: ``queued 2`` (its place among the jobs that start when a slot
    frees), ``queued, after <id> (running)`` (``short``: ``waiting``), or the plain state. ``places``:
    ``queue_places(jobs)``, when labelling many jobs of one listing."""
    if job["state"] != "queued":
        return job["state"]
    reason = waiting_reason(job, jobs)
    if reason:
        return "waiting" if short else f"queued, {reason}"
    return f"queued {(places if places is not None else queue_places(jobs))[job['id']]}"


def status_lines(job: dict, recipe=None, jobs: list[dict] | None = None) -> list[str]:
    """Human-readable status: rows done / failed / remaining, tokens, cost, rate; the queue position of a
    queued job (``jobs``: the store's jobs); the plan's estimate beside the actual figures."""
    p = job["progress"]
    total, rows = p.get("total"), p.get("rows", 0)
    lines = [f"job {job['id']}: {job['state']}", f"  recipe   {job['recipe']} {' '.join(job['overrides'])}".rstrip()]
    if job["state"] == "queued" and jobs is not None:
        active = sum(j["state"] in ACTIVE_STATES for j in jobs)
        lines.append(f"  queue    {queue_label(job, jobs)}; {active} running; priority {job['priority']}")
    if p.get("teacher"):  # several teachers: the counts below are this one's
        lines.append(f"  teacher  {p['teacher']} (rows below count this teacher's problems)")
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
    if p.get("batches"):  # a batch-API teacher: the provider's batches this job waits on or collected
        shown = ", ".join(f"{b['id']} {b['status']} ({b['requests']} requests)" for b in p["batches"][-4:])
        more = len(p["batches"]) - 4
        lines.append(f"  batches  {shown}" + (f" and {more} earlier" if more > 0 else ""))
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
    lines += estimate_lines(job)
    if job.get("ray_job_id"):
        lines.append(
            f"  cluster  ray job {job['ray_job_id']} at {job['address']} (log: `distill jobs logs {job['id']}`)"
        )
        lines.append(f"  output   {job['run_dir']}/generate (on the cluster's shared folder)")
    else:
        lines.append(f"  output   {job['run_dir']}/generate   log {job['log']}")
    return lines


def _number(value, fmt: str = "{:,.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def estimate_lines(job: dict) -> list[str]:
    """The plan made before the job's first call beside what the job did: calls, tokens, cost, time."""
    est = job.get("estimate")
    if not est:
        return []
    p = job["progress"]
    seconds = (job["finished"] or time.time()) - job["started"] if job.get("started") else None
    rows = [
        ("calls", est.get("calls"), p.get("calls"), "{:,.0f}"),
        ("tokens in", est.get("tokens_in"), p.get("tokens_in"), "{:,.0f}"),
        ("tokens out", est.get("tokens_out"), p.get("tokens_out"), "{:,.0f}"),
        ("cost", est.get("cost"), p.get("paid_cost"), "{:.4f}"),  # what was paid: cached rows are free in both
        ("time", est.get("seconds"), seconds, None),
    ]
    lines = ["  estimate vs actual" + (" (so far)" if job["state"] in ACTIVE_STATES else "")]
    for label, e, a, fmt in rows:
        if fmt is None:
            e_text = _duration(e) if e is not None else "—"
            a_text = _duration(a) if a is not None else "—"
        else:
            e_text, a_text = _number(e, fmt), _number(a, fmt)
        ratio = f"  ({a / e:.2f}×)" if e and a is not None and job["state"] not in ACTIVE_STATES else ""
        lines.append(f"    {label:<11}{e_text:>12} est.{a_text:>12} actual{ratio}")
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
    places = queue_places(jobs)  # once per listing: each label would otherwise order the whole queue again
    for job in jobs:
        p = job["progress"]
        done = f"{p.get('rows', 0)}/{p['total']}" if p.get("total") else "—"
        submitted = time.strftime("%m-%d %H:%M", time.localtime(job["created"])) if job["created"] else "—"
        state = queue_label(job, jobs, True, places)
        rows.append([job["id"], state, job_name(job), " ".join(job["overrides"]), submitted, done])
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
    if job.get("ray_job_id"):
        runner = f"ray job {job['ray_job_id']} at {job['address']}"
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


def _write_new(out, data: bytes, pos: int | None, lines: int) -> int:
    """Write what ``data`` (a log read whole) holds past ``pos`` — on the first look (``pos`` None) its last
    ``lines`` lines, after the log was replaced (shorter than ``pos``) all of it; returns the new position."""
    if pos is None or pos > len(data):
        pos = _tail_start(data, lines) if pos is None else 0
    if len(data) > pos:
        out.write(data[pos:])
        out.flush()
    return len(data)


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
        pos = _write_new(out, log.read_bytes() if log.exists() else b"", pos, lines)
        if last:
            return
        time.sleep(poll)


def run_job(job_id: str, db: str) -> int:
    """The runner: claim the job (``starting`` → ``running``; a runner that loses the claim exits 0 and
    touches nothing), generate for the job's recipe, recording progress; exit code 0 on success.

    It takes the run folder's lock (naming the job) before anything else touches the folder; when
    another process holds it the job fails with that one line (exit 2) and the folder is left as it is."""
    store = JobStore(Path(db))
    job = store.get(job_id)
    if not store.update_if(
        job_id,
        ("starting",),
        state="running",
        pid=os.getpid(),
        started=time.time(),
        finished=None,
        error=None,
        cancelled_by=None,
        start_rows=job["progress"].get("rows", 0),  # a resumed run's rate counts only its own rows
    ):
        print(f"runner {os.getpid()}: job {job_id} is {store.get(job_id)['state']}, not starting; exiting", flush=True)
        return 0
    print(f"{_clock(time.time())} runner {os.getpid()} started job {job_id}", flush=True)
    try:
        return _run_claimed(store, job_id)
    finally:
        wake(store)  # a slot is free: the next queued job starts even if the scheduler was killed


def _run_claimed(store: JobStore, job_id: str) -> int:
    from distill.config import load_recipe
    from distill.core.executor import init_ray
    from distill.pipeline import run_stage
    from distill.teachers.budget import BudgetExceeded

    job = store.get(job_id)
    signals: list[str] = []

    def on_term(signum, frame):
        signals.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        recipe = load_recipe(job["recipe"], job["overrides"])

        earlier = job["progress"].get("calls", 0)  # requests of this job's earlier runs (a resumed job)

        def progress(stats: dict) -> None:
            # one small WAL write per batch; calls count every run of the job
            store.update(job_id, progress={**stats, "calls": earlier + stats.get("calls", 0)})

        with run_lock(recipe.run_dir, job=job_id):
            if job["estimate"] is None:  # the plan before the first call, for "estimate vs actual"
                from distill.pipeline import record_estimate
                from distill.plan import estimate_totals

                estimate = estimate_totals(recipe)
                store.update(job_id, estimate=estimate)
                record_estimate(recipe, estimate)  # the run's report shows it too
            if recipe.teacher.executor == "ray":
                init_ray(address=job["address"])
            metrics = run_stage(recipe, "generate", on_progress=progress).metrics
        failed = metrics.get("failed_rows", 0)
        synthesized = (metrics.get("synthesis") or {}).get("requested", 0)  # not in the per-batch counts
        final = {
            **store.get(job_id)["progress"],
            "calls": earlier + metrics.get("teacher_calls", 0) + synthesized,
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
        job = store.get(job_id)
        note = job["cancelled_by"] or f"cancelled by {how} at {_clock(time.time())} (not `distill jobs cancel`)"
        print(note, flush=True)
        if job["stop_as"] == "paused":  # `distill jobs pause`: back in the queue, held until resumed
            store.update(job_id, state="paused", stop_as=None)
        else:
            store.update(job_id, state="cancelled", finished=time.time(), error=note)
        return 130
    except Exception as e:  # recorded for `distill jobs status`; the traceback is in the log
        import traceback

        traceback.print_exc()
        store.update(job_id, state="failed", finished=time.time(), error=f"{type(e).__name__}: {e}"[:500])
        return 1


# --- jobs on a Ray cluster (the dashboard's Jobs API) ---------------------------------------------------

# Ray's job states as distill's: a stopped job was cancelled; a failed one may say better in its last line.
RAY_STATES = {
    "PENDING": RAY_PENDING,
    "RUNNING": "running",
    "SUCCEEDED": "done",
    "FAILED": "failed",
    "STOPPED": "cancelled",
}


def is_jobs_address(address: str | None) -> bool:
    """Whether ``address`` is a Ray dashboard's Jobs API (``http://HEAD:8265``) rather than a GCS address."""
    return bool(address) and address.startswith(("http://", "https://"))


def _ray_client(address: str):
    """A ``JobSubmissionClient`` for ``address``; one ``DistillError`` when the dashboard does not answer."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, or a dashboard without the Jobs API
        raise DistillError(
            f"no Ray Jobs API at {address} ({str(e).splitlines()[0][:200]})",
            "start the head with the dashboard (`ray start --head --include-dashboard true`, port 8265) "
            "and pass its http://HOST:PORT",
        ) from None


def _entrypoint(job_id: str, recipe: str, overrides: list[str], cwd: str) -> str:
    """The shell command the cluster runs: distill's Ray-job runner in the submitting folder's path."""
    args = ["python", "-m", "distill.jobs", "--ray-job", job_id, recipe, *overrides]
    return f"cd {shlex.quote(cwd)} && {shlex.join(args)}"


def submit_to_ray(recipe_path: Path, overrides: list[str], address: str, store: Path | None = None) -> str:
    """Validate the recipe and send its generate stage to the Ray cluster at ``address`` (the Jobs API);
    returns the distill job id, which is also Ray's submission id. The job runs on the cluster (one
    entrypoint CPU, held back by Ray until it fits) in the submitting folder's path, so the cluster's
    nodes must see that folder (a shared filesystem) for ``jobs status`` to read the run folder."""
    from distill.config import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    ensure_free(recipe.run_dir)
    client = _ray_client(address)
    jobs = JobStore(store)
    recipe_file = str(Path(recipe_path).resolve())
    run_dir = str(recipe.run_dir.resolve())
    job_id = jobs.add(recipe_file, overrides, address, run_dir, name=recipe.name, state=RAY_PENDING)
    _send(jobs, client, jobs.get(job_id), job_id)
    return job_id


def _send(jobs: JobStore, client, job: dict, submission_id: str) -> None:
    """``submit_job`` for ``job`` under ``submission_id``, recorded in the store (a refusal: the job fails)."""
    try:
        client.submit_job(
            entrypoint=_entrypoint(job["id"], job["recipe"], job["overrides"], job["cwd"]),
            submission_id=submission_id,
            runtime_env={"env_vars": {"COLUMNS": "120", "PYTHONUNBUFFERED": "1"}},
            metadata={"distill_job": job["id"], "name": job.get("name") or ""},
            entrypoint_num_cpus=RAY_JOB_CPUS,
        )
    except Exception as e:
        error = f"the Ray cluster at {job['address']} refused the job: {str(e).splitlines()[0][:300]}"
        jobs.update(job["id"], state="failed", finished=time.time(), error=error)
        raise DistillError(error, "see `ray job list` on the head node") from None
    jobs.update(job["id"], ray_job_id=submission_id, state=RAY_PENDING, error=None, finished=None, started=None)


def _resubmit_ray(jobs: JobStore, job: dict) -> str:
    """``resume`` for a Ray job: the same job under a new submission id (``<id>-2``, ...)."""
    attempt = (job.get("attempts") or 1) + 1
    jobs.update(job["id"], attempts=attempt, cancelled_by=None)
    _send(jobs, _ray_client(job["address"]), job, f"{job['id']}-{attempt}")
    return jobs.get(job["id"])["state"]


def _last_progress(log: str) -> dict | None:
    """The last ``distill-progress`` line of a Ray job's log, as a dict (None when there is none)."""
    for line in reversed(log.splitlines()):
        if line.startswith(PROGRESS_MARK):
            try:
                return json.loads(line[len(PROGRESS_MARK) :])
            except ValueError:
                continue
    return None


def sync_ray_job(store: JobStore, job_id: str) -> dict:
    """The job with what its Ray cluster says now: Ray's status mapped to distill's states, the progress
    from the log's last ``distill-progress`` line, start and end times; written back to the store. A
    cluster that does not answer leaves the stored job as it was, with a note in ``error``."""
    job = store.get(job_id)
    if not job.get("ray_job_id") or job["state"] in FINAL_STATES:
        return job
    try:
        client = _ray_client(job["address"])
        info = client.get_job_info(job["ray_job_id"])
        log = client.get_job_logs(job["ray_job_id"])
    except Exception as e:
        job["error"] = f"the Ray cluster at {job['address']} did not answer ({str(e).splitlines()[0][:200]})"
        return job
    status = str(getattr(info.status, "value", info.status))
    fields: dict = {"state": RAY_STATES.get(status, job["state"])}
    last = _last_progress(log)
    if last is not None:
        outcome = last.pop("outcome", None)
        fields["progress"] = last
        if status in ("SUCCEEDED", "FAILED") and outcome:  # the runner's own word: partial, budget, ...
            fields["state"], fields["error"] = outcome["state"], outcome.get("error")
    if info.start_time:
        fields["started"] = info.start_time / 1000
    if info.end_time:
        fields["finished"] = info.end_time / 1000
    if fields["state"] == "failed" and not fields.get("error"):
        fields["error"] = (info.message or "the Ray job failed")[:500]
    if fields["state"] == "cancelled":
        fields["error"] = job.get("cancelled_by") or "stopped on the cluster (`ray job stop`)"
    store.update(job_id, **fields)
    return store.get(job_id)


def sync_ray_jobs(store: JobStore) -> None:
    """``sync_ray_job`` for every Ray job of the store that is not in a final state."""
    for job in store.all():
        if job.get("ray_job_id") and job["state"] not in FINAL_STATES:
            sync_ray_job(store, job["id"])


def ray_job_logs(store: JobStore, job_id: str) -> str:
    """The whole log Ray keeps for the job's latest submission."""
    job = store.get(job_id)
    return _ray_client(job["address"]).get_job_logs(job["ray_job_id"])


def follow_ray_log(store: JobStore, job_id: str, lines: int = 40, out=None, poll: float = 0.5) -> None:
    """``jobs logs -f`` for a Ray job: the last ``lines`` lines, then what the cluster appends, until the
    job is in a final state (what it printed on its way out is shown)."""
    out = out or sys.stdout.buffer
    pos = None
    while True:
        last = sync_ray_job(store, job_id)["state"] in FINAL_STATES
        pos = _write_new(out, ray_job_logs(store, job_id).encode(), pos, lines)
        if last:
            return
        time.sleep(poll)


def _stop_ray(jobs: JobStore, job: dict, state: str) -> dict:
    """``cancel`` for a Ray job: ``stop_job`` (Ray sends the entrypoint SIGTERM, committed rows are kept),
    waiting up to 15 s for the cluster to say it stopped. A Ray job cannot pause."""
    if state == "paused":
        raise DistillError(
            f"job {job['id']} runs on the Ray cluster at {job['address']}, which cannot pause a job",
            f"`distill jobs cancel {job['id']}` stops it (committed rows kept); `distill jobs resume` sends it again",
        )
    job = sync_ray_job(jobs, job["id"])
    if job["state"] in FINAL_STATES:
        raise DistillError(f"job {job['id']} is {job['state']}, not pending or running", "only those can be cancelled")
    note = f"cancelled by `distill jobs cancel` at {_clock(time.time())}"
    jobs.update(job["id"], cancelled_by=note)
    client = _ray_client(job["address"])
    client.stop_job(job["ray_job_id"])
    for _ in range(150):
        if str(getattr(client.get_job_status(job["ray_job_id"]), "value", "")) in ("STOPPED", "SUCCEEDED", "FAILED"):
            break
        time.sleep(0.1)
    return sync_ray_job(jobs, job["id"])


def run_ray_entrypoint(job_id: str, recipe_file: str, overrides: list[str]) -> int:
    """The job's process on the Ray cluster: the generate stage under the run folder's lock, one
    ``distill-progress`` line per batch and a last one with the outcome; exit code as the local runner's."""
    from distill.config import load_recipe
    from distill.core.executor import init_ray
    from distill.pipeline import run_stage
    from distill.teachers.budget import BudgetExceeded

    last: dict = {}

    def report(stats: dict, outcome: dict | None = None) -> None:
        last.update(stats)
        print(PROGRESS_MARK + json.dumps({**last, **({"outcome": outcome} if outcome else {})}), flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print(f"{_clock(time.time())} ray job {job_id} started on {os.uname().nodename} pid {os.getpid()}", flush=True)
    try:
        recipe = load_recipe(recipe_file, overrides)
        with run_lock(recipe.run_dir, job=job_id):
            if recipe.teacher.executor == "ray":
                init_ray(address=os.environ.get("RAY_ADDRESS") or "auto")  # the cluster this job runs on
            metrics = run_stage(recipe, "generate", on_progress=report).metrics
        failed = metrics.get("failed_rows", 0)
        synthesized = (metrics.get("synthesis") or {}).get("requested", 0)
        final = {
            "calls": metrics.get("teacher_calls", 0) + synthesized,
            "rows": metrics["problems"] - failed,
            "failed": failed,
            "total": metrics["problems"],
        }
        if failed:
            report(final, {"state": "partial", "error": "; ".join(metrics.get("failure_reasons", []))[:400]})
            return 4
        report(final, {"state": "done"})
        return 0
    except BudgetExceeded as e:
        report({}, {"state": "budget", "error": str(e)})
        return 3
    except DistillError as e:
        report({}, {"state": "failed", "error": str(e)[:500]})
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_clock(time.time())} ray job {job_id} stopped (SIGTERM: `distill jobs cancel`)", flush=True)
        return 130


if __name__ == "__main__":
    from distill.core.env import set_env_defaults

    set_env_defaults()
    if sys.argv[1] == "--scheduler":
        sys.exit(run_scheduler(sys.argv[2]))
    if sys.argv[1] == "--ray-job":
        sys.exit(run_ray_entrypoint(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(run_job(sys.argv[1], sys.argv[2]))
