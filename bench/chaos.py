"""Chaos soak: kill -9 a generation job at random moments, resume it each time, and compare the
result with an uninterrupted run of the same recipe, row for row and byte for byte.

    python bench/chaos.py --kills 20            # `make chaos`
    python bench/chaos.py --kills 5 --executor ray
    python bench/chaos.py --queue 20 --kills 10  # `make chaos`: the queue, its scheduler killed instead

A kill lands at a uniformly random time after each (re)start — during start-up, model loading,
generation or a shard commit alike. Prints kills survived, rows lost, duplicate rows and whether
the canonical dataset bytes match; exits 1 on any loss or difference.

With ``--queue N``: N jobs (each its own run folder) through the queue at ``--max-running`` (2) at a
time while the queue's scheduler, not a runner, is SIGKILLed ``--kills`` times at random moments; half
the restarts come from a user's next ``distill jobs list``, half from the next runner to finish. Prints
kills, how many runners claimed each job (must be 1), the most jobs running at once (must be ≤ the
limit), and the wall time against the same queue undisturbed; exits 1 on any job run twice, lost or failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd, capture_output=True, text=True)


def _job(job_id: str, cwd: Path) -> dict:
    from distill.jobs import JobStore

    return JobStore(cwd / ".distill" / "jobs.sqlite").get(job_id)


def _wait_end(job_id: str, cwd: Path, timeout: float = 900) -> dict:
    from distill.jobs import FINAL_STATES

    t0 = time.time()
    while time.time() - t0 < timeout:
        s = _job(job_id, cwd)
        if s["state"] in FINAL_STATES:
            return s
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not finish")


def _wait_running(job_id: str, cwd: Path, timeout: float = 300) -> dict:
    """Until the queued (resumed) job's runner has claimed it, or the job ended."""
    from distill.jobs import FINAL_STATES

    t0 = time.time()
    while time.time() - t0 < timeout:
        s = _job(job_id, cwd)
        if s["state"] == "running" or s["state"] in FINAL_STATES:
            return s
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not start")


def canonical(run_dir: Path) -> tuple[bytes, list[str]]:
    """Dataset rows sorted by id as canonical JSON (all columns but `cached`), and every shard id."""
    import pyarrow.parquet as pq

    rows = []
    for split in ("train", "eval"):
        rows += pq.read_table(run_dir / "generate" / "dataset" / f"{split}.parquet").to_pylist()
    rows = sorted(({k: v for k, v in r.items() if k != "cached"} for r in rows), key=lambda r: r["id"])
    ids = pq.read_table(run_dir / "generate" / "shards")["id"].to_pylist()
    return json.dumps(rows, sort_keys=True).encode(), ids


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--problems", type=int, default=300, help="train problems (+ 6 eval)")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=6.0, help="longest wait before a kill, seconds")
    p.add_argument("--queue", type=int, default=0, help="soak the queue with this many jobs instead (see above)")
    p.add_argument("--max-running", type=int, default=2, help="--queue: jobs running at once")
    args = p.parse_args()
    if args.queue:
        args.problems = min(args.problems, 24)  # many short jobs: the scheduler's moments are what is tested
        args.max_delay = min(args.max_delay, 2.0)  # kills land between claims and spawns, not after the queue drained
    rng = random.Random(args.seed)

    from tiny import train_tiny_teacher

    from distill.config import TaskConfig
    from distill.core.problems import load_problems

    os.environ.pop("DISTILL_JOBS_DB", None)
    work = Path(tempfile.mkdtemp(prefix="distill-chaos-"))
    task = TaskConfig(
        name="chain_sum", params={"min_terms": 2, "max_terms": 2, "max_digits": 1}, train_size=12, eval_size=6
    )
    train, evals = load_problems(task)
    teacher = train_tiny_teacher(work / "teacher", train[:8] + evals[:4], epochs=80)
    import yaml

    recipe = {
        "output_dir": "runs",
        "cache": ".distill/cache.sqlite",
        # two-digit terms: enough distinct problems for a long soak (the tiny teacher's answers need
        # not be right; they need to be deterministic)
        "task": {**task.model_dump(), "params": {**task.params, "max_digits": 2}, "train_size": args.problems},
        "teacher": {
            "model": f"hf:{teacher}",
            "max_new_tokens": 24,
            "batch_size": 2,
            "executor": args.executor,
            "workers": 2,
            "dtype": "float32",
            "keep": "all",
            "shard_rows": 4,
        },
    }
    for name in ("straight", "killed"):
        (work / name).mkdir()
        (work / name / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "name": name}))

    t0 = time.time()
    ref = _cli("jobs", "submit", "recipe.yaml", cwd=work / "straight").stdout.strip()
    assert _wait_end(ref, work / "straight")["state"] == "done"
    straight_s = time.time() - t0
    print(f"uninterrupted run: {straight_s:.0f}s", flush=True)

    if args.queue:
        return queue_soak(args, rng, work, yaml.safe_load((work / "straight" / "recipe.yaml").read_text()))

    cwd = work / "killed"
    job = _cli("jobs", "submit", "recipe.yaml", cwd=cwd).stdout.strip()
    kills = 0
    while kills < args.kills:
        _wait_running(job, cwd)
        # Half the kills at a random time after the (re)start (start-up, model load, anything), half
        # once a random number of further rows is committed (mid-generation, around shard commits).
        t_start = time.time()
        before = _job(job, cwd)["progress"].get("rows", 0)
        if rng.random() < 0.5:
            mode, delay = "time", rng.uniform(0.2, args.max_delay)
            time.sleep(delay)
        else:
            mode, target = "rows", before + rng.randint(1, 24)
            while _job(job, cwd)["state"] == "running" and _job(job, cwd)["progress"].get("rows", 0) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))
        s = _job(job, cwd)
        if s["state"] != "running":
            break  # finished before the next kill
        os.killpg(s["pid"], signal.SIGKILL)
        kills += 1
        rows = s["progress"].get("rows", 0)
        print(
            f"kill {kills:2d} ({mode}): {time.time() - t_start:.1f}s after start, "
            f"{rows}/{s['progress'].get('total', '?')} rows committed",
            flush=True,
        )
        while _job(job, cwd)["state"] == "running":
            time.sleep(0.05)
        r = _cli("jobs", "resume", job, cwd=cwd)
        assert r.returncode == 0, r.stderr
    final = _wait_end(job, cwd)
    a, ids = canonical(cwd / "runs" / "killed")
    b, _ = canonical(work / "straight" / "runs" / "straight")
    expected = len(json.loads(b))  # rows of the uninterrupted run
    lost = expected - len(set(ids))
    dupes = len(ids) - len(set(ids))
    same = a == b
    print(
        json.dumps(
            {
                "kills": kills,
                "final_state": final["state"],
                "rows_expected": expected,
                "rows_lost": lost,
                "duplicate_rows": dupes,
                "dataset_identical": same,
                "dataset_sha256": hashlib.sha256(a).hexdigest()[:16],
                "reference_sha256": hashlib.sha256(b).hexdigest()[:16],
                "executor": args.executor,
                "wall_s": round(time.time() - t0),
            }
        )
    )
    return 0 if final["state"] == "done" and lost == 0 and dupes == 0 and same and kills == args.kills else 1


