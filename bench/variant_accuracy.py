"""Accuracy of exported variants on fresh problems: more than the run's evaluation split, paired.

    .venv/bin/python bench/variant_accuracy.py runs/quickstart model.onnx model.int8.onnx [--problems 200]

Draws ``--problems`` new problems from the run's reasoning-gym task (same task and parameters, another
seed; questions of the run's train and eval splits excluded), answers them with each ONNX file of
``<run>/export/variants`` through the torch-free runtime (greedy, the run's eval batch size and token
cap) and prints accuracy with a 95% interval per file, then, for every file after the first, how many
problems only the first solves and how many only that file solves. Use it when the gate's split is too
small to resolve its tolerance (40 problems: one problem is 2.5 points).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()  # offline, no telemetry, one thread (before torch or onnxruntime load)


def main() -> None:
    import pyarrow.parquet as pq

    from distill.config import load_recipe
    from distill.core.answers import Task
    from distill.core.problems import reasoning_gym_problems
    from distill.export.gate import paired_changes, score_variant

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("files", nargs="+", help="ONNX files in <run>/export/variants; the first is the reference")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--seed", type=int, default=5_000_000)
    args = ap.parse_args()
    recipe = load_recipe(args.run / "recipe.yaml")
    task = recipe.task
    if task.source != "reasoning_gym":
        sys.exit("error: fresh problems need a reasoning_gym task (this run's task comes from a file)")
    seen = {
        r["question"]
        for split in ("train", "eval")
        for r in pq.read_table(args.run / "generate" / "dataset" / f"{split}.parquet").to_pylist()
    }
    pool = reasoning_gym_problems(task.name, task.params, args.problems * 2 + 16, args.seed)
    unseen = [p for p in pool if p["question"] not in seen]
    problems = [{"id": f"fresh-{i:05d}", **p} for i, p in enumerate(unseen[: args.problems])]
    print(
        f"{len(problems)} fresh problems ({task.name}, seed {args.seed}; "
        f"{len(pool) - len(unseen)} of the {len(pool)} drawn were in the run's splits)"
    )
    correct: dict[str, list[bool]] = {}
    for f in args.files:
        summary, rows = score_variant(
            args.run / "export" / "variants",
            f,
            problems,
            Task.from_config(task),
            recipe.student.eval_max_new_tokens,
            recipe.student.eval_batch_size,
            f,
        )
        correct[f] = [r["correct"] for r in rows]
        lo, hi = summary["ci95"]
        print(f"{f:<24} {summary['accuracy']:6.1%} ({summary['correct']}/{summary['n']})  95% CI {lo:.1%}–{hi:.1%}")
    ref = args.files[0]
    for f in args.files[1:]:
        only_ref, only_f = paired_changes(correct[ref], correct[f])
        print(f"{f} vs {ref}: {only_ref} solved only by {ref}, {only_f} only by {f}")


if __name__ == "__main__":
    main()
