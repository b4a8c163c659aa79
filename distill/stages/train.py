"""Stage 2 — train: fine-tune the student on the teacher's kept rationales (completion-only loss)."""

from __future__ import annotations

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
    """Logit KD needs the teacher's top-k in the data and the teacher's tokenizer in the student."""
    from distill.students.kd import tokenizer_mismatch

    if recipe.teacher.model.startswith("replay:"):
        raise DistillError(
            "student.format=kd needs token log-probabilities; the replay teacher recorded text only",
            "use student.format=rationale, or a model teacher with teacher.topk_logprobs",
        )
    if not any(r.get("teacher_topk_ids") for r in rows):
        raise DistillError(
            "the training data has no teacher top-k log-probabilities",
            "set teacher.topk_logprobs (e.g. 20) and run `distill generate` again",
        )
    mismatch = tokenizer_mismatch(recipe.teacher.model, tokenizer)
    if mismatch:
        raise DistillError(
            f"logit KD needs a shared tokenizer: {mismatch}",
            "pick a student from the teacher's model family, or student.format=rationale",
        )


def train_stage(recipe, gen_dir: Path, out: Path, checkpoint_dir: Path | None = None) -> TrainStageResult:
    """Train the recipe's student on ``gen_dir``'s dataset; saves ``out/model``.

    With ``checkpoint_dir``, resumable checkpoints go there (outside the stage's temp folder, so a
    killed run keeps them) and an existing one is continued from.
    """
    from distill.students.data import build_examples
    from distill.students.models import build_student
    from distill.students.trainer import save_student, train
    from distill.teachers.rows import read_rows

    cfg = recipe.student
    rows = read_rows(gen_dir / "dataset" / "train.parquet", TRAIN_COLUMNS, "generate more data or relax teacher.keep")
    model, tokenizer = build_student(cfg)
    task = Task(recipe.task.answer_type)
    if cfg.format == "kd":
        _check_kd(recipe, tokenizer, rows)
    examples = build_examples(tokenizer, rows, cfg.format, task, cfg.max_length, recipe.teacher.trigger)
    console.print(f"[bold]train[/] {cfg.model} on {len(examples)} examples ({cfg.format}), {cfg.epochs} epochs")
    t0 = time.time()
    if checkpoint_dir is not None and (checkpoint_dir / "rng.json").exists():
        console.print(f"train: resuming from the checkpoint in {checkpoint_dir}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = train(model, examples, cfg, tokenizer.pad_token_id, checkpoint_dir=checkpoint_dir)
    if cfg.lora is not None:
        from distill.students.lora import merge_lora

        model = merge_lora(model)  # a plain model: export and evaluation need no PEFT
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
    }
    write_json(out / "loss.json", result.losses)
    write_json(out / "metrics.json", metrics)
    write_config(out, "train", cfg.model_dump(), recipe.dump())
    write_config(model_dir, "train", cfg.model_dump(), recipe.dump())
    console.print(
        f"train: {result.steps} steps, {result.tokens_per_second:.0f} tok/s, final loss {metrics['final_loss']:.3f}"
    )
    return TrainStageResult(out, model_dir, metrics)
