"""Stage 1 — generate: the teacher answers task problems in Ray workers; rationales become data.

Outputs ``generate/shards/part-*.parquet`` (every row, raw output kept, parse failures with a
reason), ``generate/dataset/{train,eval}.parquet`` (train: rows kept by the filter; eval: held-out
problems with the teacher's answers) and ``generate/metrics.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import ShardWriter, write_config, write_json, write_parquet
from distill.errors import DistillError
from distill.progress import console, progress_bar
from distill.sources import resolve_model
from distill.tasks import load_problems


@dataclass
class GenerateResult:
    dir: Path
    train_rows: int
    eval_rows: int
    teacher_accuracy: float
    metrics: dict


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray quietly, once per process."""
    import logging

    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in Ray's session folder; failures still reach the driver as exceptions.
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def _run_ray(problems, worker_kwargs, cfg, on_batch):
    import ray

    init_ray()
    blocks = max(1, math.ceil(len(problems) / cfg.batch_size))
    ds = ray.data.from_items(problems, override_num_blocks=blocks)
    from teachers.workers import TeacherWorker

    ds = ds.map_batches(
        TeacherWorker,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=1,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        on_batch(batch)


def _serve_from_cache(problems, worker_kwargs, cfg, on_batch) -> list[dict]:
    """Answer every batch the completion cache fully covers, in-process (tokenizer only, no weights,
    no Ray); returns the problems that still need the teacher."""
    from teachers.cache import CacheMiss
    from teachers.workers import TeacherWorker

    if cfg.model.startswith("replay:") or not Path(worker_kwargs["cache_path"]).exists():
        return problems
    worker = TeacherWorker(**worker_kwargs, cache_only=True)
    rest: list[dict] = []
    for start in range(0, len(problems), cfg.batch_size):
        batch = problems[start : start + cfg.batch_size]
        try:
            on_batch(worker(batch))
        except CacheMiss:
            rest += batch
    return rest


def _run_local(problems, worker_kwargs, cfg, on_batch):
    from teachers.workers import TeacherWorker

    worker = TeacherWorker(**worker_kwargs)
    for start in range(0, len(problems), cfg.batch_size):
        on_batch(worker(problems[start : start + cfg.batch_size]))


class BudgetExceeded(DistillError):
    """The job spent its token or cost budget; committed shards stay and ``resume`` continues."""


def cost_of(tokens_in: int, tokens_out: int, cfg) -> float:
    """Estimated spend from the recipe's per-1k-token prices."""
    return tokens_in / 1000 * cfg.price_per_1k_input + tokens_out / 1000 * cfg.price_per_1k_output


def generate(recipe, out: Path, work: Path | None = None, on_progress=None) -> GenerateResult:
    """Run the teacher over train + eval problems into ``out``; returns counts and teacher accuracy.

    Shards are committed to ``work`` (default ``out``) as they complete; a run over the same ``work``
    folder skips every problem already in a committed, checksum-valid shard — exactly once across
    kills. ``on_progress(stats)`` is called after every batch.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc

    from teachers.workers import ROW_SCHEMA

    work = work or out
    train, evals = load_problems(recipe.task)
    problems = evals + train  # eval first: the teacher's score is known early
    replay = recipe.teacher.model.startswith("replay:")
    if replay:  # recorded outputs: check the file now, in the driver, for a one-line error
        from teachers.replay import load_records

        load_records(recipe.teacher.model.removeprefix("replay:"))
    teacher_path = "" if replay else str(resolve_model(recipe.teacher.model))
    worker_kwargs = dict(
        model_path=teacher_path,
        teacher_cfg=recipe.teacher.model_dump(),
        answer_type=recipe.task.answer_type,
        cache_path=str(Path(recipe.cache).resolve()),
    )
    writer = ShardWriter(work / "shards", work / "shards.json", ROW_SCHEMA, rows_per_shard=recipe.teacher.shard_rows)
    stats = {
        "rows": 0,
        "correct": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "cached": 0,
        "parse_errors": 0,
        "total": len(problems),
    }
    t0 = time.time()

    def count(batch: pa.Table) -> None:
        stats["rows"] += batch.num_rows
        stats["correct"] += pc.sum(batch["correct"]).as_py() or 0
        stats["tokens_in"] += pc.sum(batch["tokens_in"]).as_py() or 0
        stats["tokens_out"] += pc.sum(batch["tokens_out"]).as_py() or 0
        stats["cached"] += pc.sum(batch["cached"]).as_py() or 0
        stats["parse_errors"] += batch.num_rows - pc.count(batch["pred"]).as_py()

    done_ids: set[str] = set()
    for table in writer.resume():
        count(table)
        done_ids.update(table["id"].to_pylist())
    todo = [p for p in problems if p["id"] not in done_ids]
    if done_ids:
        console.print(f"generate: {len(done_ids)} rows already committed, {len(todo)} to go")
    console.print(
        f"[bold]generate[/] {len(train)} train + {len(evals)} eval problems, teacher {recipe.teacher.model}, "
        f"{recipe.teacher.workers} {recipe.teacher.executor} worker(s)"
    )
    cfg = recipe.teacher
    with progress_bar("generate", len(problems)) as advance:
        advance(len(done_ids))

        def on_batch(batch: pa.Table) -> None:
            writer.add(batch)
            count(batch)
            stats["seconds"] = time.time() - t0
            stats["cost"] = cost_of(stats["tokens_in"], stats["tokens_out"], cfg)
            rate = stats["tokens_out"] / max(stats["seconds"], 1e-9)
            advance(batch.num_rows, f"{stats['correct']}/{stats['rows']} correct, {rate:.0f} tok/s")
            if on_progress:
                on_progress(dict(stats))
            over_tokens = cfg.max_tokens and stats["tokens_in"] + stats["tokens_out"] >= cfg.max_tokens
            over_cost = cfg.max_cost and stats["cost"] >= cfg.max_cost
            if over_tokens or over_cost:
                writer.flush()
                raise BudgetExceeded(
                    f"budget reached after {stats['rows']}/{len(problems)} rows "
                    f"({stats['tokens_in'] + stats['tokens_out']} tokens, cost {stats['cost']:.4f})",
                    "raise teacher.max_tokens / teacher.max_cost and resume; committed rows are kept",
                )

        runner = _run_ray if recipe.teacher.executor == "ray" else _run_local
        todo = _serve_from_cache(todo, worker_kwargs, recipe.teacher, on_batch) if todo else todo
        if todo:
            runner(todo, worker_kwargs, recipe.teacher, on_batch)
    shards = writer.close()

    import pyarrow.parquet as pq

    if work != out:
        shutil.copytree(work / "shards", out / "shards", dirs_exist_ok=True)
        shutil.copy2(work / "shards.json", out / "shards.json")
    # Shards written before a column existed read as nulls there (promote), not a schema error.
    table = pa.concat_tables(
        [pq.read_table(out / "shards" / s["file"]) for s in shards], promote_options="default"
    ).sort_by("id")
    if table.num_rows != len(problems) or len(set(table["id"].to_pylist())) != len(problems):
        raise RuntimeError(f"shards hold {table.num_rows} rows for {len(problems)} problems")  # exactly-once guard
    if stats["parse_errors"] == table.num_rows:
        raise DistillError(
            "the teacher gave no parsable answer for any problem",
            "check the teacher model, its prompt (teacher.trigger) and teacher.max_new_tokens",
        )
    is_train = pc.equal(table["split"], "train")
    train_rows = table.filter(is_train)
    if recipe.teacher.keep == "correct":
        train_rows = train_rows.filter(train_rows["correct"])
    eval_rows = table.filter(pc.invert(is_train))
    if train_rows.num_rows == 0:
        raise DistillError(
            f"the teacher answered none of the {len(train)} train problems correctly",
            "use an easier task, a stronger teacher, or teacher.keep=all",
        )
    write_parquet(out / "dataset" / "train.parquet", train_rows)
    write_parquet(out / "dataset" / "eval.parquet", eval_rows)
    teacher_acc = pc.mean(eval_rows["correct"].cast(pa.float64())).as_py() or 0.0
    metrics = {
        "problems": len(problems),
        "train_problems": len(train),
        "eval_problems": len(evals),
        "train_rows_kept": train_rows.num_rows,
        "keep_rate": train_rows.num_rows / max(len(train), 1),
        "teacher_eval_accuracy": teacher_acc,
        "tokens_in": stats["tokens_in"],
        "tokens_out": stats["tokens_out"],
        "estimated_cost": cost_of(stats["tokens_in"], stats["tokens_out"], cfg),
        "cached_rows": stats["cached"],
        "parse_errors": stats["parse_errors"],
        "seconds": time.time() - t0,
        "teacher_model": recipe.teacher.model,
        "shards": shards,
    }
    write_json(out / "metrics.json", metrics)
    write_config(
        out, "generate", {"task": recipe.task.model_dump(), "teacher": recipe.teacher.model_dump()}, recipe.dump()
    )
    console.print(
        f"generate: kept {train_rows.num_rows}/{len(train)} train rationales, teacher eval accuracy "
        f"{teacher_acc:.1%}, {stats['cached']} rows from cache, {metrics['seconds']:.0f}s"
    )
    return GenerateResult(out, train_rows.num_rows, eval_rows.num_rows, teacher_acc, metrics)
