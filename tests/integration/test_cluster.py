"""A real two-node Ray cluster on loopback (two ``ray start``: two raylets, two object stores): a job
submitted with ``--address`` runs its actors on both nodes; the second node is killed mid-job (raylet,
object store, agents and workers, SIGKILL) and the job completes on the survivor, every row exactly
once, the dataset equal to an undisturbed run of the same recipe."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster import LocalCluster

from distill.jobs import FINAL_STATES, JobStore

pytestmark = [pytest.mark.integration, pytest.mark.cluster]  # `make test-cluster`


@pytest.fixture(scope="module")
def two_nodes():
    """A head node (1 CPU, resource ``node_a``) and a second node (1 CPU, ``node_b``); always torn down."""
    cluster = LocalCluster()
    try:
        cluster.add_node("node_a")
        cluster.add_node("node_b")
        yield cluster
    finally:
        cluster.stop()


def _rows(dataset: Path) -> list:
    out = []
    for split in ("train", "eval"):
        out += pq.read_table(dataset / f"{split}.parquet").to_pylist()
    return sorted(json.dumps({k: r[k] for k in ("id", "rationale", "pred", "correct")}) for r in out)


def _recipe(folder: Path, teacher: Path, task_cfg) -> Path:
    folder.mkdir()
    recipe = {
        "name": "cluster",
        "output_dir": "runs",
        "cache": ".distill/cache.sqlite",
        "task": {**task_cfg.model_dump(), "train_size": 54, "eval_size": 6},
        "teacher": {
            "model": f"hf:{teacher}",
            "max_new_tokens": 24,
            "batch_size": 2,
            "executor": "ray",
            "workers": 2,
            "dtype": "float32",
            "keep": "all",
            "shard_rows": 2,
        },
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def _actor_nodes(cluster: LocalCluster) -> set[str]:
    """The nodes hosting a TeacherWorker actor process right now."""
    return {n.name for n in cluster.nodes if any("TeacherWorker" in t for t in n.titles())}


def test_a_job_loses_a_node_and_completes_exactly_once(tmp_path, tiny_teacher, tiny_task_cfg, two_nodes):
    from distill.config import load_recipe
    from distill.stages.generate import generate

    # The undisturbed run of the same recipe (in this process, one worker: the rows do not depend on it).
    ref_recipe = _recipe(tmp_path / "ref", tiny_teacher, tiny_task_cfg)
    ref = load_recipe(str(ref_recipe), ["teacher.executor=local", f"cache={tmp_path}/ref/c.sqlite"])
    (tmp_path / "ref" / "out").mkdir()
    generate(ref, tmp_path / "ref" / "out")

    cwd = tmp_path / "job"
    _recipe(cwd, tiny_teacher, tiny_task_cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("DISTILL_JOBS_DB", "DISTILL_JOB_STORE", "RAY_ADDRESS")}
    submit = [sys.executable, "-m", "distill", "jobs", "submit", "recipe.yaml", "--address", two_nodes.address]
    job = subprocess.run(submit, cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    store = JobStore(cwd / ".distill" / "jobs.sqlite")

    # Kill node B once both nodes answer batches and some rows are committed, with most still to come.
    node_a, node_b = two_nodes.nodes
    seen: set[str] = set()
    t0 = time.monotonic()
    while True:
        s = store.get(job)
        assert s["state"] not in FINAL_STATES, f"job ended before node B was killed: {s}"
        assert time.monotonic() - t0 < 120, f"actors never on both nodes: {seen}, {s}"
        seen |= _actor_nodes(two_nodes)
        if seen == {"node_a", "node_b"} and s["progress"].get("rows", 0) >= 4:
            break
        time.sleep(0.05)
    rows_at_kill = s["progress"]["rows"]
    killed = node_b.kill()
    assert killed and rows_at_kill < 40
    two_nodes.wait_for(lambda alive: len(alive) == 1, timeout=90)  # the cluster saw node B go

    while (s := store.get(job))["state"] not in FINAL_STATES:
        assert time.monotonic() - t0 < 240, f"job stuck after node B was lost: {s}"
        time.sleep(0.2)
    assert s["state"] == "done", (s, Path(s["log"]).read_text()[-3000:])
    assert s["progress"]["rows"] == 60 and s["progress"]["total"] == 60

    gen = cwd / "runs" / "cluster" / "generate"
    ids = [i for f in sorted((gen / "shards").glob("part-*.parquet")) for i in pq.read_table(f)["id"].to_pylist()]
    assert len(ids) == 60 and len(set(ids)) == 60  # every row exactly once
    assert _rows(gen / "dataset") == _rows(tmp_path / "ref" / "out" / "dataset")
    assert "TeacherWorker" not in " ".join(node_b.titles())  # nothing of node B came back
