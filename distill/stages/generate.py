"""Stage 1 — generate: the teacher answers task problems in Ray workers; rationales become data.

Outputs ``generate/shards/part-*.parquet`` (every row, raw output kept, parse failures with a
reason), ``generate/dataset/{train,eval}.parquet`` (train: rows kept by the filter; eval: held-out
problems with the teacher's answers) and ``generate/metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.core.answers import Task
from distill.core.artifacts import ShardWriter, write_config, write_json, write_parquet
from distill.core.errors import DistillError
from distill.core.problems import load_problems
from distill.core.progress import console, progress_bar
from distill.core.sources import resolve_model
from distill.teachers.budget import GenerationMeter, count_failures, failures_text
from distill.teachers.rows import ROW_SCHEMA, latest_rows, select_training_rows
from distill.teachers.workers import run_teacher


@dataclass
class GenerateResult:
    dir: Path
    train_rows: int
    eval_rows: int
    teacher_accuracy: float | None  # on the eval rows the teacher answered; None when it answered none
    metrics: dict
    failed_rows: int = 0  # rows whose teacher call failed (retries spent): the run is partial


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


def _worker_kwargs(recipe, problems: list[dict] | None = None) -> dict:
    """What each ``TeacherWorker`` is built from; a replay file or model source is checked here, in the
    driver, so a bad one is one line before any worker starts. With ``problems`` a replay file must
    also answer some of them (``_check_replay_coverage``)."""
    cfg = recipe.teacher
    replay, remote = cfg.model.startswith("replay:"), cfg.model.startswith("openai:")
    if replay:
        from distill.teachers.replay import load_records

        path = cfg.model.removeprefix("replay:")
        records = load_records(path)
        if problems:
            _check_replay_coverage(path, records, problems, recipe.task.name)
    return dict(
        model_path="" if replay or remote else str(resolve_model(cfg.model, cfg.trust_remote_code, "teacher")),
        teacher_cfg=cfg,
        task=Task.from_config(recipe.task),
        cache_path=str(Path(recipe.cache).resolve()),
    )


def _check_replay_coverage(path: str, records: list[dict], problems: list[dict], task_name: str) -> None:
    """How many of the task's questions (train + eval) a replay file answers, known before any work:
    none is one ``DistillError`` naming the likely cause (the file was recorded on other questions),
    not a misleading "no parsable answer" after the run; some is said on the console."""
    from distill.teachers.replay import covered

    hits = covered(records, problems)
    if hits == 0:
        raise DistillError(
            f"replay file {path} has no recorded answer for any of the task's {len(problems)} questions",
            f"record it on the same questions as task.name={task_name}: questions are matched after whitespace "
            "normalisation only, so a different task file or reworded questions (a prefix, other punctuation) "
            "match nothing",
        )
    if hits < len(problems):
        console.print(
            f"[yellow]replay: {hits} of {len(problems)} questions have a recorded answer; the others are skipped[/]",
            soft_wrap=True,
        )


def _check_golds(task: Task, problems: list[dict]) -> None:
    """Every gold answer reads as the task's answer type, checked before any teacher call: a bad one is
    one line naming its row, not a worker's error after the first paid batch."""
    for p in problems:
        if p.get("gold") is None:
            continue
        try:
            task.normalize_gold(p["gold"], p["question"])
        except DistillError as e:
            where = f"{p['source']} row {p['source_row'] + 1}" if p.get("source") else f"problem {p['id']}"
            raise DistillError(f"{where}: {e.problem}", e.fix) from None


def _warn_capped_sizes(task, train: list[dict], evals: list[dict]) -> None:
    """A console warning when the task has fewer problems than ``task.train_size`` / ``task.eval_size``
    ask for: the run goes on with what there is, but never shrinks silently."""
    if task.source != "synthetic" and len(train) < task.train_size:
        if task.source in ("file", "hf"):
            where = f"{task.name} has {len(train)} distinct questions outside the eval split"
        else:
            where = f"{task.source} {task.name} with these task.params gave {len(train)} distinct questions"
        _warn(f"task.train_size={task.train_size} but {where}: using {len(train)}")
    if len(evals) < task.eval_size:
        _warn(f"task.eval_size={task.eval_size} but {task.name} gave {len(evals)} problems: using {len(evals)}")


