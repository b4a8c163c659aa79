"""A Ray actor killed (SIGKILL) mid-generation: its batch goes back to the queue for a live actor, every row lands exactly once."""

import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.config import load_recipe
from distill.stages.generate import generate

pytestmark = pytest.mark.integration


def _teacher_actor_pids() -> list[int]:
    """Processes hosting a TeacherWorker actor (Ray titles them ``ray::TeacherWorker``)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"TeacherWorker" in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _rows(folder: Path) -> list:
    out = []
    for split in ("train", "eval"):
        out += pq.read_table(folder / "dataset" / f"{split}.parquet").to_pylist()
    return sorted((r["id"], r["rationale"], r["pred"], r["correct"]) for r in out)


def test_killed_actor_batch_is_retried_exactly_once(tmp_path, tiny_teacher, ray_cluster):
    common = [
        f"teacher.model=hf:{tiny_teacher}",
        "teacher.dtype=float32",
        "teacher.max_new_tokens=24",
        "teacher.batch_size=2",
        "teacher.keep=all",
        "task.train_size=40",
        "task.eval_size=6",
        "task.params={min_terms: 2, max_terms: 2, max_digits: 1}",
        f"output_dir={tmp_path}",
    ]
    ref = load_recipe(None, common + ["teacher.executor=local", f"cache={tmp_path}/ref.sqlite"])
    (tmp_path / "ref").mkdir()
    generate(ref, tmp_path / "ref")

    recipe = load_recipe(None, common + ["teacher.executor=ray", "teacher.workers=2", f"cache={tmp_path}/c.sqlite"])
    killed: list[int] = []

    def kill_one_actor(stats):
        if not killed and stats["rows"] < stats["total"] - 8:  # several batches still to come
            pids = _teacher_actor_pids()
            assert pids, "no TeacherWorker actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    (tmp_path / "ray").mkdir()
    result = generate(recipe, tmp_path / "ray", on_progress=kill_one_actor)
    assert killed and result.metrics["problems"] == 46
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "ref")
