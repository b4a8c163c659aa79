"""Student ablation: label-only, rationale, multitask and logit-KD students on the same data and budget.

``distill ablate recipe.yaml`` runs the recipe's generate stage (reused when up to date), then trains
one student per format on that same dataset with the same optimizer-step budget, evaluates each,
the base student and the teacher on the eval split, and writes ``<run>/ablate/ablation.{md,json}``
and ``ablation.png``. Every trained and evaluated student is a unit under ``<run>/ablate/`` with a
content hash of its semantic settings: an interrupted ablation reuses finished units and resumes a
killed training run from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from distill.config import Recipe, content_hash
from distill.core.artifacts import atomic_write_bytes, write_json, write_recipe, write_text
from distill.core.errors import DistillError
from distill.core.locks import run_lock
from distill.core.progress import console
from distill.pipeline import is_done, run_stage, stage_dir, stage_hash

FORMATS = ("label", "rationale", "multitask", "kd", "on_policy")
LABELS = {
    "teacher": "teacher",
    "student_base": "base student (no training)",
    "label": "label-only",
    "rationale": "rationale (Fine-tune-CoT)",
    "multitask": "multitask (step-by-step)",
    "kd": "logit KD",
    "on_policy": "on-policy (GKD)",
}


def variant(recipe: Recipe, fmt: str) -> Recipe:
    """The recipe with ``student.format = fmt`` and the same optimizer-step budget.

    A multitask student sees every question twice ([label] and [explain]); its batches hold both,
    so it takes as many optimizer steps over the same questions and epochs as the others.
    """
    data = recipe.dump()
    if fmt == "on_policy":  # the rationale student, with its own samples scored by the teacher on λ of the steps
        on_policy = data["student"].get("on_policy") or {}
        student = {**data["student"], "format": "rationale", "on_policy": on_policy}
        return Recipe.model_validate({**data, "student": student})
    student = {**data["student"], "format": fmt, "on_policy": None}
    if fmt == "multitask":
        student["batch_size"] = 2 * recipe.student.batch_size
        student["micro_batch_size"] = 2 * recipe.student.micro_batch_size
    return Recipe.model_validate({**data, "student": student})


def kd_unavailable(recipe: Recipe, gen_dir: Path) -> str | None:
    """Why a logit-KD student cannot be trained on this run's data (None when it can)."""
    import pyarrow.parquet as pq

    kd = recipe.student.kd
    if kd.teacher is not None:
        return None  # the train stage scores the rows with kd.teacher (and checks the tokenizers)
    if recipe.teacher.model.startswith("replay:"):
        return (
            "the replay teacher recorded text only, no token log-probabilities (set student.kd.teacher to score them)"
        )
    columns = set(pq.read_schema(gen_dir / "dataset" / "train.parquet").names)
    if not recipe.teacher.topk_logprobs or "teacher_topk_ids" not in columns:
        return "the teacher stored no top-k log-probabilities (set teacher.topk_logprobs, e.g. 20)"
    from transformers import AutoTokenizer

    from distill.core.sources import resolve_model
    from distill.students.kd import tokenizer_mismatch

    cfg = recipe.student
    if cfg.kd.loss == "uld" or cfg.from_teacher is not None:
        return None  # ULD needs no shared vocabulary; a copy of the teacher has the teacher's
    if cfg.model.startswith("config:") and not cfg.tokenizer:
        return None  # a config student's tokenizer sits beside its config; the train stage checks it
    student = AutoTokenizer.from_pretrained(resolve_model(cfg.tokenizer or cfg.model))
    return tokenizer_mismatch(recipe.teacher.model, student)


def on_policy_unavailable(recipe: Recipe) -> str | None:
    """Why an on-policy student cannot be trained (None when it can): it needs a teacher that scores text."""
    scorer = (recipe.student.on_policy.teacher if recipe.student.on_policy else None) or recipe.teacher.model
    if scorer.startswith("replay:"):
        return (
            "the replay teacher cannot score the student's samples (set student.on_policy.teacher to a model, "
            "e.g. embedded:qwen2.5-coder-0.5b-instruct)"
        )
    return None


