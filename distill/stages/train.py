"""Stage 2 — train: fine-tune the student on the teacher's kept rationales (completion-only loss)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from distill.core.answers import Task
from distill.core.artifacts import write_config, write_json
from distill.core.errors import DistillError
from distill.core.progress import console

TRAIN_COLUMNS = ("question", "rationale", "gold")


@dataclass
class TrainStageResult:
    dir: Path
    model_dir: Path
    metrics: dict


def _check_kd(recipe, tokenizer, rows: list[dict]) -> None:
    """Logit KD needs the teacher's top-k in the data (or a ``kd.teacher`` to score the rows) and,
    except ULD, the scoring teacher's tokenizer in the student."""
    from distill.students.kd import tokenizer_mismatch

    kd = recipe.student.kd
    if kd.teacher is not None:
        if kd.teacher.startswith("replay:"):
            raise DistillError(
                "student.kd.teacher must be a model that scores text; the replay teacher recorded text only",
                "set student.kd.teacher to a model source (e.g. embedded:qwen2.5-coder-0.5b-instruct)",
            )
        if kd.loss != "uld" and not kd.teacher.startswith("openai:"):
            mismatch = tokenizer_mismatch(kd.teacher, tokenizer)
            if mismatch:
                raise DistillError(
                    f"student.kd.loss={kd.loss} needs a shared tokenizer: {mismatch}",
                    "set student.kd.loss=uld, or a student from the scoring teacher's family",
                )
        return
    if recipe.teacher.model.startswith("replay:"):
        raise DistillError(
            "student.format=kd needs token log-probabilities; the replay teacher recorded text only",
            "set student.kd.teacher to a model that scores the rows, or use student.format=rationale",
        )
    if not any(r.get("teacher_topk_ids") for r in rows):
        raise DistillError(
            "the training data has no teacher top-k log-probabilities",
            "set teacher.topk_logprobs (e.g. 20) and run `distill generate` again",
        )
    if recipe.student.kd.loss == "uld":
        return  # ULD compares sorted probabilities, never token ids: any student tokenizer works
    mismatch = tokenizer_mismatch(recipe.teacher.model, tokenizer)
    if mismatch:
        raise DistillError(
            f"logit KD needs a shared tokenizer: {mismatch}",
            "pick a student from the teacher's model family, or student.format=rationale",
        )


def _size_and_speed(teacher_source: str, model, prompt_ids: list[int]) -> dict:
    """The shrunk student's parameters and one-thread decoding speed next to the teacher's."""
    from distill.students.models import load_student
    from distill.students.shrink import size_and_speed

    teacher, _ = load_student(teacher_source)
    return size_and_speed(model, teacher, prompt_ids)


def _dev_set(dev_rows: list[dict], tokenizer, cfg, task: Task, trigger: str):
    """The dev split's scorer: its rows tokenized like training examples, one problem per question."""
    from distill.students.data import build_examples, prompt_template
    from distill.students.validation import DevSet, dev_problems

    if not dev_rows:
        raise DistillError(
            "too few training rows to hold out a dev split", "generate more data or set student.validation=null"
        )
    return DevSet(
        examples=build_examples(tokenizer, dev_rows, cfg.format, task, cfg.max_length, trigger, cfg.kd.loss),
        problems=dev_problems(dev_rows),
        tokenizer=tokenizer,
        template=prompt_template(tokenizer, cfg.format),
        task=task,
        max_new_tokens=cfg.eval_max_new_tokens,
        batch_size=cfg.eval_batch_size,
        pad_id=tokenizer.pad_token_id,
        calculator=cfg.calculator,
    )


def _scorer(recipe, source: str, dtype: str | None, key: str):
    """A (cached) teacher that scores given text: ``source`` with the teacher section's other settings."""
    from distill.core.sources import resolve_model
    from distill.teachers.cache import CachedTeacher, CompletionCache
    from distill.teachers.workers import make_backend

    tcfg = recipe.teacher.model_copy(update={"model": source, "dtype": dtype or recipe.teacher.dtype})
    path = "" if source.startswith("openai:") else str(resolve_model(source, tcfg.trust_remote_code, key))
    return CachedTeacher(make_backend(tcfg, path), CompletionCache(recipe.cache))


