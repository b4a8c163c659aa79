"""Stage 4 — evaluate: greedy accuracy on the held-out problems for every model in the run.

The teacher's score comes from the generate stage (it answered the eval split there; no second
bill). Students are scored with torch; the quantized ONNX student through the torch-free runtime.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from distill.core.answers import Task
from distill.core.artifacts import write_config, write_json
from distill.core.errors import DistillError
from distill.core.progress import console
from distill.students.evaluate import score, summarize
from distill.teachers.rows import read_eval_problems

LABELS = {
    "teacher": "teacher",
    "student_base": "student (before training)",
    "student": "student (after training)",
    "student_onnx": "student ONNX (gated variant)",
}


@dataclass
class EvalResult:
    dir: Path
    scores: dict


def write_rows(path: Path, rows: list[dict]) -> None:
    import json

    from distill.core.artifacts import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _weights_bytes(source: str) -> int | None:
    """On-disk fp32 size of a model source's weights (safetensors), or None when unknown (a replay
    file, or a teacher behind an HTTP endpoint)."""
    from distill.core.sources import resolve_model

    if source.startswith(("replay:", "openai:")):
        return None
    folder = Path(resolve_model(source))
    sizes = [f.stat().st_size for f in folder.glob("*.safetensors")] if folder.exists() else []
    return sum(sizes) or None


def split_problems(gen_dir: Path, split: str, task) -> tuple[list[dict], bool]:
    """(problems, teacher answers known) for ``split``: ``eval``, ``train`` (every train problem the
    teacher answered, kept or not) or a task file (.jsonl/.json/.log) of new problems."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if split == "eval":
        return read_eval_problems(gen_dir), True
    if split == "train":
        shards = gen_dir / "shards"
        if not shards.is_dir():
            raise DistillError(f"{shards} does not exist", "run `distill generate` first")
        table = pq.read_table(shards)
        return table.filter(pc.equal(table["split"], "train")).sort_by("id").to_pylist(), True
    if not Path(split).is_file():
        raise DistillError(f"split {split!r} is neither eval, train nor a file", "pass eval, train or a .jsonl path")
    from distill.core.problems import read_problem_file

    rows = read_problem_file(split)
    return [
        {
            "id": f"file-{i:06d}",
            "split": "file",
            "question": r["question"],
            "gold": task.normalize_gold(r["gold"], r["question"]),
        }
        for i, r in enumerate(rows)
    ], False


def teacher_rows(problems: list[dict]) -> list[dict]:
    """Per-example rows of the teacher's own answers to ``problems`` (recorded by the generate stage).

    A problem whose teacher call failed keeps its ``error``: ``summarize`` leaves it out of the score."""
    return [
        {
            "id": p["id"],
            "question": p["question"],
            "gold": p["gold"],
            "output": (p["rationale"] or "") + "\n" + (p["answer_raw"] or ""),
            "pred": p["pred"],
            "correct": bool(p["correct"]) and not p.get("error"),
            **({"error": p["error"]} if p.get("error") else {}),
        }
        for p in problems
    ]


def evaluate_student(
    source: str, fmt: str, problems: list[dict], task: Task, cfg, label: str, built=None
) -> tuple[dict, list]:
    """Greedy accuracy of a torch student (asked in format ``fmt``; ``built``: an already built
    (model, tokenizer) instead of ``source``); returns (summary, per-example rows)."""
    from distill.students.data import prompt_template
    from distill.students.evaluate import generate_torch
    from distill.students.models import load_student

    model, tokenizer = built or load_student(source, cfg.tokenizer if source == cfg.model else None, cfg.seed)
    questions = [p["question"] for p in problems]
    template = prompt_template(tokenizer, fmt)
    outs = generate_torch(
        model,
        tokenizer,
        template,
        questions,
        cfg.eval_max_new_tokens,
        cfg.eval_batch_size,
        label,
        calculator=cfg.calculator,
    )
    summary, rows = score(outs, problems, task)
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    summary["bytes"] = summary["parameters"] * 4
    return summary, rows


def _gate_rows(
    export_dir: Path | None, split: str, preset: str, problems: list[dict]
) -> tuple[list[dict], dict] | None:
    """The export gate's per-problem rows of ``preset`` and its variant entry, when the gate scored it
    on exactly ``problems`` of ``split`` (the eval split, not a separate gate split, and not stopped
    early); else None."""
    if export_dir is None or split != "eval" or not (export_dir / "metrics.json").exists():
        return None
    exp = json.loads((export_dir / "metrics.json").read_text())
    variant = next((v for v in exp.get("variants", []) if v.get("preset") == preset), None)
    rows_file = export_dir / "gate" / f"{preset}.jsonl"
    if (
        variant is None
        or not exp.get("gated")
        or exp.get("gate_split", {}).get("split", "eval") != "eval"
        or variant.get("rejected_after")
        or not rows_file.exists()
    ):
        return None
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    if sorted(str(r["id"]) for r in rows) != sorted(str(p["id"]) for p in problems):
        return None
    return rows, variant


