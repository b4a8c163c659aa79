"""The dev split and the validation settings (no training here: see tests/integration/test_training_validation.py)."""

import pytest

from distill.config import load_recipe
from distill.core.errors import DistillError
from distill.students.trainer import evaluation_interval, improves, planned_steps
from distill.students.validation import dev_problems, split_dev


def _rows(n: int, per_question: int = 1) -> list[dict]:
    return [
        {"id": f"train-{i:03d}#{k}", "question": f"q{i} + 1 =", "gold": str(i + 1), "pred": str(i + 1)}
        for i in range(n)
        for k in range(per_question)
    ]


def test_dev_split_holds_out_whole_questions_deterministically_whatever_the_order():
    rows = _rows(20, per_question=2)
    train, dev = split_dev(rows, 5, seed=3)
    assert len({r["question"] for r in dev}) == 5 and len(dev) == 10
    assert not {r["question"] for r in train} & {r["question"] for r in dev}
    assert len(train) + len(dev) == len(rows)
    again_train, again_dev = split_dev(list(reversed(rows)), 5, seed=3)
    assert sorted(r["id"] for r in again_dev) == sorted(r["id"] for r in dev)
    other = {r["question"] for r in split_dev(rows, 5, seed=4)[1]}
    assert other != {r["question"] for r in dev}  # another seed, another split


def test_dev_split_never_takes_more_than_half_the_questions():
    train, dev = split_dev(_rows(6), 100)
    assert (len(train), len(dev)) == (3, 3)
    assert split_dev(_rows(1), 4) == (_rows(1), [])


def test_dev_problems_one_per_question_scored_against_gold_or_the_kept_answer():
    rows = _rows(3, per_question=2) + [{"id": "syn-1", "question": "new?", "gold": None, "pred": "7"}]
    problems = dev_problems(rows)
    assert [(p["question"], p["gold"]) for p in problems] == [
        ("q0 + 1 =", "1"),
        ("q1 + 1 =", "2"),
        ("q2 + 1 =", "3"),
        ("new?", "7"),
    ]


def test_evaluation_interval_and_planned_steps():
    assert evaluation_interval(0, 40) == 20 and evaluation_interval(0, 1000) == 50 and evaluation_interval(7, 40) == 7
    auto = load_recipe(None, ["student.epochs=auto", "student.validation={max_epochs: 3}", "student.batch_size=8"])
    assert planned_steps(100, auto.student) == (39, 13)
    fixed = load_recipe(None, ["student.epochs=1.5", "student.batch_size=8"])
    assert planned_steps(100, fixed.student) == (20, 13)


def test_improvement_is_accuracy_first_then_loss():
    a = {"dev_accuracy": 0.5, "dev_loss": 1.0}
    assert improves(a, None, "accuracy")
    assert improves({"dev_accuracy": 0.5, "dev_loss": 0.9}, a, "accuracy")  # same accuracy, lower loss
    assert not improves({"dev_accuracy": 0.4, "dev_loss": 0.1}, a, "accuracy")
    assert improves({"dev_accuracy": 0.4, "dev_loss": 0.1}, a, "loss")
    assert not improves(a, a, "accuracy") and not improves(a, a, "loss")


def test_epochs_auto_brings_validation_and_bad_settings_are_one_line_errors():
    r = load_recipe(None, ["student.epochs=auto"])
    assert r.student.validation is not None and r.student.validation.patience == 3
    assert load_recipe(None).student.epochs == "auto"  # the default: training sized by the dev split
    assert load_recipe(None, ["student.epochs=2"]).student.validation is None  # a fixed budget: off unless asked
    with pytest.raises(DistillError, match=r"^recipe key 'student.epochs': epochs must be a positive number or auto"):
        load_recipe(None, ["student.epochs=sometimes"])
    with pytest.raises(
        DistillError,
        match=r"unknown recipe key 'student.validation.dev_sz' — did you mean 'student.validation.dev_size'",
    ):
        load_recipe(None, ["student.validation={dev_sz: 3}"])
    with pytest.raises(DistillError, match=r"'student.validation.patience'.*greater than or equal to 1"):
        load_recipe(None, ["student.validation={patience: 0}"])


def test_lr_auto_brings_validation_and_its_candidates_are_checked():
    from distill.students.trainer import best_learning_rate

    r = load_recipe(None, ["student.lr=auto"])
    assert r.student.validation is not None and r.student.lr_sweep.candidates == [5e-5, 1e-4, 2e-4, 4e-4]
    assert load_recipe(None, ["student.lr=3e-4"]).student.lr == 3e-4
    with pytest.raises(DistillError, match=r"^recipe key 'student.lr': lr must be a number between 0 and 1, or auto"):
        load_recipe(None, ["student.lr=2"])
    with pytest.raises(DistillError, match=r"'student.lr_sweep.candidates'.*between 0 and 1"):
        load_recipe(None, ["student.lr_sweep={candidates: [0.1, 3]}"])
    sweep = [{"lr": 1e-4, "dev_loss": 0.9}, {"lr": 2e-4, "dev_loss": 0.8}, {"lr": 4e-4, "dev_loss": 0.8}]
    assert best_learning_rate(sweep) == 2e-4  # lowest loss; the smaller rate on a tie