def kd_score_requests(teacher, rows: list[dict], cfg, task: Task) -> list:
    """The scoring call of each row's rationale: after ``teacher``'s own prompt for its question and the
    trigger, the rationale as the student trains on it (``distill plan`` counts the same calls)."""
    from distill.students.data import rationale_text
    from distill.teachers.backends.base import ScoreRequest
    from distill.teachers.methods import scoring_prompt

    k = cfg.topk_logprobs or 20
    return [
        ScoreRequest(scoring_prompt(teacher, r["question"], cfg, task) + cfg.trigger, " " + rationale_text(r, task), k)
        for r in rows
    ]


def _kd_scores(recipe, rows: list[dict], task: Task) -> tuple[list[dict], dict]:
    """``rows`` with ``student.kd.teacher``'s top-k log-probabilities at every rationale token (the
    generate stage's columns, so ``build_examples`` reads them as a logit teacher's), and the count.

    Each rationale is scored after the scorer's own prompt for its question and the trigger, in chunks
    through the cache: a killed run keeps what it scored, a rerun reads it back for free. A row the
    scorer cannot read (over its context) keeps no top-k, and ``build_examples`` leaves it out of KD."""
    from distill.core.progress import progress_bar

    kd, cfg = recipe.student.kd, recipe.teacher
    teacher = _scorer(recipe, kd.teacher, kd.dtype, "student.kd.teacher")
    requests = kd_score_requests(teacher, rows, cfg, task)
    out, count = [], {"rows": len(rows), "scored": 0, "cached": 0, "failed": 0, "teacher_tokens": 0}
    chunk = max(1, cfg.batch_size)
    with progress_bar(f"train: kd scores by {kd.teacher}", len(rows)) as advance:
        for start in range(0, len(rows), chunk):
            scores = teacher.score(requests[start : start + chunk])
            for r, c in zip(rows[start : start + chunk], scores):
                if c.error or not c.topk_logprobs:
                    count["failed"] += 1
                    out.append(r)
                    continue
                count["scored"] += 1
                if c.cached:
                    count["cached"] += 1
                else:
                    count["teacher_tokens"] += c.tokens_in
                out.append(
                    {
                        **r,
                        "teacher_token_ids": list(c.token_ids or []),
                        "teacher_topk_ids": c.topk_ids,
                        "teacher_topk_logprobs": c.topk_logprobs,
                    }
                )
            advance(len(scores))
    console.print(
        f"train: {count['scored']} of {len(rows)} rationales scored by {kd.teacher} "
        f"({count['cached']} from cache, {count['teacher_tokens']:,} tokens read"
        + (f"; {count['failed']} could not be scored and are left out" if count["failed"] else "")
        + ")"
    )
    if not count["scored"]:
        raise DistillError(
            f"student.kd.teacher {kd.teacher} scored none of the {len(rows)} rationales",
            "check that the scorer's context holds the prompts, or use student.format=rationale",
        )
    return out, count


