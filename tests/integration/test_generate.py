"""Generation commits shards exactly once: budget stops, kills and corrupted shards resume cleanly; a
Ray worker's error reaches the driver as itself."""

import json

import pyarrow.parquet as pq
import pytest

from distill.config import Recipe
from distill.core.errors import DistillError
from distill.pipeline import run_stage, work_dir
from distill.teachers.budget import BudgetExceeded

pytestmark = pytest.mark.integration


def _recipe(tmp_path, teacher, task_cfg, **teacher_kw):
    return Recipe.model_validate(
        {
            "name": "g",
            "output_dir": str(tmp_path / "runs"),
            "cache": str(tmp_path / "cache.sqlite"),
            "task": task_cfg.model_dump(),
            "teacher": {
                "model": f"hf:{teacher}",
                "max_new_tokens": 24,
                "batch_size": 3,
                "executor": "local",
                "dtype": "float32",
                "keep": "all",
                **teacher_kw,
            },
        }
    )


def _rows(run_dir):
    t = pq.read_table(run_dir / "generate" / "dataset" / "train.parquet").to_pylist()
    t += pq.read_table(run_dir / "generate" / "dataset" / "eval.parquet").to_pylist()
    return sorted((r["id"], r["rationale"], r["pred"]) for r in t)


def test_budget_stop_then_resume_is_exactly_once(tmp_path, tiny_teacher, tiny_task_cfg):
    ref_recipe = _recipe(tmp_path / "ref", tiny_teacher, tiny_task_cfg)
    run_stage(ref_recipe, "generate")
    reference = _rows(ref_recipe.run_dir)

    capped = _recipe(tmp_path / "job", tiny_teacher, tiny_task_cfg, max_tokens=400)
    with pytest.raises(BudgetExceeded, match="budget reached"):
        run_stage(capped, "generate")
    work = work_dir(capped, "generate")
    committed = json.loads((work / "shards.json").read_text())["shards"]
    assert 0 < sum(s["rows"] for s in committed) < 18  # partial progress kept, nothing published
    assert not (capped.run_dir / "generate").exists()
    # Corrupt one committed shard: it must be detected by checksum and regenerated, not trusted.
    victim = work / "shards" / committed[0]["file"]
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")

    uncapped = _recipe(tmp_path / "job", tiny_teacher, tiny_task_cfg)  # same semantic hash: resumes
    metrics = run_stage(uncapped, "generate").metrics
    assert _rows(uncapped.run_dir) == reference
    ids = pq.read_table(uncapped.run_dir / "generate" / "shards")["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 18
    assert metrics["problems"] == 18 and metrics["train_rows_kept"] == 12 and metrics["failed_rows"] == 0
    assert not work.exists()


def test_rows_served_from_the_cache_spend_no_budget(tmp_path, tiny_teacher, tiny_task_cfg):
    """A job whose rows are all in the completion cache pays nothing, so a tiny budget does not stop it."""
    paid = run_stage(_recipe(tmp_path / "first", tiny_teacher, tiny_task_cfg), "generate").metrics
    assert paid["paid_tokens_in"] == paid["tokens_in"] > 400 and paid["cached_rows"] == 0
    again = _recipe(tmp_path / "first", tiny_teacher, tiny_task_cfg, max_tokens=400).model_copy(
        update={"name": "again"}
    )
    metrics = run_stage(again, "generate").metrics
    assert metrics["cached_rows"] == 18 and metrics["paid_tokens_in"] == metrics["paid_tokens_out"] == 0
    assert metrics["tokens_in"] == paid["tokens_in"] and metrics["paid_cost"] == 0


def test_no_parsable_answer_stops_early_with_the_reason(tmp_path, tiny_teacher, tiny_task_cfg):
    """A teacher that never states a parsable answer (here: numbers where choice letters are asked)
    is stopped after the first rows, not run to the end of the job."""
    from distill.core.errors import DistillError

    rows = [{"question": f"{i % 9} + {i % 7} =", "answer": "ABCD"[i % 4]} for i in range(70)]
    (tmp_path / "choice.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = tiny_task_cfg.model_copy(
        update={"source": "file", "name": str(tmp_path / "choice.jsonl"), "train_size": 60, "answer_type": "choice"}
    )
    recipe = _recipe(tmp_path, tiny_teacher, task, batch_size=8, answer_extraction="always")
    with pytest.raises(DistillError, match="no parsable answer for any of the first 32"):
        run_stage(recipe, "generate")
    committed = json.loads((work_dir(recipe, "generate") / "shards.json").read_text())["shards"]
    assert sum(s["rows"] for s in committed) < 40  # stopped early; what was paid for is kept


def test_a_workers_distill_error_reaches_the_driver_as_itself(ray_cluster):
    """Through Ray's exception chain (RayTaskError.cause), not its traceback text: same class, same line."""
    from distill.core.executor import map_actor_pool
    from distill.teachers.backends.openai import AuthError

    # Defined here so Ray pickles them by value (a test module is not importable in the workers).
    class _RefusingWorker:
        """A Ray actor whose endpoint refuses the credentials, as the OpenAI backend does on HTTP 401."""

        def __init__(self, status: int):
            self.status = status

        def __call__(self, batch):
            from distill.teachers.backends.openai import AuthError

            raise AuthError(f"the endpoint refused the credentials (HTTP {self.status})", "set OPENAI_API_KEY")

    class _BrokenWorker:
        def __call__(self, batch):
            raise ZeroDivisionError("not a user error")

    items = [{"q": str(i)} for i in range(4)]
    run = dict(batch_size=2, workers=1, num_cpus=1, on_batch=lambda t: None)
    with pytest.raises(AuthError) as info:
        map_actor_pool(items, _RefusingWorker, {"status": 401}, **run)
    assert str(info.value) == "the endpoint refused the credentials (HTTP 401) — set OPENAI_API_KEY"
    assert type(info.value) is AuthError
    with pytest.raises(Exception) as other:  # not ours: raised as Ray raised it, never turned into one line
        map_actor_pool(items, _BrokenWorker, {}, **run)
    assert not isinstance(other.value, DistillError) and "ZeroDivisionError" in str(other.value)