def _unit(base: Path, name: str, digest: str, force: bool, fn) -> Path:
    """Run ``fn(out_dir)`` into ``base/name`` unless a finished unit with ``digest`` is already there."""
    if not force and is_done(base / name, digest):
        console.print(f"[dim]ablate: {name} up to date, reusing[/]")
        return base / name
    with stage_dir(base, name, digest) as out:
        fn(out)
    return base / name


def _train_and_eval(v: Recipe, fmt: str, gen_dir: Path, base: Path, problems, task, force: bool, resume: bool) -> dict:
    from distill.stages.evaluate import evaluate_student, write_rows
    from distill.stages.train import train_stage

    digest = stage_hash(v, "train")
    work = base / f".train-{fmt}.work-{digest[:12]}"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    train_dir = _unit(
        base, f"train-{fmt}", digest, force, lambda out: train_stage(v, gen_dir, out, checkpoint_dir=work)
    )
    shutil.rmtree(work, ignore_errors=True)

    def evaluate(out: Path) -> None:
        summary, rows = evaluate_student(str(train_dir / "model"), fmt, problems, task, v.student, fmt)
        write_rows(out / "outputs.jsonl", rows)
        write_json(out / "scores.json", summary)

    eval_dir = _unit(base, f"eval-{fmt}", content_hash({"train": digest, "eval": "v1"}), force, evaluate)
    metrics = json.loads((train_dir / "metrics.json").read_text())
    return {
        **json.loads((eval_dir / "scores.json").read_text()),
        "train_steps": metrics["steps"],
        "train_tokens": metrics["tokens"],
        "train_seconds": metrics["seconds"],
        "train_examples": metrics["examples"],
        "stop_reason": metrics.get("stop_reason") or "the planned epochs were done",
        **(
            {"best_step": metrics["best_step"], "best_dev_accuracy": metrics["best_dev_accuracy"]}
            if "best_step" in metrics
            else {}
        ),
        "outputs": str(eval_dir / "outputs.jsonl"),
    }


def ablate(
    recipe: Recipe, formats: tuple[str, ...] = FORMATS, force: bool = False, resume: bool = True, command: str = ""
) -> dict:
    """Train and evaluate one student per format on the same data; returns the ablation table (as json).

    Writes ``<run>/ablate/ablation.md``, ``ablation.json`` and ``ablation.png``. Holds the run folder's
    lock throughout (its generate stage re-enters it): a second writer there is refused.
    """
    with run_lock(recipe.run_dir):
        return _ablate(recipe, formats, force, resume, command)