def _on_policy(recipe, tokenizer, cfg, task: Task, steps: int):
    """The scorer of on-policy steps: the (cached) teacher, its prompt, the loss the tokenizers allow."""
    from distill.students.data import prompt_template
    from distill.students.kd import tokenizer_mismatch
    from distill.students.on_policy import OnPolicy
    from distill.teachers.budget import cost_of
    from distill.teachers.methods import scoring_prompt

    op = cfg.on_policy
    source = op.teacher or recipe.teacher.model
    if source.startswith("replay:"):
        raise DistillError(
            "student.on_policy needs a teacher that scores text; the replay teacher recorded text only",
            "set student.on_policy.teacher to a model source (e.g. embedded:qwen2.5-coder-0.5b-instruct)",
        )
    remote = source.startswith("openai:")
    teacher = _scorer(recipe, source, op.dtype, "student.on_policy.teacher")
    loss = op.loss
    if loss != "uld" and not remote:
        mismatch = tokenizer_mismatch(source, tokenizer)
        if mismatch and loss == "jsd":
            raise DistillError(
                f"student.on_policy.loss=jsd needs a shared tokenizer: {mismatch}",
                "set student.on_policy.loss=uld (or auto), or a student from the teacher's family",
            )
        loss = "uld" if mismatch else "jsd"
    elif loss == "auto":
        loss = "jsd"  # an endpoint returns token ids only when it can; examples without them are skipped
    max_new = op.max_new_tokens or cfg.eval_max_new_tokens
    on_steps = round(steps * op.lmbda)
    est_tokens = on_steps * cfg.batch_size * (max_new + 256)
    est_cost = cost_of(est_tokens, 0, recipe.teacher)
    console.print(
        f"train: on-policy ({loss}, λ {op.lmbda:g}, β {op.beta:g}) on ~{on_steps} of {steps} steps: "
        f"~{on_steps * cfg.batch_size} student samples of ≤ {max_new} tokens scored by {source}"
        + (f", ≤ ~{est_tokens:,} teacher tokens ≈ {est_cost:.2f} at the teacher's prices" if est_cost else "")
        + " (cached scores are free)"
    )
    return OnPolicy(
        scorer=teacher,
        teacher_prompt=lambda q: scoring_prompt(teacher, q, recipe.teacher, task),
        tokenizer=tokenizer,
        template=prompt_template(tokenizer, cfg.format),
        settings=op,
        loss=loss,
        max_new_tokens=max_new,
        max_length=cfg.max_length,
        seed=cfg.seed,
        cost=lambda tokens_in: cost_of(tokens_in, 0, recipe.teacher),
    )


def qat_layout(recipe):
    """The int4 export's block layout (``export`` settings) as the trainer simulates it."""
    from distill.students.qat import QuantLayout

    block, groups, embed = recipe.export.weight_only_blocks
    return QuantLayout(
        bits=4,
        block_size=block,
        group_block_sizes=tuple(groups.items()),
        embed_bits=8,
        embed_block_size=embed,
        activation_bits=8 if recipe.student.qat.activations else None,
    )


def _qat(recipe, model, examples, cfg, tokenizer, dev) -> dict:
    """The quantization-aware phase after training (``student.qat``); its record for the metrics."""
    from distill.students.qat import quantization_aware_finetune

    for p in model.parameters():  # a merged LoRA student trains all its weights in this phase
        p.requires_grad_(True)
    q = cfg.qat
    console.print(
        f"train: quantization-aware phase, {q.steps} steps through the int4 export's grid"
        + (f" (self-distillation weight {q.distill:g})" if q.distill else "")
    )
    record = quantization_aware_finetune(model, examples, cfg, tokenizer.pad_token_id, qat_layout(recipe), dev)
    line = (
        f"train: quantization-aware phase done, mean step loss {record['first_loss']:.3f} (first quarter) → "
        f"{record['final_loss']:.3f} (last quarter)"
    )
    if dev is not None:
        before, after = record["dev_before"], record["dev_after"]
        line += (
            f"; dev through the int4 grid {before['dev_accuracy']:.1%} → {after['dev_accuracy']:.1%} "
            f"(loss {before['dev_loss']:.3f} → {after['dev_loss']:.3f})"
        )
    console.print(line)
    return record


