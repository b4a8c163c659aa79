"""Majority vs complexity-based voting (Fu et al. 2023) over the same self-consistency samples.

The embedded teacher samples ``--samples`` reasoning paths per held-out problem once (through the
completion cache: a rerun is free); both votes are then computed from those very paths, so the
comparison is paired: accuracy with 95% Wilson intervals, and the gap with its paired (Tango)
interval. Usage:
  python bench/vote_methods.py [RECIPE] [--samples 8] [--k 4] [--problems 100] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()


def main() -> None:
    from distill.config import load_recipe
    from distill.core.answers import Task
    from distill.core.problems import load_problems
    from distill.core.sources import resolve_model
    from distill.export.gate import paired_changes, paired_gap
    from distill.students.evaluate import wilson_interval
    from distill.teachers.backends.base import Decoding
    from distill.teachers.methods import _messages, _reason, voted, voters
    from distill.teachers.workers import TeacherWorker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="complexity vote: the k chains with the most steps")
    ap.add_argument("--problems", type=int, default=100)
    args = ap.parse_args()
    recipe = load_recipe(
        args.recipe, [*args.overrides, "teacher.method=self_consistency", f"teacher.samples={args.samples}"]
    )
    cfg, task = recipe.teacher, Task.from_config(recipe.task)
    _, evals = load_problems(recipe.task.model_copy(update={"eval_size": args.problems}))
    worker = TeacherWorker(str(resolve_model(cfg.model)), cfg, task, str(Path(recipe.cache).resolve()))
    teacher = worker.teacher
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    results = {"majority": [], "complexity": []}
    for start in range(0, len(evals), cfg.batch_size):
        batch = evals[start : start + cfg.batch_size]
        prompts = [
            teacher.chat_prompt(_messages(p["question"], cfg, task, p), assistant_prefix=cfg.trigger) for p in batch
        ]
        groups = _reason(teacher, prompts, cfg, task, args.samples, decoding, [p["question"] for p in batch])
        for p, paths in zip(batch, groups):
            gold = task.normalize_gold(p["gold"], p["question"])
            for vote, k in (("majority", 0), ("complexity", args.k)):
                pred = voted([x["pred"] for x in voters(paths, vote, k)])
                results[vote].append(pred is not None and task.is_correct(pred, gold, p["question"]))
        print(f"{start + len(batch)}/{len(evals)} problems", file=sys.stderr)
    n = len(evals)
    for vote, ok in results.items():
        lo, hi = wilson_interval(sum(ok), n)
        print(f"{vote:>10}: {sum(ok)}/{n} = {sum(ok) / n:.1%} (95% CI {lo:.1%}–{hi:.1%})")
    lost, gained = paired_changes(results["majority"], results["complexity"])
    gap, lo, hi = paired_gap(lost, gained, n)
    print(f"complexity − majority: {gap:+.1%} (95% CI {lo:+.1%} … {hi:+.1%}), lost {lost} / gained {gained}")


if __name__ == "__main__":
    main()