def evaluate_stage(
    recipe, gen_dir: Path, train_dir: Path | None, export_dir: Path | None, out: Path, split: str = "eval"
) -> EvalResult:
    """Score each model in ``recipe.eval.models`` on ``split`` (eval, train or a task file); writes
    per-example outputs (``<model>.jsonl``) and ``scores.json``."""
    task = Task.from_config(recipe.task)
    problems, teacher_known = split_problems(gen_dir, split, task)
    if not problems:
        raise DistillError(f"split {split!r} has no problems", "pick another split")
    scores: dict[str, dict] = {}
    cfg = recipe.student
    for name in recipe.eval.models:
        t0 = time.time()
        if name == "teacher" and not teacher_known:
            console.print("eval teacher: skipped (the teacher answered only the run's train and eval problems)")
            continue
        if name == "teacher":
            rows = teacher_rows(problems)
            if all(r.get("error") for r in rows):
                console.print(f"eval teacher: skipped (every teacher call on these {len(rows)} problems failed)")
                continue
            summary = {**summarize(rows), "bytes": _weights_bytes(recipe.teacher.model)}
        elif name == "student" and (reused := _gate_rows(export_dir, split, "fp32", problems)) is not None:
            # The gate decoded the fp32 export of this student on these problems: the same weights and
            # decoding (greedy, the same prompt and calculator), so not decoded a second time.
            rows, fp32 = reused
            summary = {**summarize(rows), "bytes": fp32["bytes"], "answers_from": "export gate (fp32 ONNX)"}
            trained = train_dir / "metrics.json" if train_dir is not None else None
            if trained is not None and trained.exists() and "parameters" in (m := json.loads(trained.read_text())):
                summary["parameters"] = m["parameters"]
                summary["bytes"] = m["parameters"] * 4
        elif name in ("student_base", "student"):
            if name == "student" and train_dir is None:
                continue
            source = cfg.model if name == "student_base" else str(train_dir / "model")
            fmt = "rationale" if name == "student_base" else cfg.format
            built = None
            if name == "student_base" and cfg.from_teacher is not None:  # the shrunk teacher copy, untrained
                from distill.students.models import build_student

                built = build_student(cfg.model_copy(update={"lora": None}), recipe.teacher.model)
            summary, rows = evaluate_student(source, fmt, problems, task, cfg, name, built)
        elif name == "student_onnx":
            if export_dir is None or not (export_dir / "metrics.json").exists():
                continue
            exp = json.loads((export_dir / "metrics.json").read_text())
            chosen = next(v for v in exp["variants"] if v["chosen"])
            reused = _gate_rows(export_dir, split, chosen["preset"], problems)
            if reused is not None:
                # The gate already scored this exact file on this split through the same runtime.
                rows = reused[0]
                summary = summarize(rows)
            else:
                from distill.export.gate import score_variant

                summary, rows = score_variant(
                    export_dir / "bundle",
                    chosen["file"],
                    problems,
                    task,
                    cfg.eval_max_new_tokens,
                    cfg.eval_batch_size,
                    name,
                )
            summary["bytes"] = chosen["bytes"]
            summary["model_file"] = chosen["file"]
            summary["preset"] = chosen["preset"]
        else:  # pragma: no cover - validated by the recipe model
            raise ValueError(name)
        summary["seconds"] = time.time() - t0
        summary["label"] = LABELS[name] if name != "student_onnx" else f"student {summary['preset']} ONNX"
        if name == "student" and "answers_from" in summary:
            summary["label"] += ", fp32 ONNX"
        scores[name] = summary
        write_rows(out / f"{name}.jsonl", rows)
        unscored = (
            f"; {summary['failed']} problems not scored: the teacher failed on them" if "failed" in summary else ""
        )
        console.print(
            f"eval {summary['label']}: {summary['accuracy']:.1%} ({summary['correct']}/{summary['n']}){unscored}"
        )
    write_json(out / "scores.json", scores)
    write_config(out, "evaluate", {**recipe.eval.model_dump(), "split": split}, recipe.dump())
    return EvalResult(out, scores)
