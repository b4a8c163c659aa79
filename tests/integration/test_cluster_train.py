"""Ray Train on a real two-node loopback cluster (tests/cluster.py): `student.workers: 2` puts one worker on
each node (SPREAD), node B is killed (raylet, object store, agents and workers, SIGKILL) after a
checkpoint is committed, and the worker group re-forms on the survivor from that checkpoint: the
trained model equals the one-process model within test_ray_train's tolerance."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from cluster import LocalCluster
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import StudentConfig
from distill.students.data import tokenize_example
from distill.students.trainer import train

pytestmark = [pytest.mark.integration, pytest.mark.cluster]  # `make test-cluster`

# 10 examples, batch 4: 3 steps an epoch, 9 in all, a committed checkpoint every 2 steps.
STUDENT = {
    "epochs": 3,
    "lr": 3e-3,
    "batch_size": 4,
    "micro_batch_size": 1,
    "seed": 3,
    "precision": "fp32",
    "save_every": 2,
    "max_length": 64,
}

# The driver, in its own process, joined to the cluster: trains on two workers, writes the weights.
DRIVER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from distill.config import StudentConfig
from distill.core.executor import init_ray
from distill.students.data import tokenize_example
from distill.students.distributed import WorkerSettings, train_on_workers

student, address, storage, out, student_cfg = sys.argv[1:6]
init_ray(address=address)
tok = AutoTokenizer.from_pretrained(student)
model = AutoModelForCausalLM.from_pretrained(student)
examples = [
    tokenize_example(tok, f"Q: {i} + {i * 7} =", f" {i} plus {i * 7}" * (1 + i % 3) + f" is {8 * i}.", 64)
    for i in range(10)
]
cfg = StudentConfig(model="x", **json.loads(student_cfg))
done = train_on_workers(model, examples, cfg, tok.pad_token_id, WorkerSettings(2, storage, "run"))
torch.save({"weights": [p.detach() for p in model.parameters()], "losses": done.result.losses,
            "steps": done.result.steps, "resumed_from": done.resumed_from}, out)
"""


def _examples(tok):  # as DRIVER's: different lengths, so the shards pad differently from the whole batch
    return [
        tokenize_example(tok, f"Q: {i} + {i * 7} =", f" {i} plus {i * 7}" * (1 + i % 3) + f" is {8 * i}.", 64)
        for i in range(10)
    ]


@pytest.fixture(scope="module")
def two_nodes():
    """Head and node B, 1 CPU each (with B gone, the group fits only at one worker); always torn down."""
    cluster = LocalCluster()
    try:
        cluster.add_node("node_a", num_cpus=1)
        cluster.add_node("node_b", num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


def _train_workers(cluster: LocalCluster) -> dict[str, int]:
    """How many Ray Train worker processes each node hosts right now."""
    return {n.name: sum("RayTrainWorker" in t for t in n.titles()) for n in cluster.nodes}


def test_two_node_training_loses_node_b_and_finishes_on_the_survivor(tmp_path, tiny_student, two_nodes):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    ref = AutoModelForCausalLM.from_pretrained(tiny_student)
    ref_result = train(ref, _examples(tok), StudentConfig(model="x", **STUDENT), tok.pad_token_id)

    storage, out = tmp_path / "storage", tmp_path / "trained.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # the controller notices the lost worker sooner
    # The first restart still counts node B's CPU and waits this long for a 2-worker group before 1 fits.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "8"
    args = [tiny_student, two_nodes.address, storage, out, json.dumps(STUDENT)]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *map(str, args)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    node_b = two_nodes.nodes[1]
    try:
        # One worker per node (SPREAD), and node B killed once a checkpoint is committed (Ray Train's
        # snapshot of its checkpoints written), with steps still to go.
        seen: dict[str, int] = {}
        t0 = time.monotonic()
        while not (storage / "run" / "checkpoint_manager_snapshot.json").exists():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 90, f"no checkpoint; workers seen {seen}"
            for node, n in _train_workers(two_nodes).items():
                seen[node] = max(seen.get(node, 0), n)
            time.sleep(0.05)
        assert seen == {"node_a": 1, "node_b": 1}, seen
        assert node_b.kill()
        assert driver.wait(timeout=75) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert len(two_nodes.alive_nodes()) == 1
    got = torch.load(out)
    assert 0 < got["resumed_from"] < ref_result.steps  # the re-formed group went on from a checkpoint
    assert got["steps"] == ref_result.steps == 9
    wa = torch.cat([p.detach().flatten() for p in ref.parameters()])
    wb = torch.cat([p.flatten() for p in got["weights"]])
    assert (wa - wb).abs().max().item() <= 1e-4 * wa.abs().max().item()
    assert [e["step"] for e in got["losses"]] == [e["step"] for e in ref_result.losses]
    for x, y in zip(ref_result.losses, got["losses"], strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])
