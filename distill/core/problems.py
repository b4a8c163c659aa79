"""Problem sources: a task's train and eval problems from a generator, a file or a dataset.

A problem is a dict ``{"id", "split", "question", "gold"}`` (file and dataset problems also carry
their provenance and conversation context: ``distill.core.inputs``). Train and eval problems come from
disjoint generator seeds, disjoint splits or disjoint rows, and are de-duplicated against each other,
so a student never trains on its test questions.
"""

from __future__ import annotations

import random

from distill.core.errors import DistillError
from distill.core.inputs import RowMapper, Rows, file_rows, open_splits, pick_splits


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
    """Every problem of a task file (``{"question", "gold"}``, in file order): JSONL, JSON
    (``{"examples": [...]}``, MultiArith ``sQuestion``/``lSolutions`` rows), CSV/Parquet, or a
    zero-shot-CoT log. A file that cannot be read or parsed, or a row that is not an object or lacks a
    field, is one ``DistillError`` naming the file and the line (JSONL) or row."""
    rows, mapper = file_rows(path), RowMapper(None)
    return [{k: p[k] for k in ("question", "gold")} for p in (mapper.problem(rows, i) for i in range(len(rows)))]


def _mapper(cfg) -> RowMapper:
    return RowMapper(cfg.columns, cfg.keep_columns, structured_gold=cfg.answer_type in ("json", "code"))


def load_seeds(cfg) -> list[dict]:
    """Seed problems of a synthetic task: the file's rows before the evaluation split."""
    return read_problem_file(cfg.name)[: -cfg.eval_size]


def _order(n: int, cfg, salt: int = 0) -> list[int]:
    """Row indices in the order problems are drawn: file order, or seeded (``task.split: shuffle``;
    the permutation ``random.shuffle`` gives a list of ``n`` rows, so the draw matches a file's)."""
    order = list(range(n))
    if cfg.split == "shuffle":
        random.Random(cfg.seed + salt).shuffle(order)
    return order


def _layout(cfg) -> tuple[Rows, list[int], Rows, list[int]]:
    """(train rows, their draw order, eval rows, the eval indices) of a file or dataset task: the eval
    split's first ``eval_size`` (in draw order) when the source has one, else the last ``eval_size``
    of the train split's draw order, held out (as published splits do)."""
    if cfg.source == "hf":
        train, held = pick_splits(cfg, open_splits(cfg))
    else:
        train, held = file_rows(cfg.name), None
    if held is not None:
        return train, _order(len(train), cfg), held, _order(len(held), cfg, 1)[: cfg.eval_size]
    if len(train) <= cfg.eval_size:
        raise DistillError(
            f"{cfg.name} has {len(train)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
        )
    order = _order(len(train), cfg)
    return train, order[: -cfg.eval_size], train, order[-cfg.eval_size :]


def _draw(rows: Rows, order, mapper: RowMapper, exclude: set[str], size: int, split: str) -> list[dict]:
    """Up to ``size`` problems of ``rows`` in ``order`` (mapped lazily: a large source is read only as
    far as needed), skipping questions in ``exclude`` and repeats; ``exclude`` grows with them."""
    out = []
    for i in order:
        if len(out) == size:
            break
        p = mapper.problem(rows, i)
        if p["question"] in exclude:
            continue
        exclude.add(p["question"])
        out.append({"id": f"{split}-{len(out):06d}", "split": split, **p})
    return out


def gate_problems(cfg, size: int, exclude: set[str]) -> list[dict]:
    """Up to ``size`` problems of the task whose questions are not in ``exclude`` (the training and
    evaluation questions): new draws for a generator task, the rows no split took for a file or dataset
    task (its eval split's first), none for a synthetic task, whose only gold answers are its seeds."""
    if cfg.source == "reasoning_gym":
        pool = reasoning_gym_problems(cfg.name, cfg.params, size * 2 + 16, cfg.seed + 2_000_003)
        out, seen = [], set(exclude)
        for r in pool:
            if r["question"] not in seen:
                seen.add(r["question"])
                out.append({"id": f"gate-{len(out):06d}", "split": "gate", **r})
        return out[:size]
    if cfg.source == "synthetic":
        return []
    train, _, held, _ = _layout(cfg)
    mapper, seen = _mapper(cfg), set(exclude)
    out = _draw(held, range(len(held)), mapper, seen, size, "gate") if held is not train else []
    more = _draw(train, range(len(train)), mapper, seen, size - len(out), "gate")
    return out + [{**p, "id": f"gate-{len(out) + k:06d}"} for k, p in enumerate(more)]


def load_problems(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems for a ``TaskConfig``; disjoint by question text. A synthetic task has
    no train problems until the teacher writes them (``teachers.synthesis``)."""
    if cfg.source == "synthetic":  # the seed rows only; generate() has the teacher write train problems
        rows = read_problem_file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        return [], [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(rows[-cfg.eval_size :])]
    if cfg.source == "reasoning_gym":
        evals = reasoning_gym_problems(cfg.name, cfg.params, cfg.eval_size, cfg.seed + 1_000_003)
        # Over-draw train problems so de-duplication against eval still leaves train_size of them.
        pool = reasoning_gym_problems(cfg.name, cfg.params, cfg.train_size * 2 + 16, cfg.seed)
        if not evals or not pool:
            raise DistillError("the task produced no problems", "check task.name / task.params")
        seen = {r["question"] for r in evals}
        train = []
        for r in pool:
            if r["question"] not in seen and len(train) < cfg.train_size:
                seen.add(r["question"])
                train.append(r)
        return (
            [{"id": f"train-{i:06d}", "split": "train", **r} for i, r in enumerate(train)],
            [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(evals)],
        )
    train_rows, order, eval_rows, eval_idx = _layout(cfg)
    mapper = _mapper(cfg)
    evals = [{"id": f"eval-{k:06d}", "split": "eval", **mapper.problem(eval_rows, i)} for k, i in enumerate(eval_idx)]
    if not evals:
        raise DistillError(f"the eval split of {cfg.name} is empty", "check task.eval_split")
    train = _draw(train_rows, order, mapper, {p["question"] for p in evals}, cfg.train_size, "train")
    if not train:
        raise DistillError(f"{cfg.name} gave no train problems that are not in the eval split", "check the task")
    return train, evals
