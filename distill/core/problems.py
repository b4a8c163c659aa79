"""Problem sources: a task's train and eval problems from a generator or a file.

A problem is a dict ``{"id", "split", "question", "gold"}``. Train and eval problems come from
disjoint generator seeds (or disjoint file rows) and are de-duplicated against each other, so a
student never trains on its test questions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distill.core.errors import DistillError

_BLOCK_SPLIT = re.compile(r"\n\*{20,}\n")


def normalize_question(q: str) -> str:
    """A question with its whitespace collapsed: how recorded outputs are matched to problems."""
    return " ".join(q.split())


def parse_kojima_log(path: Path) -> list[dict]:
    """Records from a zero-shot-CoT log: question, rationale, answer_raw, pred, gold."""
    records = []
    for block in _BLOCK_SPLIT.split(path.read_text(encoding="utf-8")):
        q = re.search(r"^Q: (.*?)\nA: ", block, re.S | re.M)
        pred = re.search(r"^pred_mode : (.*)$", block, re.M)
        gold = re.search(r"^GT : (.*)$", block, re.M)
        if not (q and pred and gold):
            continue
        answer_text = block[q.end() : block.index("pred_before")] if "pred_before" in block else block[q.end() :]
        cut = answer_text.rfind("Therefore, the answer")
        rationale = answer_text[:cut] if cut >= 0 else answer_text
        rationale = rationale.strip().removeprefix("Let's think step by step.").strip()
        records.append(
            {
                "question": q.group(1).strip(),
                "rationale": rationale,
                "answer_raw": answer_text[cut:].strip() if cut >= 0 else "",
                "answer": pred.group(1).strip(),
                "gold": gold.group(1).strip(),
            }
        )
    return records


def reasoning_gym_problems(name: str, params: dict, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **params)
    except (KeyError, ValueError) as e:
        raise DistillError(f"reasoning_gym dataset {name!r} failed: {e}", "check task.name and task.params") from None
    except TypeError as e:
        raise DistillError(f"reasoning_gym {name!r} rejected task.params: {e}", "fix task.params") from None
    return [{"question": x["question"].strip(), "gold": str(x["answer"])} for x in data]


def read_problem_file(path: str) -> list[dict]:
    """Problems from a file: JSONL (question/answer), JSON ({"examples": [...]} or MultiArith-style
    sQuestion/lSolutions rows), or a zero-shot-CoT log (Q:/GT:)."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"task file {p} does not exist", "set task.name to a .jsonl/.json/.log path")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DistillError(f"task file {p} is not UTF-8 text", "re-encode it as UTF-8") from None
    if p.suffix == ".log":
        return [{"question": r["question"], "gold": r["gold"]} for r in parse_kojima_log(p)]
    if p.suffix == ".json":
        data = json.loads(text)
        rows = data["examples"] if isinstance(data, dict) and "examples" in data else data
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DistillError(f"{p}:{i + 1} is not valid JSON", "one JSON object per line") from None
    out = []
    for i, row in enumerate(rows):
        if "sQuestion" in row and "lSolutions" in row:
            row = {"question": row["sQuestion"], "answer": row["lSolutions"][0]}
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise DistillError(f"{p} row {i + 1} lacks 'question' or 'answer'", "each row needs both fields")
        out.append({"question": str(row["question"]).strip(), "gold": str(row["answer"])})
    return out


def load_seeds(cfg) -> list[dict]:
    """Seed problems of a synthetic task: the file's rows before the evaluation split."""
    return read_problem_file(cfg.name)[: -cfg.eval_size]


def gate_problems(cfg, size: int, exclude: set[str]) -> list[dict]:
    """Up to ``size`` problems of the task whose questions are not in ``exclude`` (the training and
    evaluation questions): new draws for a generator task, the rows no split took for a file task
    (none for a synthetic task, whose only gold answers are its seeds)."""
    if cfg.source == "reasoning_gym":
        pool = reasoning_gym_problems(cfg.name, cfg.params, size * 2 + 16, cfg.seed + 2_000_003)
    elif cfg.source == "file":
        pool = read_problem_file(cfg.name)
    else:
        return []
    out, seen = [], set(exclude)
    for r in pool:
        if r["question"] in seen:
            continue
        seen.add(r["question"])
        out.append({"id": f"gate-{len(out):06d}", "split": "gate", **r})
        if len(out) == size:
            break
    return out


def load_problems(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems for a ``TaskConfig``; disjoint by question text. A synthetic task has
    no train problems until the teacher writes them (``teachers.synthesis``)."""
    if cfg.source == "reasoning_gym":
        evals = reasoning_gym_problems(cfg.name, cfg.params, cfg.eval_size, cfg.seed + 1_000_003)
        # Over-draw train problems so de-duplication against eval still leaves train_size of them.
        pool = reasoning_gym_problems(cfg.name, cfg.params, cfg.train_size * 2 + 16, cfg.seed)
    elif cfg.source == "synthetic":  # the seed rows only; generate() has the teacher write train problems
        rows = read_problem_file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        evals = rows[-cfg.eval_size :]
        return [], [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(evals)]
    else:  # file order: the last eval_size rows are held out (as in the published splits)
        rows = read_problem_file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        evals, pool = rows[-cfg.eval_size :], rows[: -cfg.eval_size]
    if not evals or not pool:
        raise DistillError("the task produced no problems", "check task.name / task.params / the JSONL file")
    eval_questions = {r["question"] for r in evals}
    seen: set[str] = set()
    train = []
    for r in pool:
        if r["question"] in eval_questions or r["question"] in seen:
            continue
        seen.add(r["question"])
        train.append(r)
        if len(train) == cfg.train_size:
            break
    out_train = [{"id": f"train-{i:06d}", "split": "train", **r} for i, r in enumerate(train)]
    out_eval = [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(evals)]
    return out_train, out_eval