def _sweep_lr(cfg, examples, tokenizer, dev, checkpoint_dir: Path | None, teacher_source: str | None = None):
    """(the sweep, ``cfg`` with the chosen lr): kept beside the checkpoints, so a resumed run does not sweep again."""
    from distill.core.artifacts import write_json
    from distill.students.models import build_student
    from distill.students.trainer import best_learning_rate, sweep_learning_rates

    saved = checkpoint_dir / "lr_sweep.json" if checkpoint_dir is not None else None
    if saved is not None and saved.exists():
        sweep = json.loads(saved.read_text())
    else:
        console.print(f"train: learning-rate sweep over {cfg.lr_sweep.candidates} on the dev split")
        sweep = sweep_learning_rates(
            lambda: build_student(cfg, teacher_source)[0], examples, cfg, tokenizer.pad_token_id, dev
        )
        if saved is not None:
            write_json(saved, sweep)
    lr = best_learning_rate(sweep)
    console.print(
        "train: lr " + ", ".join(f"{r['lr']:g} → dev loss {r['dev_loss']:.3f}" for r in sweep) + f"; using {lr:g}"
    )
    return sweep, cfg.model_copy(update={"lr": lr})


def _train_on_workers(recipe, model, examples, cfg, tokenizer, dev, gen_dir: Path, checkpoint_dir: Path | None):
    """``student.workers`` > 1: the same training on Ray Train workers; returns rank 0's ``TrainResult``.

    Checkpoints go to ``student.storage_path`` (a run named by the recipe, the student settings and the
    data, so a changed recipe never resumes another's checkpoint) or else the stage's work folder.
    """
    import hashlib
    import shutil
    import tempfile

    from distill.config import content_hash
    from distill.students.distributed import WorkerSettings, train_on_workers

    scratch = None
    if cfg.storage_path:
        data = hashlib.sha256((gen_dir / "dataset" / "train.parquet").read_bytes()).hexdigest()[:12]
        storage, name = cfg.storage_path, f"{recipe.name}-train-{content_hash(cfg)[:12]}-{data}"
    elif checkpoint_dir is not None:
        storage, name = str(checkpoint_dir), "ray_train"
    else:
        storage = scratch = tempfile.mkdtemp(prefix="distill-ray-train-")
        name = "ray_train"
    console.print(f"train: {cfg.workers} Ray Train workers, checkpoints in {Path(storage) / name}")
    try:
        done = train_on_workers(
            model, examples, cfg, tokenizer.pad_token_id, WorkerSettings(cfg.workers, storage, name), dev=dev
        )
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if done.resumed_from:
        console.print(f"train: resumed from the checkpoint of step {done.resumed_from}")
    return done.result


