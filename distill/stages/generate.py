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
from distill.teachers.budget import GenerationMeter, cost_of, count_failures, failures_text
from distill.teachers.rows import combine_teachers, latest_rows, row_schema, solved_ids
from distill.teachers.workers import pop_calls, run_teacher


@dataclass
class GenerateResult:
    dir: Path
    train_rows: int
    eval_rows: int
    teacher_accuracy: float | None  # on the eval rows the teacher answered; None when it answered none
    metrics: dict
    failed_rows: int = 0  # rows whose teacher call failed (retries spent): the run is partial


def _synthesize(recipe, worker_kwargs, evals: list[dict], out: Path) -> tuple[list[dict], dict]:
    """The teacher writes ``task.train_size`` new problems, instructions or code problems
    (``task.synthesis``) from the seed rows (in this process, through the completion cache: a re-run or
    resume gets the very same ones for free); every candidate and its verdict go to
    ``out/synthesis.jsonl``. A code problem is kept when the teacher's solution passes its tests: the
    same requests the stage then answers from the cache."""
    import json

    from distill.core.problems import load_seeds
    from distill.teachers import synthesis
    from distill.teachers.workers import TeacherWorker

    if recipe.teacher.model.startswith("replay:"):
        raise DistillError(
            "a replay teacher cannot write new problems", "use a model teacher for task.source=synthetic"
        )
    t, kind, log = recipe.task, recipe.task.synthesis, []
    worker = TeacherWorker(**worker_kwargs)
    settings = dict(
        seed=t.seed,
        shots=t.seed_shots,
        temperature=recipe.teacher.temperature,
        threshold=t.dedup_threshold,
        lsh_rows=t.dedup_lsh_rows,
        log=log,
    )
    avoid = [r["question"] for r in evals]
    seeds = synthesis.instruction_split(t.name, t.eval_size)[0] if kind == "instructions" else load_seeds(t)
    console.print(f"[bold]synthesize[/] {t.train_size} new {kind} from {len(seeds)} seed examples")
    if kind == "problems":
        train, stats = synthesis.synthesize_problems(
            worker.teacher, [r["question"] for r in seeds], t.train_size, avoid, **settings
        )
    elif kind == "instructions":
        items, stats = synthesis.synthesize_instructions(worker.teacher, seeds, t.train_size, avoid, **settings)
        train = synthesis.as_train_problems(items, kind, stats)
    else:
        solve = lambda problems: worker(problems).to_pylist()  # noqa: E731 - the stage's own rows, cached
        items, stats = synthesis.synthesize_code(worker.teacher, seeds, t.train_size, avoid, solve, **settings)
        train = synthesis.as_train_problems(items, kind, stats)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthesis.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in log))
    failed = f", {stats['solution_failed']} whose solution failed" if "solution_failed" in stats else ""
    console.print(
        f"synthesize: {len(train)} new {kind} ({stats['exact_duplicates']} exact and "
        f"{stats['near_duplicates']} near duplicates, {stats['eval_overlap']} too close to the eval split, "
        f"{stats['unparsable']} unparsable{failed} dropped)"
    )
    return train, stats


def _load_problems(task) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems of the task; an instruction seed file's eval split is its last rows."""
    if task.source == "synthetic" and task.synthesis == "instructions":
        from distill.teachers.synthesis import instruction_split

        return [], instruction_split(task.name, task.eval_size)[1]
    return load_problems(task)