def _drain(cwd: Path, ids: list[str], rng, kills: int, max_delay: float) -> tuple[int, float]:
    """Wait until every job of ``ids`` ended, SIGKILLing the scheduler ``kills`` times at random moments;
    returns (kills done, seconds)."""
    from distill.jobs import FINAL_STATES, JobStore, scheduler_pid

    store = JobStore(cwd / ".distill" / "jobs.sqlite")
    done = 0
    t0 = time.time()
    while not all(store.get(j)["state"] in FINAL_STATES for j in ids):
        pid = scheduler_pid(store)
        if pid and done < kills:
            time.sleep(rng.uniform(0, max_delay))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            done += 1
            running = sum(store.get(j)["state"] in ("starting", "running") for j in ids)
            print(f"scheduler kill {done:2d}: {time.time() - t0:.1f}s in, {running} jobs running", flush=True)
            if rng.random() < 0.5:
                _cli("jobs", "list", cwd=cwd)  # a user's next command starts it again
        elif pid is None:
            time.sleep(1.0)
            if scheduler_pid(store) is None:
                _cli("jobs", "list", cwd=cwd)  # nothing but a user would wake it
        time.sleep(0.2)
    return done, time.time() - t0


def queue_soak(args, rng, work: Path, recipe: dict) -> int:
    """``--queue N``: the same N jobs through an undisturbed queue and through one whose scheduler is killed."""
    import yaml

    from distill.jobs import JobStore

    results = {}
    for name, kills in (("undisturbed", 0), ("killed", args.kills)):
        cwd = work / f"queue-{name}"
        cwd.mkdir()
        (cwd / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        assert _cli("jobs", "queue", "--max-running", str(args.max_running), cwd=cwd).returncode == 0
        ids = [
            _cli("jobs", "submit", "recipe.yaml", f"name=q{i:02d}", cwd=cwd).stdout.strip() for i in range(args.queue)
        ]
        done, seconds = _drain(cwd, ids, rng, kills, args.max_delay)
        jobs = [JobStore(cwd / ".distill" / "jobs.sqlite").get(j) for j in ids]
        starts = [
            sum(line.endswith(f"started job {j['id']}") for line in Path(j["log"]).read_text().splitlines())
            for j in jobs
        ]
        events = sorted([(j["started"] or 0, 1) for j in jobs] + [(j["finished"] or 0, -1) for j in jobs])
        most = now = 0
        for _, step in events:
            now += step
            most = max(most, now)
        results[name] = {
            "kills": done,
            "jobs_done": sum(j["state"] == "done" for j in jobs),
            "runners_per_job": sorted(set(starts)),
            "most_running_at_once": most,
            "wall_s": round(seconds, 1),
        }
        print(json.dumps({name: results[name]}), flush=True)
    k, u = results["killed"], results["undisturbed"]
    print(
        json.dumps(
            {
                "queue_jobs": args.queue,
                "max_running": args.max_running,
                "wall_ratio": round(k["wall_s"] / u["wall_s"], 2),
            }
        )
    )
    ok = all(
        r["jobs_done"] == args.queue and r["runners_per_job"] == [1] and r["most_running_at_once"] <= args.max_running
        for r in results.values()
    )
    if k["kills"] < args.kills:
        print(f"note: the queue drained after {k['kills']} of {args.kills} kills")
    return 0 if ok and k["kills"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