def train_stage(recipe, gen_dir: Path, out: Path, checkpoint_dir: Path | None = None) -> TrainStageResult:
    """Train the recipe's student on ``gen_dir``'s dataset; saves ``out/model``.

    With ``checkpoint_dir``, resumable checkpoints go there (outside the stage's temp folder, so a
    killed run keeps them) and an existing one is continued from.
    """
    from distill.students.data import build_examples
    from distill.students.models import build_student
    from distill.students.trainer import planned_steps, save_student, train
    from distill.students.validation import split_dev
    from distill.teachers.rows import read_rows

    cfg = recipe.student
    rows = read_rows(gen_dir / "dataset" / "train.parquet", TRAIN_COLUMNS, "generate more data or relax teacher.keep")
    model, tokenizer = build_student(cfg, recipe.teacher.model)
    task = Task.from_config(recipe.task)
    kd_scoring = None
    if cfg.format == "kd":
        _check_kd(recipe, tokenizer, rows)
        if cfg.kd.teacher is not None:
            rows, kd_scoring = _kd_scores(recipe, rows, task)
    dev = None
    if cfg.validation is not None:
        rows, dev_rows = split_dev(rows, cfg.validation.dev_size, cfg.seed)
        dev = _dev_set(dev_rows, tokenizer, cfg, task, recipe.teacher.trigger)
    examples = build_examples(tokenizer, rows, cfg.format, task, cfg.max_length, recipe.teacher.trigger, cfg.kd.loss)
    total, _ = planned_steps(len(examples), cfg)
    sized = (
        f"until the dev {cfg.validation.metric} stops improving (at most {total} steps)"
        if cfg.epochs == "auto"
        else f"{cfg.epochs:g} epochs ({total} steps)"
    )
    held = f", {len(dev.problems)} dev questions held out" if dev else ""
    name = f"a smaller copy of {recipe.teacher.model}" if cfg.from_teacher is not None else cfg.model
    console.print(f"[bold]train[/] {name} on {len(examples)} examples ({cfg.format}){held}, {sized}")
    t0 = time.time()
    if checkpoint_dir is not None and (checkpoint_dir / "rng.json").exists():
        console.print(f"train: resuming from the checkpoint in {checkpoint_dir}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sweep = None
    if cfg.lr == "auto":
        sweep, cfg = _sweep_lr(cfg, examples, tokenizer, dev, checkpoint_dir, recipe.teacher.model)
        model, _ = build_student(
            cfg, recipe.teacher.model
        )  # the real run starts from the same fresh weights as every candidate
    on_policy = _on_policy(recipe, tokenizer, cfg, task, total) if cfg.on_policy is not None else None
    trackers = None
    if cfg.report_to:
        from distill.students.trackers import Trackers

        params = {f"student.{k}": v for k, v in cfg.model_dump(mode="json").items()}
        trackers = Trackers(cfg.report_to, recipe.run_dir, recipe.name, params)
    try:
        if cfg.workers > 1:
            result = _train_on_workers(recipe, model, examples, cfg, tokenizer, dev, gen_dir, checkpoint_dir)
            if trackers:  # the workers' log, streamed once training is done
                for e in result.losses:
                    trackers.log(e["step"] + 1, {"train/loss": e["loss"], "train/lr": e["lr"]})
                for d in result.dev:
                    trackers.log(d["step"], {"dev/loss": d["dev_loss"], "dev/accuracy": d["dev_accuracy"]})
        else:
            result = train(
                model,
                examples,
                cfg,
                tokenizer.pad_token_id,
                checkpoint_dir=checkpoint_dir,
                dev=dev,
                on_log=trackers.log if trackers else None,
                on_policy=on_policy,
            )
    finally:
        if trackers:
            trackers.close()
    if cfg.lora is not None:
        from distill.students.lora import merge_lora

        model = merge_lora(model)  # a plain model: export and evaluation need no PEFT
    qat = _qat(recipe, model, examples, cfg, tokenizer, dev) if cfg.qat is not None else None
    model_dir = out / "model"
    save_student(model, tokenizer, model_dir)
    metrics = {
        "examples": len(examples),
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "seconds": time.time() - t0,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable,
        "stop_reason": result.stop_reason,
        "lr": cfg.lr,
    }
    if sweep is not None:
        metrics["lr_sweep"] = sweep
    if qat is not None:
        metrics["qat"] = qat
    if on_policy is not None:
        metrics["on_policy"] = {**on_policy.state, "loss": on_policy.loss}
    if kd_scoring is not None:
        metrics["kd_scoring"] = {**kd_scoring, "teacher": cfg.kd.teacher, "loss": cfg.kd.loss}
    if cfg.from_teacher is not None:
        metrics["from_teacher"] = _size_and_speed(recipe.teacher.model, model, examples[0]["input_ids"][:32])
    if dev is not None:
        best = next(d for d in result.dev if d["step"] == result.best_step)
        metrics.update(
            dev_questions=len(dev.problems),
            best_step=result.best_step,
            best_dev_accuracy=best["dev_accuracy"],
            best_dev_loss=best["dev_loss"],
        )
        write_json(out / "dev.json", result.dev)
    write_json(out / "loss.json", result.losses)
    write_json(out / "metrics.json", metrics)
    write_config(out, "train", cfg.model_dump(), recipe.dump())
    write_config(model_dir, "train", cfg.model_dump(), recipe.dump())
    console.print(
        f"train: {result.steps} steps, {result.tokens_per_second:.0f} tok/s, final loss {metrics['final_loss']:.3f}; "
        f"stopped: {result.stop_reason}"
        + (
            f"; kept step {result.best_step} (dev {metrics['best_dev_accuracy']:.1%}, loss {metrics['best_dev_loss']:.3f})"
            if dev
            else ""
        )
    )
    return TrainStageResult(out, model_dir, metrics)