def _worker_kwargs(recipe, cfg, problems: list[dict] | None = None) -> dict:
    """What each ``TeacherWorker`` of teacher ``cfg`` is built from; a replay file or model source is
    checked here, in the driver, so a bad one is one line before any worker starts. With ``problems`` a
    replay file must also answer some of them (``_check_replay_coverage``)."""
    replay, remote = cfg.model.startswith("replay:"), cfg.model.startswith("openai:")
    if replay:
        from distill.teachers.replay import load_records

        path = cfg.model.removeprefix("replay:")
        records = load_records(path)
        if problems:
            _check_replay_coverage(path, records, problems, recipe.task.name)
    kwargs = dict(
        model_path="" if replay or remote else str(resolve_model(cfg.model, cfg.trust_remote_code, "teacher")),
        teacher_cfg=cfg,
        task=Task.from_config(recipe.task),
        cache_path=str(Path(recipe.cache).resolve()),
    )
    if cfg.judge is not None and not cfg.judge.model.startswith("openai:"):
        kwargs["judge_model_path"] = str(resolve_model(cfg.judge.model, cfg.trust_remote_code, "teacher.judge"))
    return kwargs


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
    """Run the teachers over train + eval problems into ``out``; returns counts and teacher accuracy.

    One teacher, or several in order (``recipe.teachers``; one is a list of one): each answers every
    problem, or (``when: unsolved``) those no earlier teacher solved, into shards of its own, and
    every question keeps the row ``recipe.teachers_pick`` chooses. Shards are committed to ``work``
    (default ``out``) as they complete; a run over the same ``work`` folder skips every problem
    already in a committed, checksum-valid shard of that teacher — exactly once across kills.
    ``on_progress(stats)`` is called after every batch.
    """
    import pyarrow.compute as pc

    work = work or out
    teachers = recipe.teacher_entries
    several = len(teachers) > 1
    train, evals = _load_problems(recipe.task)
    _check_golds(Task.from_config(recipe.task).prepare(), train + evals)
    _warn_capped_sizes(recipe.task, train, evals)
    synthetic = recipe.task.source == "synthetic"  # its train problems are not written yet
    # every teacher's model or replay file is checked before anything is written
    kwargs = [_worker_kwargs(recipe, t, None if synthetic else evals + train) for t in teachers]
    synthesis = None
    if synthetic:
        train, synthesis = _synthesize(recipe, kwargs[0], evals, out)
    problems = evals + train  # eval first: the teacher's score is known early
    asked: list[list[dict]] = []
    tables, meters, shards = [], [], []
    for k, t in enumerate(teachers):
        mine = problems if t.when == "always" else _unsolved(problems, tables, teachers[:k])
        folder = Path("teachers", _folder_name(k, t)) if several else Path()
        table, meter, shards = _ask(t, mine, work / folder, out / folder, kwargs[k], on_progress, several)
        asked.append(mine)
        tables.append(table)
        meters.append(meter)
    pairwise: dict = {}
    judged = _judged_pick(teachers[0], kwargs[0], pairwise) if recipe.teachers_pick == "judged" else None
    combined = combine_teachers(tables, teachers, recipe.teachers_pick, judged)
    table = combined["rows"]
    if several:  # the chosen rows are the run's shards (what eval --split train and data inspect read)
        writer = ShardWriter(
            out / "shards", out / "shards.json", table.schema, rows_per_shard=recipe.teacher.shard_rows
        )
        writer.add(table)
        shards = writer.close()
    failed = table.filter(pc.is_valid(table["error"]))
    answered = table.filter(pc.is_null(table["error"]))
    if not failed.num_rows and pc.count(answered["pred"]).as_py() == 0:
        raise DistillError(
            "the teacher gave no parsable answer for any problem",
            "check the teacher model, its prompt (teacher.trigger) and teacher.max_new_tokens",
        )
    train_rows, filtered = combined["train"], combined["filtered"]
    is_train = pc.equal(table["split"], "train")
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
    snaps = [m.snapshot() for m in meters]
    total = {
        k: sum(m.stats[k] for m in meters)
        for k in ("tokens_in", "tokens_out", "paid_tokens_in", "paid_tokens_out", "cached", "calls", "paid_calls")
    }
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
        "tokens_in": total["tokens_in"],
        "tokens_out": total["tokens_out"],
        "estimated_cost": sum(s["cost"] for s in snaps),
        "paid_tokens_in": total["paid_tokens_in"],
        "paid_tokens_out": total["paid_tokens_out"],
        "paid_cost": sum(s["paid_cost"] for s in snaps),
        "cached_rows": total["cached"],
        # requests this run sent for its rows (teacher and judge; synthesis's are in synthesis.requested),
        # and those the cache did not answer
        "teacher_calls": total["calls"],
        "paid_teacher_calls": total["paid_calls"],
        "parse_errors": answered.num_rows - pc.count(answered["pred"]).as_py(),
        "partial": failed.num_rows > 0,
        "failed_rows": failed.num_rows,
        "failed_train_rows": failed_train,
        "failed_eval_rows": failed.num_rows - failed_train,
        "failures": failures[:10],
        "failure_reasons": [f["reason"] for f in failures[:10]],
        "seconds": sum(s["seconds"] for s in snaps),
        "teacher_model": recipe.teacher.model,
        "shards": shards,
    }
    if any(t.judge is not None for t in teachers):
        metrics["judge"] = _judge_metrics(teachers, tables, snaps, pairwise)
    if several:
        metrics["teachers_pick"] = recipe.teachers_pick
        metrics["teachers"] = [
            _teacher_metrics(t, rows, mine, snap, combined, k, train_rows.num_rows)
            for k, (t, rows, mine, snap) in enumerate(zip(teachers, tables, asked, snaps))
        ]
    write_json(out / "metrics.json", metrics)
    stage_config = {"task": recipe.task.model_dump(), "teacher": recipe.teacher.model_dump()}
    if several:
        stage_config.update(teachers=[t.model_dump() for t in teachers], teachers_pick=recipe.teachers_pick)
    write_config(out, "generate", stage_config, recipe.dump())
    console.print(_summary_line(metrics), highlight=False, soft_wrap=True)
    for line in _teacher_lines(metrics.get("teachers", [])):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    return GenerateResult(
        out, train_rows.num_rows, eval_rows.num_rows, teacher["accuracy"], metrics, failed_rows=failed.num_rows
    )


