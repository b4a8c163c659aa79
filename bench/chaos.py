"""Chaos soak: kill -9 a generation job at random moments, resume it each time, and compare the
result with an uninterrupted run of the same recipe, row for row and byte for byte.

    python bench/chaos.py --kills 20            # `make chaos`
    python bench/chaos.py --kills 5 --executor ray

A kill lands at a uniformly random time after each (re)start — during start-up, model loading,
generation or a shard commit alike. Prints kills survived, rows lost, duplicate rows and whether
the canonical dataset bytes match; exits 1 on any loss or difference.
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
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = _job(job_id, cwd)
        if s["state"] not in ("queued", "running"):
            return s
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not finish")


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
    args = p.parse_args()
    rng = random.Random(args.seed)

    from tiny import train_tiny_teacher

    from distill.cli import _env_defaults
    from distill.config import TaskConfig
    from distill.core.problems import load_problems

    _env_defaults()
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

    cwd = work / "killed"
    job = _cli("jobs", "submit", "recipe.yaml", cwd=cwd).stdout.strip()
    kills = 0
    while kills < args.kills:
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


if __name__ == "__main__":
    sys.exit(main())
