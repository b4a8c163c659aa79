"""Which correct sampled paths train the student: first, shortest, or a mix of short and long."""

import pyarrow as pa
import pytest

from distill.config import TeacherConfig, load_recipe
from distill.teachers.rows import ROW_SCHEMA, order_rationales, select_training_rows

LONG, MID, SHORT = "a " * 30 + "so 9", "a " * 10 + "so 9", "so 9"


def _row(**kw) -> dict:
    base = {
        "id": "train-0",
        "split": "train",
        "question": "q",
        "gold": "9",
        "pred": "9",
        "correct": True,
        "confidence": 1.0,
        "error": None,
        "rationale": MID,
        "alternatives": [LONG, SHORT],
        "teacher_token_ids": [1, 2, 3],
        "teacher_topk_ids": [[1], [2], [3]],
        "teacher_topk_logprobs": [[0.0], [0.0], [0.0]],
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "choice, order",
    [("shortest", [SHORT, MID, LONG]), ("mixed", [SHORT, LONG, MID])],
)
def test_order_rationales(choice, order):
    out = order_rationales(_row(), choice)
    assert [out["rationale"], *out["alternatives"]] == order
    assert out["teacher_token_ids"] is None  # the kept text is not the path the tokens belong to


def test_the_first_path_keeps_its_teacher_tokens_when_it_is_the_shortest():
    out = order_rationales(_row(rationale=SHORT, alternatives=[LONG, MID]), "shortest")
    assert [out["rationale"], *out["alternatives"]] == [SHORT, MID, LONG]
    assert out["teacher_token_ids"] == [1, 2, 3]


@pytest.mark.parametrize(
    "choice, rationales",
    [("first", [MID, LONG]), ("shortest", [SHORT, MID]), ("mixed", [SHORT, LONG])],
)
def test_training_rows_follow_the_choice_and_alternatives_carry_no_teacher_tokens(choice, rationales):
    rows = pa.Table.from_pylist([_row()], schema=ROW_SCHEMA)
    kept, _ = select_training_rows(rows, TeacherConfig(rationale_choice=choice, rationales_per_question=2))
    assert kept["rationale"].to_pylist() == rationales
    assert kept["id"].to_pylist() == ["train-0", "train-0#1"]
    assert kept["teacher_token_ids"].to_pylist()[1] is None


def test_the_choice_is_semantic_but_the_default_keeps_old_hashes():
    from distill.pipeline import stage_hash

    default, first, short = (
        load_recipe(None, o) for o in ([], ["teacher.rationale_choice=first"], ["teacher.rationale_choice=shortest"])
    )
    assert stage_hash(default, "generate") == stage_hash(first, "generate") != stage_hash(short, "generate")
