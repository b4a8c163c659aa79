"""Stage 1 — generate: the teacher answers task problems in Ray workers; rationales become data.

Outputs ``generate/shards/part-*.parquet`` (every row, raw output kept, parse failures with a
reason), ``generate/dataset/{train,eval}.parquet`` (train: rows kept by the filter; eval: held-out
problems with the teacher's answers) and ``generate/metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.core.artifacts import ShardWriter, write_config, write_json, write_parquet
from distill.core.errors import DistillError
from distill.core.problems import load_problems
from distill.core.progress import console, progress_bar
from distill.core.sources import resolve_model
from distill.teachers.budget import GenerationMeter
from distill.teachers.rows import ROW_SCHEMA, latest_rows, select_training_rows
from distill.teachers.workers import run_teacher


@dataclass
class GenerateResult:
    dir: Path
    train_rows: int
    eval_rows: int
    teacher_accuracy: float
    metrics: dict


def _synthesize(recipe, worker_kwargs, evals: list[dict]) -> tuple[list[dict], dict]:
    """The teacher writes ``task.train_size`` new problems from the seed rows (in this process,
    through the completion cache: a re-run or resume gets the very same problems for free)."""
    from distill.core.problems import load_seeds
    from distill.teachers.synthesis import synthesize_problems
    from distill.teachers.workers import TeacherWorker

    if recipe.teacher.model.startswith("replay:"):
        raise DistillError(
            "a replay teacher cannot write new problems", "use a model teacher for task.source=synthetic"
        )
    seeds = [r["question"] for r in load_seeds(recipe.task)]
    console.print(f"[bold]synthesize[/] {recipe.task.train_size} new problems from {len(seeds)} seed examples")
    train, stats = synthesize_problems(
        TeacherWorker(**worker_kwargs).teacher,
        seeds,
        recipe.task.train_size,
        [r["question"] for r in evals],
        seed=recipe.task.seed,
        shots=recipe.task.seed_shots,
        temperature=recipe.teacher.temperature,
        threshold=recipe.task.dedup_threshold,
    )
    console.print(
        f"synthesize: {len(train)} new problems ({stats['exact_duplicates']} exact and "
        f"{stats['near_duplicates']} near duplicates, {stats['eval_overlap']} too close to the eval split, "
        f"{stats['unparsable']} unparsable dropped)"
    )
    return train, stats


def _worker_kwargs(recipe) -> dict:
    """What each ``TeacherWorker`` is built from; a replay file or model source is checked here, in the
    driver, so a bad one is one line before any worker starts."""
    cfg = recipe.teacher
    replay, remote = cfg.model.startswith("replay:"), cfg.model.startswith("openai:")
    if replay:
        from distill.teachers.replay import load_records

        load_records(cfg.model.removeprefix("replay:"))
    return dict(
        model_path="" if replay or remote else str(resolve_model(cfg.model, cfg.trust_remote_code, "teacher")),
        teacher_cfg=cfg,
        answer_type=recipe.task.answer_type,
        cache_path=str(Path(recipe.cache).resolve()),
    )


def generate(recipe, out: Path, work: Path | None = None, on_progress=None) -> GenerateResult:
    """Run the teacher over train + eval problems into ``out``; returns counts and teacher accuracy.

    Shards are committed to ``work`` (default ``out``) as they complete; a run over the same ``work``
    folder skips every problem already in a committed, checksum-valid shard — exactly once across
    kills. ``on_progress(stats)`` is called after every batch.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc

    work = work or out
    cfg = recipe.teacher
    train, evals = load_problems(recipe.task)
    worker_kwargs = _worker_kwargs(recipe)
    synthesis = None
    if recipe.task.source == "synthetic":
        train, synthesis = _synthesize(recipe, worker_kwargs, evals)
    problems = evals + train  # eval first: the teacher's score is known early
    writer = ShardWriter(work / "shards", work / "shards.json", ROW_SCHEMA, rows_per_shard=cfg.shard_rows)
    meter = GenerationMeter(len(problems), cfg)
    done_ids: set[str] = set()
    for table in writer.resume():
        table = table.filter(pc.is_null(table["error"]))  # rows whose teacher call failed are retried
        meter.count(table)
        done_ids.update(table["id"].to_pylist())
    todo = [p for p in problems if p["id"] not in done_ids]
    if done_ids:
        console.print(f"generate: {len(done_ids)} rows already committed, {len(todo)} to go")
    console.print(
        f"[bold]generate[/] {len(train)} train + {len(evals)} eval problems, teacher {cfg.model}, "
        f"{cfg.workers} {cfg.executor} worker(s)"
    )
    with progress_bar("generate", len(problems)) as advance:
        advance(len(done_ids))

        def on_batch(batch: pa.Table) -> None:
            writer.add(batch)
            meter.count(batch)
            advance(batch.num_rows, meter.status())
            if on_progress:
                on_progress(meter.snapshot())
            try:
                meter.check()
            except DistillError:
                writer.flush()  # what was paid for is committed before the job stops
                raise

        if todo:
            run_teacher(todo, worker_kwargs, cfg, on_batch)
    shards = writer.close()

    import pyarrow.parquet as pq

    if work != out:
        shutil.copytree(work / "shards", out / "shards", dirs_exist_ok=True)
        shutil.copy2(work / "shards.json", out / "shards.json")
    table = latest_rows([pq.read_table(out / "shards" / s["file"]) for s in shards])
    if table.num_rows != len(problems) or set(table["id"].to_pylist()) != {p["id"] for p in problems}:
        raise RuntimeError(f"shards hold {table.num_rows} rows for {len(problems)} problems")  # exactly-once guard
    failed = table.filter(pc.is_valid(table["error"]))
    if failed.num_rows == table.num_rows:
        raise DistillError(
            f"every teacher call failed; first reason: {failed['error'][0].as_py()}",
            "check the teacher endpoint/model and resume; paid results are kept in the cache",
        )
    if failed.num_rows:
        console.print(
            f"[yellow]generate: {failed.num_rows} rows failed after retries (first: {failed['error'][0].as_py()}); "
            "they are recorded with the reason and `distill run`/`distill jobs resume` retries only them[/]"
        )
    answered = table.filter(pc.is_null(table["error"]))
    if pc.count(answered["pred"]).as_py() == 0:
        raise DistillError(
            "the teacher gave no parsable answer for any problem",
            "check the teacher model, its prompt (teacher.trigger) and teacher.max_new_tokens",
        )
    is_train = pc.equal(table["split"], "train")
    train_rows, filtered = select_training_rows(table.filter(is_train), recipe.teacher)
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
        "filtered": filtered,
        "synthesis": synthesis,
        "keep_rate": train_rows.num_rows / max(len(train), 1),
        "teacher_eval_accuracy": teacher_acc,
        "tokens_in": meter.stats["tokens_in"],
        "tokens_out": meter.stats["tokens_out"],
        "estimated_cost": meter.snapshot()["cost"],
        "cached_rows": meter.stats["cached"],
        "parse_errors": answered.num_rows - pc.count(answered["pred"]).as_py(),
        "failed_rows": failed.num_rows,
        "failure_reasons": sorted(set(failed["error"].to_pylist()))[:10],
        "seconds": meter.snapshot()["seconds"],
        "teacher_model": recipe.teacher.model,
        "shards": shards,
    }
    write_json(out / "metrics.json", metrics)
    write_config(
        out, "generate", {"task": recipe.task.model_dump(), "teacher": recipe.teacher.model_dump()}, recipe.dump()
    )
    console.print(
        f"generate: kept {train_rows.num_rows}/{len(train)} train rationales, teacher eval accuracy "
        f"{teacher_acc:.1%}, {meter.stats['cached']} rows from cache, {metrics['seconds']:.0f}s"
    )
    return GenerateResult(out, train_rows.num_rows, eval_rows.num_rows, teacher_acc, metrics)
