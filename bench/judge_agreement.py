"""A judge model against gold, and its position and verbosity bias (teacher.judge, issue #14).

The candidates are InstructGPT-175B's recorded zero-shot-CoT rationales (../shared/data/zero_shot_cot
teacher logs), right and wrong by the task's gold: a seeded sample of ``--n`` of them, half right and
half wrong. The judge (``teacher.judge``, by default the embedded Qwen2.5-Coder-0.5B) scores each one
with the reference answer shown, as ``keep: judged`` does; agreement = (judge pass) == (gold correct),
with its 95% Wilson interval, and the pass rates of right and wrong rationales. Bias:

- position: ``--pairs`` questions with a right rationale are compared pairwise against the same
  rationale with its final answer changed (a wrong candidate), in both orders; the share of answers
  naming the first position (0.5 = no position bias), how often the two orders agree, and how often the
  pick is right with one order vs with both orders (``debias: both_orders``, a tie counts as not right);
- verbosity: the correlation of score with rationale length in words, within the right and within the
  wrong rationales (so correctness does not confound it).

Every judge call goes through the completion cache: a rerun is free. Usage:
  python bench/judge_agreement.py [--log multiarith] [--n 60] [--pairs 10] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()

LOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "zero_shot_cot" / "teacher_logs"
TYPES = {"multiarith": "number", "coin_flip": "yes_no", "last_letters": "text"}


def _wrong_answer(rationale: str, pred: str, answer_type: str) -> tuple[str, str]:
    """The rationale with its final stated answer changed (a wrong candidate of the same length)."""
    if answer_type == "number":
        other = str(int(float(pred)) + 3) if re.fullmatch(r"-?\d+(\.0+)?", pred) else pred + "1"
    elif answer_type == "yes_no":
        other = "no" if pred == "yes" else "yes"
    else:
        other = pred[::-1] if pred[::-1] != pred else pred + "x"
    i = rationale.lower().rfind(pred.lower())
    changed = rationale[:i] + other + rationale[i + len(pred) :] if i >= 0 else f"{rationale}\nThe answer is {other}."
    return changed, other


def main() -> None:
    from distill.config import load_recipe
    from distill.core.answers import Task
    from distill.core.sources import resolve_model
    from distill.students.evaluate import wilson_interval
    from distill.teachers.judge import candidate_text, judge_rows, length_correlation, pick_judged
    from distill.teachers.replay import load_records
    from distill.teachers.workers import judge_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default="multiarith", choices=sorted(TYPES))
    ap.add_argument("--n", type=int, default=60, help="rationales scored (half right, half wrong)")
    ap.add_argument("--pairs", type=int, default=10, help="questions compared pairwise in both orders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument(
        "overrides", nargs="*", help="recipe keys, e.g. teacher.judge.model=... teacher.judge.scale=pass_fail"
    )
    args = ap.parse_args()
    recipe = load_recipe(None, ["teacher.judge.model=embedded:qwen2.5-coder-0.5b-instruct", *args.overrides])
    cfg, settings = recipe.teacher, recipe.teacher.judge
    task = Task(TYPES[args.log])
    records = load_records(LOGS / f"{args.log}_zero_shot_cot.log")
    rows = []
    for k, r in enumerate(records):
        gold = task.normalize_gold(r["gold"], r["question"])
        pred = task.extract(str(r["answer"]), question=r["question"]).answer
        if pred is None:
            continue
        ok = task.is_correct(pred, gold, r["question"])
        rows.append(
            {
                "id": f"r{k}",
                "split": "train",
                "question": r["question"],
                "gold": gold,
                "rationale": r["rationale"],
                "pred": pred,
                "error": None,
                "correct": ok,
            }
        )
    rng = random.Random(args.seed)
    right = [r for r in rows if r["correct"]]
    wrong = [r for r in rows if not r["correct"]]
    sample = rng.sample(right, args.n // 2) + rng.sample(wrong, args.n - args.n // 2)
    path = "" if settings.model.startswith("openai:") else str(resolve_model(settings.model))
    judge = judge_teacher(cfg, path, str(Path(recipe.cache).resolve()))

    t0 = time.time()
    judged = []
    for start in range(0, len(sample), cfg.batch_size):
        judged += judge_rows(judge, sample[start : start + cfg.batch_size], settings)
        print(f"scored {len(judged)}/{len(sample)} ({time.time() - t0:.0f}s)", file=sys.stderr)
    passed = [r["judge_score"] is not None and r["judge_score"] >= settings.pass_score for r in judged]
    agree = sum(p == r["correct"] for p, r in zip(passed, judged))
    n = len(judged)
    n_right = sum(r["correct"] for r in judged)
    pass_right = sum(p for p, r in zip(passed, judged) if r["correct"])
    pass_wrong = sum(p for p, r in zip(passed, judged) if not r["correct"])
    unparsed = sum(r["judge_score"] is None for r in judged)
    words = [len(r["rationale"].split()) for r in judged]

    def corr(which: bool):
        return length_correlation(
            [r["judge_score"] for r in judged if r["correct"] == which],
            [w for w, r in zip(words, judged) if r["correct"] == which],
        )

    right_first, wrong_first = [], []
    for r in rng.sample([r for r in sample if r["correct"]], min(args.pairs, n_right)):
        changed, other = _wrong_answer(r["rationale"], r["pred"], task.answer_type)
        bad = {**r, "rationale": changed, "pred": other}
        right_first.append(([r, bad], [True, True]))
        wrong_first.append(([bad, r], [True, True]))
    pair_rows = wrong_first
    # both orders on (wrong, right): a tie falls back to the earlier row, the wrong one, so only a real
    # preference picks the right one; one order: each presentation alone (the same, cached, calls)
    both, stats_both = pick_judged(judge, wrong_first, settings)
    one_order = settings.model_copy(update={"debias": "none"})
    one = pick_judged(judge, right_first, one_order)[0] + [
        (1 - k, x) for k, x in pick_judged(judge, wrong_first, one_order)[0]
    ]
    o = stats_both["outcomes"]
    figures = {
        "log": args.log,
        "judge": settings.model,
        "scale": settings.scale,
        "threshold": settings.pass_score,
        "reference": settings.reference,
        "n": n,
        "agreement": agree / n,
        "agreement_ci95": list(wilson_interval(agree, n)),
        "pass_rate_right": pass_right / max(n_right, 1),
        "pass_rate_wrong": pass_wrong / max(n - n_right, 1),
        "unparsable": unparsed,
        "mean_score_right": _mean([r["judge_score"] for r in judged if r["correct"]]),
        "mean_score_wrong": _mean([r["judge_score"] for r in judged if not r["correct"]]),
        "length_corr_right": corr(True),
        "length_corr_wrong": corr(False),
        "pairs": len(pair_rows),
        "first_position_share": o["first_position"] / max(o["orders"], 1),
        "first_position_ci95": list(wilson_interval(o["first_position"], o["orders"])),
        "orders_agree": (o["x"] + o["y"]) / max(len(pair_rows), 1),
        "pick_right_one_order": sum(k == (0, True) for k in one) / max(len(one), 1),
        "pick_right_both_orders": sum(k == (1, True) for k in both) / max(len(both), 1),
        "judge_tokens_in": sum(r["judge_tokens_in"] or 0 for r in judged) + stats_both["tokens_in"],
        "judge_tokens_out": sum(r["judge_tokens_out"] or 0 for r in judged) + stats_both["tokens_out"],
        "seconds": time.time() - t0,
        "example": {"candidate": candidate_text(judged[0])[:300], "judge": judged[0]["judge_reasoning"]},
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    main()
