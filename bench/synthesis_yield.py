"""What share of synthesized code problems the teacher's own solution passes, and instruction-synthesis
duplicate rates: a synthetic recipe's synthesis replayed from the completion cache of its run.

    nice -n 10 .venv/bin/distill generate bench/recipes/synthesis_code.yaml     # pays for the completions
    .venv/bin/python bench/synthesis_yield.py bench/recipes/synthesis_code.yaml

The synthesis runs exactly as the generate stage runs it (same requests, same cache keys), with the
teacher cache-only: the rounds the run completed are replayed (a run stopped part-way counts the rounds
it finished). Prints the candidates, why each was dropped, and for code the pass share of the solved
candidates with its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from distill.config import load_recipe
from distill.core.problems import load_problems, load_seeds
from distill.stages.generate import _worker_kwargs
from distill.students.evaluate import wilson_interval
from distill.teachers import synthesis
from distill.teachers.cache import CacheMiss
from distill.teachers.workers import TeacherWorker


def replay(recipe, rounds: int) -> tuple[list[dict], dict]:
    """The candidate log and counts of the first ``rounds`` synthesis rounds, from the cache only."""
    t = recipe.task
    worker = TeacherWorker(**_worker_kwargs(recipe, recipe.teacher), cache_only=True)
    log: list[dict] = []
    settings = dict(seed=t.seed, shots=t.seed_shots, temperature=recipe.teacher.temperature)
    settings.update(threshold=t.dedup_threshold, lsh_rows=t.dedup_lsh_rows, max_rounds=rounds, log=log)
    if t.synthesis == "instructions":
        seeds, evals = synthesis.instruction_split(t.name, t.eval_size)
        avoid = [p["question"] for p in evals]
        _, stats = synthesis.synthesize_instructions(worker.teacher, seeds, t.train_size, avoid, **settings)
    else:
        avoid = [p["question"] for p in load_problems(t)[1]]
        solve = lambda ps: worker(ps).to_pylist()  # noqa: E731
        _, stats = synthesis.synthesize_code(worker.teacher, load_seeds(t), t.train_size, avoid, solve, **settings)
    return log, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    args = ap.parse_args()
    recipe = load_recipe(Path(args.recipe), [])
    done = None
    for rounds in range(1, 9):
        try:
            done = (rounds, *replay(recipe, rounds))
        except CacheMiss:
            break
        if done[2]["accepted"] >= recipe.task.train_size:
            break
    if done is None:
        raise SystemExit("no synthesis round of this recipe is in the cache: run distill generate on it first")
    rounds, log, stats = done
    verdicts = Counter(e["verdict"].split(":")[0] for e in log)
    print(f"{recipe.task.synthesis}: {rounds} round(s) replayed, {len(log)} candidates")
    print("verdicts:", json.dumps(dict(verdicts.most_common())))
    print("stats:", json.dumps(stats))
    parsed = len(log) - stats["unparsable"]
    dups = stats["exact_duplicates"] + stats["near_duplicates"]
    print(
        f"duplicates: {dups}/{parsed} parsed candidates ({dups / max(parsed, 1):.1%}; exact "
        f"{stats['exact_duplicates']}, near {stats['near_duplicates']}), eval overlap {stats['eval_overlap']}"
    )
    if recipe.task.synthesis == "code":
        solved = [e for e in log if "solution" in e and not e["verdict"].startswith("not needed")]
        passed = sum(e["verdict"] == "kept" for e in solved)
        lo, hi = wilson_interval(passed, len(solved))
        print(
            f"teacher's solution passes its problem's tests: {passed}/{len(solved)} "
            f"({passed / max(len(solved), 1):.1%}, 95% Wilson {lo:.1%}-{hi:.1%})"
        )


if __name__ == "__main__":
    main()
