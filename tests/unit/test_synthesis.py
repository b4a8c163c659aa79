"""Synthesis dedup and the training-row filters, on hand-made cases."""

import pyarrow as pa

from distill.config import TeacherConfig
from distill.teachers.rows import ROW_SCHEMA, select_training_rows
from distill.teachers.synthesis import NearDuplicateIndex, normalize_question, parse_problem, synthesize


def test_exact_and_near_duplicates():
    idx = NearDuplicateIndex(threshold=0.7)
    idx.add("Tom has 3 apples and buys 5 more. How many apples does Tom have now?")
    assert idx.find("tom has 3 apples, and buys 5 more -- how many apples does tom have now") == "exact"
    # the last two words changed: 12 of 15 distinct word 3-grams shared, Jaccard 0.8
    near = "Tom has 3 apples and buys 5 more. How many apples does Tom have in total?"
    assert idx.find(near) == "near"
    assert idx.find("A train leaves at 9 am and travels 60 km per hour. When does it arrive?") is None
    assert normalize_question("  Hello,   World! ") == "hello world"


def test_parse_problem_drops_labels_and_solutions():
    assert parse_problem("Problem 4: Ann reads 12 pages a day. How many in 5 days?\nSolution: 60") == (
        "Ann reads 12 pages a day. How many in 5 days?"
    )
    assert parse_problem("ok") is None


class EchoTeacher:
    """A real (if trivial) backend for the synthesis loop: it writes back one of the shown seeds,
    or a fresh problem, depending on the sample index — so dedup decisions are known in advance."""

    model_id = "echo"

    def chat_prompt(self, messages, assistant_prefix=""):
        return messages[-1]["content"] + assistant_prefix

    def generate(self, requests):
        from distill.teachers.backends.base import Completion

        out = []
        for r in requests:
            first_seed = r.prompt.split("Problem 1: ", 1)[1].split("\n", 1)[0]
            texts = [
                first_seed,  # exact copy of a seed
                first_seed.replace("How many", "how MANY"),  # exact after normalisation
                "What is 2 + 2 on the eval split, asked again?",  # too close to the eval split
                f"A shop sells {r.sample} pens at 3 dollars each. How much do they cost together?",
                "no",  # unparsable
            ]
            out.append(Completion(texts[r.sample % len(texts)], 10, 10, "stop"))
        return out


def test_synthesize_drops_duplicates_and_eval_overlap():
    seeds = ["Sam has 4 cats and 2 dogs. How many pets does Sam have?", "Lee runs 5 km a day. How many in 7 days?"]
    avoid = ["What is 2 + 2 on the eval split, asked again today?"]
    got, stats = synthesize(EchoTeacher(), seeds, 3, avoid, seed=1)
    assert got == [f"A shop sells {s} pens at 3 dollars each. How much do they cost together?" for s in (3, 8, 13)]
    assert stats["exact_duplicates"] >= 2 and stats["eval_overlap"] >= 1 and stats["unparsable"] >= 1
    assert synthesize(EchoTeacher(), seeds, 3, avoid, seed=1)[0] == got  # deterministic


def _row(i, **kw):
    base = dict(
        id=f"train-{i}",
        split="train",
        question="q",
        gold="1",
        rationale="a b c d",
        pred="1",
        confidence=1.0,
        correct=True,
        error=None,
        alternatives=[],
    )
    return {**base, **kw}


def test_training_row_filters_in_order():
    rows = pa.Table.from_pylist(
        [
            _row(0, alternatives=["other path", "third path"]),
            _row(1, error="HTTP 500", pred=None, correct=False),
            _row(2, pred="2", correct=False),
            _row(3, confidence=0.4),
            _row(4, rationale="one"),
            _row(5, rationale=" ".join(["w"] * 50)),
        ],
        schema=ROW_SCHEMA,
    )
    cfg = TeacherConfig(min_confidence=0.6, min_rationale_words=2, max_rationale_words=20, rationales_per_question=2)
    kept, dropped = select_training_rows(rows, cfg)
    assert dropped == {"failed": 1, "incorrect": 1, "low_agreement": 1, "length": 2}
    assert kept["id"].to_pylist() == ["train-0", "train-0#1"]
    assert kept["rationale"].to_pylist() == ["a b c d", "other path"]