def _ablate(recipe: Recipe, formats: tuple[str, ...], force: bool, resume: bool, command: str) -> dict:
    from distill.core.answers import Task
    from distill.stages.evaluate import evaluate_student, teacher_rows, write_rows
    from distill.students.evaluate import summarize
    from distill.teachers.rows import read_eval_problems

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise DistillError(f"unknown ablation format(s) {unknown}", f"choose from {', '.join(FORMATS)}")
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(run_dir / "recipe.yaml", recipe.dump())
    t0 = time.time()
    gen_result = run_stage(recipe, "generate", force=False, resume=resume)
    if gen_result.metrics.get("failed_rows"):  # every student would learn from fewer rows than the table says
        from distill.teachers.budget import PartialRun, failures_text

        gen = gen_result.metrics
        raise PartialRun(
            f"the teacher failed on {gen['failed_rows']} of {gen['problems']} rows "
            f"({failures_text(gen.get('failures', []))}): the ablation stopped before training its students",
            "rerun the same command to retry only the failed rows",
        )
    gen_dir = run_dir / "generate"
    base = run_dir / "ablate"
    base.mkdir(exist_ok=True)
    task = Task.from_config(recipe.task)
    problems = read_eval_problems(gen_dir)
    gen = json.loads((gen_dir / "metrics.json").read_text())

    results: list[dict] = []
    rows = teacher_rows(problems)
    write_rows(base / "teacher.jsonl", rows)
    results.append({"model": "teacher", "label": LABELS["teacher"], **summarize(rows), "note": recipe.teacher.model})

    def base_eval(out: Path) -> None:
        summary, per = evaluate_student(recipe.student.model, "rationale", problems, task, recipe.student, "base")
        write_rows(out / "outputs.jsonl", per)
        write_json(out / "scores.json", summary)

    base_digest = content_hash(
        {
            "generate": stage_hash(recipe, "generate"),
            "model": recipe.student.model,
            "eval_max_new_tokens": recipe.student.eval_max_new_tokens,
        }
    )
    d = _unit(base, "eval-student_base", base_digest, force, base_eval)
    results.append(
        {
            "model": "student_base",
            "label": LABELS["student_base"],
            **json.loads((d / "scores.json").read_text()),
            "outputs": str(d / "outputs.jsonl"),
        }
    )
    for fmt in formats:
        skip = kd_unavailable(recipe, gen_dir) if fmt == "kd" else None
        skip = on_policy_unavailable(recipe) if fmt == "on_policy" else skip
        if skip:
            console.print(f"ablate: {LABELS[fmt]} skipped: {skip}")
            results.append({"model": fmt, "label": LABELS[fmt], "skipped": skip})
            continue
        console.print(f"[bold]ablate[/] {LABELS[fmt]} student")
        r = _train_and_eval(variant(recipe, fmt), fmt, gen_dir, base, problems, task, force, resume)
        results.append({"model": fmt, "label": LABELS[fmt], **r})
    table = {
        "recipe": recipe.name,
        "command": command,
        "task": recipe.task.name,
        "student": recipe.student.model,
        "train_rows": gen["train_rows_kept"],
        "train_problems": gen["train_problems"],
        "eval_problems": len(problems),
        "epochs": recipe.student.epochs,
        "calculator": recipe.student.calculator,
        "seconds": time.time() - t0,
        "rows": results,
    }
    write_json(base / "ablation.json", table)
    write_text(base / "ablation.md", markdown(table))
    plot(table, base / "ablation.png")
    console.print(markdown(table))
    return table


def markdown(table: dict) -> str:
    """The ablation table as markdown: one row per model with accuracy, 95% CI and training budget."""
    lines = [
        f"Task `{table['task']}`: {table['train_rows']} teacher rationales kept of {table['train_problems']} "
        f"train problems; {table['eval_problems']} held-out problems; student `{table['student']}`, "
        f"{_epochs(table['epochs'])}."
        + (
            " Students decode with the calculator (`student.calculator`); the teacher alone."
            if table.get("calculator")
            else ""
        ),
        "",
        "| model | accuracy | 95% CI | train steps | kept step (dev accuracy) | stopped | train tokens | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | |")
            continue
        lo, hi = r["ci95"]
        steps = r.get("train_steps", "—")
        kept = f"{r['best_step']} ({r['best_dev_accuracy']:.1%})" if "best_step" in r else "—"
        stopped = r.get("stop_reason", "—")
        tokens = f"{r['train_tokens']:,}" if "train_tokens" in r else "—"
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "—"
        lines.append(
            f"| {r['label']} | {r['accuracy']:.1%} ({r['correct']}/{r['n']}) | {lo:.1%}–{hi:.1%} "
            f"| {steps} | {kept} | {stopped} | {tokens} | {secs} |"
        )
    if table.get("command"):
        lines += ["", f"Command: `{table['command']}`"]
    return "\n".join(lines) + "\n"


def _epochs(epochs) -> str:
    """``2 epochs`` for a fixed budget, ``epochs sized by the dev split`` for ``student.epochs: auto``."""
    return (
        "epochs sized by the dev split (each student stops on its own plateau)"
        if epochs == "auto"
        else f"{epochs:g} epochs"
    )


def plot(table: dict, path: Path) -> None:
    """Bar chart of accuracy with 95% CI error bars per model (skipped rows left out)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if not r.get("skipped")]
    labels = [r["label"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rows], [100 * (r["ci95"][1] - r["accuracy"]) for r in rows]]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    ax.barh(labels[::-1], acc[::-1], xerr=[e[::-1] for e in err], color="#4477aa", capsize=3)
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"accuracy on {table['eval_problems']} held-out problems (%, 95% CI)")
    ax.set_title(f"student ablation: {Path(table['task']).stem}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
