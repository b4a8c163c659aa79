"""Node-loss soak: a real two-node Ray cluster on loopback (tests/cluster.py: one ``ray start`` per node),
a generation job submitted with ``--address``, and the second node SIGKILLed (raylet, object store,
agents, workers) at a random moment of each round; the job must complete on the survivor.

    python bench/node_loss.py --rounds 5        # `make chaos`

Each round joins a fresh second node to the same head, submits the job in its own folder and kills
that node half the time at a random time after the submit (start-up, model load or generation alike),
half once a random number of rows is committed. Prints, per round and in total: rows lost, duplicate
rows, whether the dataset equals the undisturbed run's byte for byte (all columns but ``cached``), and
the wall time against the undisturbed run on both nodes; exits 1 on any loss, duplicate or difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def _submit(cwd: Path, address: str) -> str:
    cmd = [sys.executable, "-m", "distill", "jobs", "submit", "recipe.yaml", "--address", address]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _job(job_id: str, cwd: Path) -> dict:
    from distill.jobs import JobStore

    return JobStore(cwd / ".distill" / "jobs.sqlite").get(job_id)


def _wait_end(job_id: str, cwd: Path, timeout: float = 900) -> dict:
    from distill.jobs import FINAL_STATES

    t0 = time.time()
    while time.time() - t0 < timeout:
        if (s := _job(job_id, cwd))["state"] in FINAL_STATES:
            return s
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not finish in {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--problems", type=int, default=60, help="train problems (+ 6 eval)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)

    import yaml
    from chaos import canonical
    from cluster import LocalCluster
    from tiny import train_tiny_teacher

    from distill.config import TaskConfig
    from distill.core.problems import load_problems

    for k in ("DISTILL_JOBS_DB", "DISTILL_JOB_STORE", "RAY_ADDRESS"):
        os.environ.pop(k, None)
    work = Path(tempfile.mkdtemp(prefix="distill-node-loss-"))
    task = TaskConfig(
        name="chain_sum", params={"min_terms": 2, "max_terms": 2, "max_digits": 1}, train_size=12, eval_size=6
    )
    train, evals = load_problems(task)
    teacher = train_tiny_teacher(work / "teacher", train[:8] + evals[:4], epochs=80)
    recipe = {
        "output_dir": "runs",
        "name": "soak",
        "cache": ".distill/cache.sqlite",
        "task": {**task.model_dump(), "params": {**task.params, "max_digits": 2}, "train_size": args.problems},
        "teacher": {
            "model": f"hf:{teacher}",
            "max_new_tokens": 24,
            "batch_size": 2,
            "executor": "ray",
            "workers": 2,
            "dtype": "float32",
            "keep": "all",
            "shard_rows": 4,
        },
    }

    def folder(name: str) -> Path:
        (work / name).mkdir()
        (work / name / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return work / name

    t_all = time.time()
    rounds, ok = [], True
    with LocalCluster() as cluster:
        cluster.add_node("node_a")
        node_b = cluster.add_node("node_b")
        cwd = folder("undisturbed")
        t0 = time.time()
        job = _submit(cwd, cluster.address)
        assert _wait_end(job, cwd)["state"] == "done"
        ref_s = time.time() - t0
        ref, _ = canonical(cwd / "runs" / "soak")
        expected = len(json.loads(ref))
        print(f"undisturbed run on 2 nodes: {ref_s:.1f}s, {expected} rows", flush=True)

        for i in range(1, args.rounds + 1):
            if i > 1:
                node_b = cluster.add_node(f"node_b{i}")  # a fresh second node joins the same head
            cwd = folder(f"round{i}")
            t0 = time.time()
            job = _submit(cwd, cluster.address)
            if rng.random() < 0.5:
                mode, delay = "time", rng.uniform(0.5, ref_s * 0.8)
                while time.time() - t0 < delay and _job(job, cwd)["state"] in ("queued", "starting", "running"):
                    time.sleep(0.02)
            else:
                mode, target = "rows", rng.randint(1, expected - 4)
                while _job(job, cwd)["state"] in ("queued", "starting", "running"):
                    if _job(job, cwd)["progress"].get("rows", 0) >= target:
                        break
                    time.sleep(0.02)
            s = _job(job, cwd)
            had_actor = any("TeacherWorker" in t for t in node_b.titles())
            t_kill = time.time()
            node_b.kill()
            try:
                cluster.wait_for(lambda alive: len(alive) == 1, timeout=120)
                seen_dead_s = round(time.time() - t_kill, 1)
            except TimeoutError:
                seen_dead_s = None  # the cluster still lists the node: a kill that missed part of it
            final = _wait_end(job, cwd)
            wall = time.time() - t0
            got, ids = canonical(cwd / "runs" / "soak") if final["state"] == "done" else (b"", [])
            r = {
                "round": i,
                "kill": mode,
                "kill_after_s": round(t_kill - t0, 1),
                "rows_at_kill": s["progress"].get("rows", 0),
                "node_b_had_actor": had_actor,
                "node_dead_seen_after_s": seen_dead_s,
                "state": final["state"],
                "rows_lost": expected - len(set(ids)),
                "duplicate_rows": len(ids) - len(set(ids)),
                "dataset_identical": got == ref,
                "wall_s": round(wall, 1),
            }
            ok &= (
                seen_dead_s is not None
                and r["state"] == "done"
                and not r["rows_lost"]
                and not r["duplicate_rows"]
                and r["dataset_identical"]
            )
            rounds.append(r)
            print(json.dumps(r), flush=True)
    walls = [r["wall_s"] for r in rounds] or [0.0]
    summary = {
        "rounds": len(rounds),
        "jobs_done": sum(r["state"] == "done" for r in rounds),
        "kills_with_actor_on_lost_node": sum(r["node_b_had_actor"] for r in rounds),
        "rows_expected": expected,
        "rows_lost": sum(r["rows_lost"] for r in rounds),
        "duplicate_rows": sum(r["duplicate_rows"] for r in rounds),
        "datasets_identical": sum(r["dataset_identical"] for r in rounds),
        "reference_sha256": hashlib.sha256(ref).hexdigest()[:16],
        "undisturbed_s": round(ref_s, 1),
        "node_loss_wall_s": {"min": min(walls), "median": sorted(walls)[len(walls) // 2], "max": max(walls)},
        "total_s": round(time.time() - t_all),
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