def _warn(message: str) -> None:
    console.print(f"[yellow]warning: {message}[/]", soft_wrap=True, highlight=False)


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
    _check_golds(Task.from_config(recipe.task).prepare(), train + evals)
    _warn_capped_sizes(recipe.task, train, evals)
    synthetic = recipe.task.source == "synthetic"  # its train problems are not written yet
    worker_kwargs = _worker_kwargs(recipe, None if synthetic else evals + train)  # before anything is written
    synthesis = None
    if synthetic:
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
    answered = table.filter(pc.is_null(table["error"]))
    if not failed.num_rows and pc.count(answered["pred"]).as_py() == 0:
        raise DistillError(
            "the teacher gave no parsable answer for any problem",
            "check the teacher model, its prompt (teacher.trigger) and teacher.max_new_tokens",
        )
    is_train = pc.equal(table["split"], "train")
    train_rows, filtered = select_training_rows(table.filter(is_train), recipe.teacher)
    eval_rows = table.filter(pc.invert(is_train))
    failed_train = pc.sum(pc.equal(failed["split"], "train")).as_py() or 0
    if train_rows.num_rows == 0 and not failed_train:  # with failed train rows a rerun may keep some
        raise DistillError(
            f"the teacher answered none of the {len(train)} train problems correctly",
            "use an easier task, a stronger teacher, or teacher.keep=all",
        )
    write_parquet(out / "dataset" / "train.parquet", train_rows)
    write_parquet(out / "dataset" / "eval.parquet", eval_rows)
    teacher = _teacher_eval_score(eval_rows)
    failures = count_failures(failed["error"].to_pylist())
    metrics = {
        "problems": len(problems),
        "train_problems": len(train),
        "eval_problems": len(evals),
        "train_rows_kept": train_rows.num_rows,
        "filtered": filtered,
        "synthesis": synthesis,
        "keep_rate": train_rows.num_rows / max(len(train), 1),
        "teacher_eval_accuracy": teacher["accuracy"],
        "teacher_eval_n": teacher["n"],
        "teacher_eval_ci95": teacher["ci95"],
        "tokens_in": meter.stats["tokens_in"],
        "tokens_out": meter.stats["tokens_out"],
        "estimated_cost": meter.snapshot()["cost"],
        "paid_tokens_in": meter.stats["paid_tokens_in"],
        "paid_tokens_out": meter.stats["paid_tokens_out"],
        "paid_cost": meter.snapshot()["paid_cost"],
        "cached_rows": meter.stats["cached"],
        "parse_errors": answered.num_rows - pc.count(answered["pred"]).as_py(),
        "partial": failed.num_rows > 0,
        "failed_rows": failed.num_rows,
        "failed_train_rows": failed_train,
        "failed_eval_rows": failed.num_rows - failed_train,
        "failures": failures[:10],
        "failure_reasons": [f["reason"] for f in failures[:10]],
        "seconds": meter.snapshot()["seconds"],
        "teacher_model": recipe.teacher.model,
        "shards": shards,
    }
    write_json(out / "metrics.json", metrics)
    write_config(
        out, "generate", {"task": recipe.task.model_dump(), "teacher": recipe.teacher.model_dump()}, recipe.dump()
    )
    console.print(_summary_line(metrics), highlight=False, soft_wrap=True)
    return GenerateResult(
        out, train_rows.num_rows, eval_rows.num_rows, teacher["accuracy"], metrics, failed_rows=failed.num_rows
    )


def _teacher_eval_score(eval_rows) -> dict:
    """The teacher's eval accuracy, its 95% interval and n over the eval rows it answered: a row whose
    call failed is no wrong answer, it is no answer (accuracy None when there is none)."""
    import pyarrow.compute as pc

    from distill.students.evaluate import wilson_interval

    scored = eval_rows.filter(pc.is_null(eval_rows["error"]))
    n = scored.num_rows
    correct = pc.sum(pc.fill_null(scored["correct"], False)).as_py() or 0
    return {"accuracy": correct / n if n else None, "n": n, "ci95": list(wilson_interval(correct, n))}


def _summary_line(m: dict) -> str:
    """The stage's one summary line (console markup); with failed rows it says so loudly, with the most
    common reasons and the fix."""
    from rich.markup import escape

    kept = f"generate: kept {m['train_rows_kept']}/{m['train_problems']} train rationales"
    tail = f"{m['cached_rows']} rows from cache, {m['seconds']:.0f}s"
    if not m["failed_rows"]:
        return escape(f"{kept}, teacher eval accuracy {m['teacher_eval_accuracy'] or 0.0:.1%}, {tail}")
    n, total = m["teacher_eval_n"], m["eval_problems"]
    accuracy = (
        f"teacher eval accuracy {m['teacher_eval_accuracy']:.1%} on {n} of {total} eval problems"
        if n
        else f"no teacher eval accuracy (it answered none of the {total} eval problems)"
    )
    failed = f"{m['failed_rows']} rows FAILED ({failures_text(m['failures'])})"
    fix = "the run is partial: rerun the same command to retry them"
    return f"[bold yellow]{escape(f'{kept}, {accuracy}, {tail}; {failed} — {fix}')}[/]"
