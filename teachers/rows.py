"""Teacher output rows: their schema, the filters that pick training rows, and readers of a dataset.

Every row the generate stage writes has ``ROW_SCHEMA``; a failed or unparsable row is kept with its
reason (``error``, ``parse_error``), never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from distill.core.errors import DistillError

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("gold", pa.string()),
        ("prompt", pa.string()),
        ("rationale", pa.string()),
        ("answer_raw", pa.string()),
        ("pred", pa.string()),
        ("confidence", pa.float64()),
        ("correct", pa.bool_()),
        ("parse_error", pa.string()),
        ("finish_reason", pa.string()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("cached", pa.bool_()),
        ("teacher", pa.string()),
        ("error", pa.string()),
        ("alternatives", pa.list_(pa.string())),
        # Logit KD (teacher.topk_logprobs > 0): rationale token ids, top-k ids and log-probs per token.
        ("teacher_token_ids", pa.list_(pa.int32())),
        ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        # Provenance of the problem: its source (dataset id, split or file) and row index there, and the
        # source columns task.keep_columns carries along (a JSON object, null when none are kept).
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("extra", pa.string()),
    ]
)


# A judged teacher's rows (teacher.judge) carry the judge's verdict too; a recipe without a judge keeps
# ROW_SCHEMA, so its shards and datasets stay byte for byte what they were.
JUDGE_COLUMNS = [
    ("judge_score", pa.float64()),  # 1-7, or 1 / 0 for PASS / FAIL; null: not judged (judge_error says why)
    ("judge_reasoning", pa.string()),  # the judge's whole output
    ("judge_error", pa.string()),
    ("judge_tokens_in", pa.int64()),  # the judge's tokens, apart from the teacher's
    ("judge_tokens_out", pa.int64()),
    ("judge_cached", pa.bool_()),
]
JUDGED_SCHEMA = pa.schema([*ROW_SCHEMA, *(pa.field(n, t) for n, t in JUDGE_COLUMNS)])


def row_schema(judged: bool) -> pa.Schema:
    """The schema of generated rows: ``JUDGED_SCHEMA`` when a judge scores them, else ``ROW_SCHEMA``."""
    return JUDGED_SCHEMA if judged else ROW_SCHEMA


# The teacher's own tokens and top-k belong to the path the worker kept first; a row holding another
# path's text carries none (logit KD skips it rather than pairing text with the wrong tokens).
NO_TEACHER_TOKENS = {"teacher_token_ids": None, "teacher_topk_ids": None, "teacher_topk_logprobs": None}


def order_rationales(row: dict, choice: str) -> dict:
    """``row`` with its distinct correct rationales (``rationale`` + ``alternatives``) reordered:
    ``shortest`` by word count, ``mixed`` alternating shortest and longest; ties keep sample order."""
    paths = [row["rationale"], *(row.get("alternatives") or [])]
    by_length = sorted(range(len(paths)), key=lambda i: (len(paths[i].split()), i))
    if choice == "mixed":
        order, lo, hi = [], 0, len(by_length) - 1
        while lo <= hi:
            order.append(by_length[lo])
            if lo != hi:
                order.append(by_length[hi])
            lo, hi = lo + 1, hi - 1
    else:
        order = by_length
    out = {**row, "rationale": paths[order[0]], "alternatives": [paths[i] for i in order[1:]]}
    return out if order[0] == 0 else {**out, **NO_TEACHER_TOKENS}


def select_training_rows(rows, cfg):
    """Apply the recipe's filters to the train rows; returns (kept rows, counts dropped per filter).

    In order: failed calls, keep-correct (gold, or the vote when there is none) or keep-judged (a judge
    score at least ``judge.pass_score``: ``unjudged`` rows have none, ``below_threshold`` less), minimum agreement,
    the rationale choice (``order_rationales``), rationale length bounds; then up to
    ``rationales_per_question`` distinct rationales per question become separate training rows
    (ids ``<id>#k``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    dropped = {}

    def apply(name, mask):
        nonlocal rows
        before = rows.num_rows
        rows = rows.filter(mask)
        dropped[name] = before - rows.num_rows

    apply("failed", pc.is_null(rows["error"]))
    if cfg.keep == "correct":
        apply("incorrect", pc.fill_null(rows["correct"], False))
    if cfg.keep == "judged":
        apply("unjudged", pc.is_valid(rows["judge_score"]))
        apply("below_threshold", pc.greater_equal(rows["judge_score"], cfg.judge.pass_score))
    if cfg.min_confidence > 0:
        apply("low_agreement", pc.greater_equal(pc.fill_null(rows["confidence"], 0.0), cfg.min_confidence))
    choice = getattr(cfg, "rationale_choice", "first")
    if choice != "first":
        rows = pa.Table.from_pylist([order_rationales(r, choice) for r in rows.to_pylist()], schema=rows.schema)
    if cfg.min_rationale_words or cfg.max_rationale_words:
        words = [len((r or "").split()) for r in rows["rationale"].to_pylist()]
        upper = cfg.max_rationale_words or float("inf")
        apply("length", pa.array([cfg.min_rationale_words <= w <= upper for w in words]))
    if cfg.rationales_per_question > 1:
        out = []
        for r in rows.to_pylist():
            out.append(r)
            for k, alt in enumerate((r.get("alternatives") or [])[: cfg.rationales_per_question - 1], start=1):
                out.append({**r, "id": f"{r['id']}#{k}", "rationale": alt, "alternatives": [], **NO_TEACHER_TOKENS})
        rows = pa.Table.from_pylist(out, schema=rows.schema)
    return rows, dropped


def row_verdicts(rows, cfg) -> list[tuple[str, str | None]]:
    """Per row (a table or dicts), what became of it and why: ``(verdict, reason)``.

    Train rows follow ``select_training_rows`` rule by rule, in its order, so a page can say why a
    row was dropped: ``failed`` (the teacher call failed: its error), ``unparsable`` (no answer: the
    parse error) or ``wrong`` under keep-correct, ``filtered`` (low agreement, or rationale length
    after the rationale choice), else ``kept`` (the reason counts the training rows it expands to).
    Other rows are held out: ``failed``, ``eval-correct`` or ``eval-wrong``. Tests check the kept set
    against ``select_training_rows``; change both together.
    """
    rows = rows.to_pylist() if hasattr(rows, "to_pylist") else list(rows)
    choice = getattr(cfg, "rationale_choice", "first")
    upper = cfg.max_rationale_words or float("inf")
    out: list[tuple[str, str | None]] = []
    for r in rows:
        correct = bool(r.get("correct"))
        miss = (
            f"no answer: {r.get('parse_error') or 'no parse error recorded'}"
            if r.get("pred") is None
            else f"pred {r['pred']} ≠ gold {r.get('gold')}"
        )
        if r.get("error") is not None:
            out.append(("failed", r["error"]))
        elif r.get("split") != "train":
            out.append(("eval-correct", None) if correct else ("eval-wrong", miss))
        elif cfg.keep == "correct" and not correct:
            out.append(("unparsable" if r.get("pred") is None else "wrong", miss))
        elif cfg.keep == "judged" and r.get("judge_score") is None:
            why = r.get("judge_error") or (miss if r.get("pred") is None else "not judged")
            out.append(("unparsable" if r.get("pred") is None else "filtered", f"no judge score: {why}"))
        elif cfg.keep == "judged" and r["judge_score"] < cfg.judge.pass_score:
            out.append(("filtered", f"judged {r['judge_score']:g} < {cfg.judge.pass_score:g}"))
        elif cfg.min_confidence > 0 and (r.get("confidence") or 0.0) < cfg.min_confidence:
            out.append(("filtered", f"low agreement: {r.get('confidence') or 0.0:.2f} < {cfg.min_confidence:g}"))
        else:
            chosen = order_rationales(r, choice) if choice != "first" else r
            words = len((chosen["rationale"] or "").split())
            if (cfg.min_rationale_words or cfg.max_rationale_words) and not cfg.min_rationale_words <= words <= upper:
                bound = f"< min {cfg.min_rationale_words}" if words < cfg.min_rationale_words else f"> max {upper}"
                out.append(("filtered", f"length: {words} words {bound}"))
            else:
                extra = len((chosen.get("alternatives") or [])[: cfg.rationales_per_question - 1])
                notes = [f"{1 + extra} training rows"] if extra else []
                notes += [] if correct else [f"{miss} (keep={cfg.keep})"]
                out.append(("kept", "; ".join(notes) or None))
    return out


def solved_ids(rows, cfg) -> set[str]:
    """Ids of the rows (a table) that ``cfg``'s filters keep (``select_training_rows``, on any split):
    the problems this teacher solved, which a later ``when: unsolved`` teacher is not asked."""
    kept, _ = select_training_rows(rows, cfg)
    return set(kept["id"].to_pylist()) & set(rows["id"].to_pylist())  # not the ``<id>#k`` extra rows


def pick_correct(rows: list[dict | None], kept: list[bool]) -> tuple[int, bool]:
    """``teachers_pick=correct``: (the first teacher in list order whose row its filters keep, True);
    when none is kept, (0, False): the first teacher's row stands for the question, kept by nobody."""
    k = next((i for i, x in enumerate(kept) if x), None)
    return (k, True) if k is not None else (0, False)


def pick_vote(rows: list[dict | None], kept: list[bool]) -> tuple[int, bool]:
    """``teachers_pick=vote``: the answer most teachers gave (ties: the one an earlier teacher gave),
    then (the first teacher reaching it whose row is kept, True), else (the first reaching it, False);
    with no answer at all, as ``pick_correct``."""
    from distill.teachers.methods import voted

    answered = [(i, r["pred"]) for i, r in enumerate(rows) if r and r.get("error") is None and r.get("pred")]
    vote = voted([pred for _, pred in answered])
    if vote is None:
        return pick_correct(rows, kept)
    reach = [i for i, pred in answered if pred == vote]
    k = next((i for i in reach if kept[i]), None)
    return (k, True) if k is not None else (reach[0], False)


# teachers_pick → picker(rows, kept) -> (teacher index, kept): rows[i] is teacher i's row of one question
# (None when it was not asked), kept[i] whether its filters keep it. A judged pick asks a judge model about
# every question's rows at once: combine_teachers takes it as ``judged`` (``distill.teachers.judge.pick_judged``).
PICKS = {"correct": pick_correct, "vote": pick_vote}


def combine_teachers(tables: list, cfgs: list, pick: str, judged=None) -> dict:
    """Several teachers' rows (``latest_rows`` tables, the first teacher's holding every problem) as
    one row per problem and the training rows, the question by question choice ``PICKS[pick]`` makes.

    Returns ``rows`` (the chosen, or standing-in, row per problem, by id), ``train`` (the chosen
    teachers' kept train rows, ``select_training_rows`` per teacher with its own filters), ``filtered``
    (rows each filter dropped, summed over teachers; ``not_picked``: kept rows another teacher's row
    replaced), and per teacher ``solved`` (problems its filters keep), ``picked`` (questions whose row
    is its own, kept) and ``train_rows`` (its rows in ``train``). One teacher is a list of one: its
    table and kept rows come back as they are. ``pick="judged"``: ``judged(questions)`` gets every
    question's (rows, kept) and returns the (teacher index, kept) of each."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept_train, filtered, solved = [], {}, []
    for table, cfg in zip(tables, cfgs):
        is_train = pc.equal(table["split"], "train")
        kept, dropped = select_training_rows(table.filter(is_train), cfg)
        kept_train.append(kept)
        for name, n in dropped.items():
            filtered[name] = filtered.get(name, 0) + n
        solved.append(set(kept["id"].to_pylist()) | solved_ids(table.filter(pc.invert(is_train)), cfg))
    ids = tables[0]["id"].to_pylist()
    by_teacher = [{r["id"]: r for r in t.to_pylist()} for t in tables] if len(tables) > 1 else [{}]
    asks = [([m.get(i) for m in by_teacher], [i in s for s in solved]) for i in ids]
    picks = judged(asks) if pick == "judged" else [PICKS[pick](*a) for a in asks]
    choice = dict(zip(ids, picks))

    def question(i: str) -> str:  # the problem a training row's id (``<id>`` or ``<id>#k``) belongs to
        return i if i in choice else i.rsplit("#", 1)[0]

    def chosen_by(k: int, table):  # the rows of ``table`` (teacher k's) whose question chose teacher k
        mine = [choice[question(i)] == (k, True) for i in table["id"].to_pylist()]
        return table.filter(pa.array(mine, pa.bool_()))

    parts = [chosen_by(k, t) for k, t in enumerate(kept_train)]
    if len(tables) == 1:
        rows, train = tables[0], parts[0]
    else:
        schema = _widest([t.schema for t in tables])
        rows = pa.Table.from_pylist([by_teacher[choice[i][0]][i] for i in ids], schema=schema)
        parts = [_widen(p, schema) for p in parts]
        train = pa.concat_tables(parts)
        place = {i: n for n, i in enumerate(ids)}
        keys = [(place[question(i)], 0 if i in place else int(i.rsplit("#", 1)[1])) for i in train["id"].to_pylist()]
        train = train.take(sorted(range(len(keys)), key=keys.__getitem__))  # by question, its ``#k`` rows after it
        filtered["not_picked"] = sum(t.num_rows for t in kept_train) - train.num_rows
    picked = [sum(1 for c in choice.values() if c == (k, True)) for k in range(len(tables))]
    return {
        "rows": rows,
        "train": train,
        "filtered": filtered,
        "solved": [len(s) for s in solved],
        "picked": picked,
        "train_rows": [p.num_rows for p in parts],
    }


def _widest(schemas: list) -> pa.Schema:
    """The judged schema when any teacher's rows are judged, else the plain one."""
    return JUDGED_SCHEMA if any("judge_score" in s.names for s in schemas) else ROW_SCHEMA


def _widen(table, schema: pa.Schema):
    """``table`` with ``schema``'s columns it lacks added as nulls (a teacher without a judge among judged ones)."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names)


def latest_rows(tables: list, schema: pa.Schema = ROW_SCHEMA):
    """One row per id, the last committed one winning (a failed row is replaced by its retry), by id."""
    import pyarrow as pa

    latest: dict[str, dict] = {}
    for t in tables:  # shards in commit order
        for row in t.to_pylist():
            latest[row["id"]] = row
    return pa.Table.from_pylist([latest[k] for k in sorted(latest)], schema=schema)


def read_rows(path: Path, columns: Iterable[str] = ("question", "gold"), fix_if_empty: str | None = None) -> list[dict]:
    """Rows of a dataset Parquet file that must have ``columns``; one clear error when it is missing,
    lacks a column or (with ``fix_if_empty``) holds no rows."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path} does not exist", "run `distill generate` first")
    table = pq.read_table(path)
    missing = set(columns) - set(table.column_names)
    if missing:
        raise DistillError(f"{path} lacks columns {sorted(missing)}", "regenerate it with `distill generate`")
    if fix_if_empty and table.num_rows == 0:
        raise DistillError(f"{path} has no rows", fix_if_empty)
    return table.to_pylist()


def read_eval_problems(gen_dir: Path) -> list[dict]:
    """The held-out problems of a generate folder, with the teacher's recorded answers."""
    return read_rows(Path(gen_dir) / "dataset" / "eval.parquet", ("id", "question", "gold"))
