"""Stage 2 — train: fine-tune the student on the teacher's kept rationales (completion-only loss)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from distill.core.answers import Task
from distill.core.artifacts import write_config, write_json
from distill.core.errors import DistillError
from distill.core.progress import console
from distill.core.sources import resolve_model

REQUIRED_COLUMNS = {"question", "rationale", "gold"}


@dataclass
class TrainStageResult:
    dir: Path
    model_dir: Path
    metrics: dict


def load_student(source: str, tokenizer_source: str | None = None, seed: int = 0):
    """(model, tokenizer) for a student source, fp32, one CPU thread.

    ``config:<...>`` sources build a randomly initialised model (seeded) with ``tokenizer_source``'s
    tokenizer, or the tokenizer saved beside the config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    if source.startswith("config:"):
        from distill.students.architecture import model_from_config, read_config_spec

        _, folder = read_config_spec(source)
        if tokenizer_source is None and folder is None:
            raise DistillError("a config: student needs a tokenizer", "set student.tokenizer to a model source")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_source) if tokenizer_source else folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = model_from_config(source, len(tokenizer), seed)
        return (model.cuda() if torch.cuda.is_available() else model), tokenizer
    path = resolve_model(source)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_source) if tokenizer_source else path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:  # safetensors only: a pickle checkpoint can run code on load
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except OSError as e:
        raise DistillError(
            f"{path} has no loadable safetensors weights ({str(e).splitlines()[0][:120]})",
            "save the model with save_pretrained(..., safe_serialization=True); pickle checkpoints are not loaded",
        ) from None
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def build_student(cfg):
    """(model, tokenizer) ready to train for a ``StudentConfig``: loaded or built from a config,
    cut to ``cfg.layers``, wrapped with LoRA adapters when ``cfg.lora`` is set."""
    model, tokenizer = load_student(cfg.model, cfg.tokenizer, cfg.seed)
    if cfg.layers is not None:
        from distill.students.architecture import keep_layers

        keep_layers(model, cfg.layers)
    if cfg.lora is not None:
        from distill.students.lora import add_lora

        model = add_lora(model, cfg.lora, cfg.seed)
    return model, tokenizer


def read_train_rows(dataset_file: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if not dataset_file.is_file():
        raise DistillError(f"training data {dataset_file} does not exist", "run `distill generate` first")
    table = pq.read_table(dataset_file)
    missing = REQUIRED_COLUMNS - set(table.column_names)
    if missing:
        raise DistillError(f"{dataset_file} lacks columns {sorted(missing)}", "regenerate it with `distill generate`")
    if table.num_rows == 0:
        raise DistillError(f"{dataset_file} has no rows", "generate more data or relax teacher.keep")
    return table.to_pylist()


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
    from distill.students.trainer import save_student, train

    cfg = recipe.student
    rows = read_train_rows(gen_dir / "dataset" / "train.parquet")
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
