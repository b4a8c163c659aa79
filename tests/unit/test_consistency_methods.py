"""Complexity-based consistency (Fu et al. 2023): the vote among the chains with the most steps, and the
most complex demonstrations of a pool."""

import pytest

from distill.config import Demo, TeacherConfig
from distill.core.answers import Task
from distill.teachers.methods import _rows, demonstrations, reasoning_steps, voters


def _path(pred, steps, i=0):
    text = "\n".join(f"step {k} of path {i}" for k in range(steps))
    return {
        "prompt": "p",
        "rationale": text,
        "answer_raw": "",
        "pred": pred,
        "finish_reason": "stop",
        "tokens_in": 1,
        "tokens_out": 1,
        "cached": False,
        "error": None,
    }


# Three short chains agree on 5; the two longest say 7 (a shortcut answer beaten by careful chains).
PATHS = [_path("5", 1, 0), _path("7", 4, 1), _path("5", 2, 2), _path("7", 5, 3), _path("5", 1, 4), _path(None, 9, 5)]
PROBLEM = {"id": "train-000000", "split": "train", "question": "q", "gold": "7"}


def test_steps_are_the_non_empty_lines():
    assert reasoning_steps("a\n\nb\n  \nc") == 3 and reasoning_steps("") == 0


def test_the_complexity_vote_counts_only_the_most_complex_answered_chains():
    assert [x["rationale"].count("\n") + 1 for x in voters(PATHS, "complexity", 2)] == [4, 5]
    assert len(voters(PATHS, "complexity")) == 3  # the top half of five answered chains, rounded up
    assert len(voters(PATHS)) == 5  # majority: every answered chain

    task = Task("number")
    majority = _rows([PROBLEM], [PATHS], task, TeacherConfig(method="self_consistency", samples=6))[0]
    assert (majority["pred"], majority["correct"], majority["confidence"]) == ("5", False, 3 / 6)
    cfg = TeacherConfig(method="self_consistency", samples=6, vote="complexity", complex_k=2)
    complex_ = _rows([PROBLEM], [PATHS], task, cfg)[0]
    assert (complex_["pred"], complex_["correct"], complex_["confidence"]) == ("7", True, 1.0)
    assert complex_["rationale"] == PATHS[1]["rationale"]  # the first voter that reached the answer


@pytest.mark.parametrize("k,expect", [(1, ["b"]), (2, ["b", "c"]), (5, ["a", "b", "c"])])
def test_complex_demonstrations_are_the_pools_longest_in_pool_order(k, expect):
    pool = [
        Demo(question="a", rationale="one step", answer="1"),
        Demo(question="b", rationale="one\ntwo\nthree", answer="3"),
        Demo(question="c", rationale="one\ntwo", answer="2"),
    ]
    cfg = TeacherConfig(method="few_shot_cot", demos=pool, demo_selection="complex", num_demos=k)
    assert [d.question for d in demonstrations(cfg)] == expect
    assert [d.question for d in demonstrations(cfg.model_copy(update={"demo_selection": "all"}))] == ["a", "b", "c"]
    assert demonstrations(cfg.model_copy(update={"method": "zero_shot_cot"})) == []