def _ask(cfg, problems: list[dict], work: Path, out: Path, worker_kwargs: dict, on_progress, named: bool):
    """One teacher answers ``problems`` into its shards under ``work`` (copied to ``out``), skipping the
    problems a committed, checksum-valid shard already holds; returns (its rows, one per problem,
    by id; its ``GenerationMeter``; the shard manifest). ``named``: progress carries its name."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = row_schema(cfg.judge is not None)
    writer = ShardWriter(work / "shards", work / "shards.json", schema, rows_per_shard=cfg.shard_rows)
    meter = GenerationMeter(len(problems), cfg)
    done_ids: set[str] = set()
    for table in writer.resume():
        table = table.filter(pc.is_null(table["error"]))  # rows whose teacher call failed are retried
        meter.count(table)
        done_ids.update(table["id"].to_pylist())
    todo = [p for p in problems if p["id"] not in done_ids]
    if done_ids:
        console.print(f"generate: {len(done_ids)} rows already committed, {len(todo)} to go")
    label = cfg.name if named else None
    who = f"teacher {label} ({cfg.model}, when: {cfg.when})" if named else f"teacher {cfg.model}"
    console.print(
        f"[bold]generate[/] {_split_counts(problems)}, {who}, {cfg.workers} {cfg.executor} worker(s)",
        highlight=False,
    )
    with progress_bar(f"generate {label}" if named else "generate", len(problems)) as advance:
        advance(len(done_ids))

        def on_batch(batch: pa.Table) -> None:
            batch, calls, paid = pop_calls(batch)
            writer.add(batch)
            meter.count(batch)
            meter.count_calls(calls, paid)
            advance(batch.num_rows, meter.status())
            if on_progress:
                stats = {**meter.snapshot(), "teacher": label} if named else meter.snapshot()
                if cfg.model.startswith("openai:") and cfg.api == "batch":  # the job store shows its batches
                    from distill.teachers.backends.batch import batch_progress

                    model = cfg.model.removeprefix("openai:")
                    stats["batches"] = batch_progress(worker_kwargs["cache_path"], cfg.base_url, model, meter.t0)
                on_progress(stats)
            try:
                meter.check()
            except DistillError:
                writer.flush()  # what was paid for is committed before the job stops
                raise

        if todo:
            run_teacher(todo, worker_kwargs, cfg, on_batch)
    shards = writer.close()
    if work != out:
        shutil.copytree(work / "shards", out / "shards", dirs_exist_ok=True)
        shutil.copy2(work / "shards.json", out / "shards.json")
    table = latest_rows([pq.read_table(out / "shards" / s["file"]) for s in shards], schema)
    if table.num_rows != len(problems) or set(table["id"].to_pylist()) != {p["id"] for p in problems}:
        raise RuntimeError(f"shards hold {table.num_rows} rows for {len(problems)} problems")  # exactly-once guard
    return table, meter, shards


def _judged_pick(cfg, worker_kwargs: dict, stats: dict):
    """``teachers_pick=judged``: a batch picker asking ``cfg.judge`` (the first teacher's) to compare the
    teachers' kept rows of each question pairwise, in this process and through the completion cache
    (a rerun asks nothing again); ``stats`` receives the calls, tokens and the pairs' outcomes."""
    from distill.teachers.judge import pick_judged
    from distill.teachers.workers import judge_teacher

    def judged(questions):
        teacher = judge_teacher(cfg, worker_kwargs.get("judge_model_path", ""), worker_kwargs["cache_path"])
        open_answer = worker_kwargs["task"].answer_type == "open"
        picks, found = pick_judged(teacher, questions, cfg.judge, open_answer=open_answer)
        stats.update(found, cost=cost_of(found["tokens_in"], found["tokens_out"], cfg.judge))
        stats["paid_cost"] = cost_of(found["paid_tokens_in"], found["paid_tokens_out"], cfg.judge)
        return picks

    return judged


def _judge_metrics(teachers: list, tables: list, snaps: list[dict], pairwise: dict) -> dict:
    """The judges' figures, apart from the teachers': rows judged, unparsable verdicts, the pass rate of
    the judged train rows, tokens and cost (paid and in all), and the pairwise picks' when there were any."""
    import pyarrow.compute as pc

    judged = [(t, tab, s) for t, tab, s in zip(teachers, tables, snaps) if t.judge is not None]
    scored = passed = 0
    for t, tab, _ in judged:
        scores = [x for x in tab["judge_score"].to_pylist() if x is not None]
        scored += len(scores)
        passed += sum(1 for x in scores if x >= t.judge.pass_score)
    total = {
        k: sum(s[k] for _, _, s in judged)
        for k in ("judged", "judge_unparsed", "judge_tokens_in", "judge_tokens_out", "judge_cost", "paid_judge_cost")
    }
    out = {
        "models": [t.judge.model for t, _, _ in judged],
        "rows_judged": total["judged"],
        "unparsable": total["judge_unparsed"],
        "pass_rate": passed / scored if scored else None,
        "mean_score": (sum(pc.sum(tab["judge_score"]).as_py() or 0 for _, tab, _ in judged) / scored)
        if scored
        else None,
        "tokens_in": total["judge_tokens_in"],
        "tokens_out": total["judge_tokens_out"],
        "cost": total["judge_cost"],
        "paid_cost": total["paid_judge_cost"],
    }
    if pairwise:
        out["pairwise"] = pairwise
        out["tokens_in"] += pairwise["tokens_in"]
        out["tokens_out"] += pairwise["tokens_out"]
        out["cost"] += pairwise["cost"]
        out["paid_cost"] += pairwise["paid_cost"]
    return out


def _split_counts(problems: list[dict]) -> str:
    """``12 train + 6 eval problems`` of a problem list."""
    n_train = sum(1 for p in problems if p["split"] == "train")
    return f"{n_train} train + {len(problems) - n_train} eval problems"


def _unsolved(problems: list[dict], tables: list, cfgs: list) -> list[dict]:
    """The problems no earlier teacher solved (a row its filters keep), for a ``when: unsolved``
    teacher. A problem an earlier teacher's call failed on is not asked either: that teacher retries
    it first on the rerun, and may solve it."""
    import pyarrow.compute as pc

    decided: set[str] = set()
    for table, cfg in zip(tables, cfgs):
        decided |= solved_ids(table, cfg) | set(table.filter(pc.is_valid(table["error"]))["id"].to_pylist())
    return [p for p in problems if p["id"] not in decided]


def _folder_name(k: int, cfg) -> str:
    """Teacher ``k``'s shard folder under ``teachers/``: its place and its name, made path-safe."""
    import re

    return f"{k}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name or cfg.model).strip("-.")[:48]


def _teacher_metrics(cfg, rows, asked: list[dict], snap: dict, combined: dict, k: int, train_rows: int) -> dict:
    """One teacher's figures for the report: what it was asked, its accuracy, how much of the dataset
    it wrote, tokens and cost (at its own prices)."""
    import pyarrow.compute as pc

    is_train = pc.equal(rows["split"], "train")
    scored = rows.filter(pc.and_(is_train, pc.and_(pc.is_null(rows["error"]), pc.is_valid(rows["gold"]))))
    right = pc.sum(pc.fill_null(scored["correct"], False)).as_py() or 0
    ev = _teacher_eval_score(rows.filter(pc.invert(is_train)))
    return {
        "name": cfg.name,
        "model": cfg.model,
        "when": cfg.when,
        "asked": len(asked),
        "train_asked": sum(1 for p in asked if p["split"] == "train"),
        "train_accuracy": right / scored.num_rows if scored.num_rows else None,
        "eval_accuracy": ev["accuracy"],
        "eval_n": ev["n"],
        "eval_ci95": ev["ci95"],
        "solved": combined["solved"][k],
        "picked": combined["picked"][k],
        "train_rows_kept": combined["train_rows"][k],
        "kept_share": combined["train_rows"][k] / train_rows if train_rows else 0.0,
        "tokens_in": snap["tokens_in"],
        "tokens_out": snap["tokens_out"],
        "cost": snap["cost"],
        "paid_tokens_in": snap["paid_tokens_in"],
        "paid_tokens_out": snap["paid_tokens_out"],
        "paid_cost": snap["paid_cost"],
        "cached_rows": snap["cached"],
        "failed_rows": snap["failed"],
        "seconds": snap["seconds"],
    }


def _teacher_lines(teachers: list[dict]) -> list[str]:
    """One console line per teacher of several: asked, accuracy, share of the dataset, tokens, cost."""

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    return [
        f"  teacher {t['name']} ({t['when']}): asked {t['asked']}, train accuracy {pct(t['train_accuracy'])}, "
        f"eval accuracy {pct(t['eval_accuracy'])}, kept {t['train_rows_kept']} rows "
        f"({t['kept_share']:.0%} of the dataset), {t['tokens_in'] + t['tokens_out']} tokens, cost {t['cost']:.4f}"
        for t in teachers
    ]


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
    if m.get("judge"):
        j = m["judge"]
        rate = "—" if j["pass_rate"] is None else f"{j['pass_rate']:.0%}"
        tail += (
            f"; judge: {j['rows_judged']} rows, {rate} at or above the threshold, {j['unparsable']} unparsable, "
            f"{j['tokens_in'] + j['tokens_out']} tokens, cost {j['cost']:.4f}"
        )
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
