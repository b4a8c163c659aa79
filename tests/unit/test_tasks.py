import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill.config import TaskConfig
from distill.core.answers import Task, extract_number, normalize_number
from distill.core.problems import load_problems


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("So the total is \\(\\boxed{1,234}\\).", "1234"),
        ("First 3+4=7, then 7*2=14. Therefore, the answer (arabic numerals) is 14.", "14"),
        ("The answer is: **-5**", "-5"),
        ("The final answer to the problem is $12.50.", "12.5"),
        ("we get 3 then 9 and finally 27", "27"),
    ],
)
def test_extract_number_recorded_styles(text, expected):
    assert extract_number(text).answer == expected


def test_extract_number_marks_explicit_and_failure():
    assert extract_number("Therefore, the answer is 5.").explicit
    assert not extract_number("maybe 5").explicit
    miss = extract_number("no digits here")
    assert miss.answer is None and miss.reason


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_integer_answer_roundtrips_through_answer_sentence(n):
    task = Task("number")
    assert task.extract(task.answer_sentence(str(n))).answer == str(n)
    assert task.is_correct(normalize_number(f"{n:,}"), str(n))


@given(st.text(max_size=200))
def test_extract_never_raises(text):
    r = extract_number(text)
    assert r.answer is None or normalize_number(r.answer) == r.answer


def test_text_task_compares_normalised():
    task = Task("text")
    assert task.is_correct(task.extract("So the answer is Yes.").answer, "yes")


def test_problems_are_disjoint_and_deterministic():
    cfg = TaskConfig(
        name="chain_sum", params={"min_terms": 2, "max_terms": 2, "max_digits": 1}, train_size=30, eval_size=10
    )
    train, evals = load_problems(cfg)
    assert len(train) == 30 and len(evals) == 10
    assert not {p["question"] for p in train} & {p["question"] for p in evals}
    assert len({p["question"] for p in train}) == 30
    assert load_problems(cfg) == (train, evals)


@pytest.mark.parametrize(
    "text,expected",
    [
        # recorded InstructGPT-175B zero-shot-CoT outputs (coin flip), stage-2 style
        ("Therefore, the answer (Yes or No) is No.", "no"),
        ("The coin was flipped twice, so it is still heads up. So the answer is yes", "yes"),
        ("True. It is heads up.", "yes"),
    ],
)
def test_yes_no_extraction(text, expected):
    assert Task("yes_no").extract(text).answer == expected


@pytest.mark.parametrize(
    "text,expected",
    [("The answer is (C).", "C"), ("so \\boxed{B}", "B"), ("Between (A) and (D), pick (D)", "D"), ("answer is E", "E")],
)
def test_choice_extraction(text, expected):
    assert Task("choice").extract(text).answer == expected


@given(st.sampled_from(["yes", "no", "True", "FALSE"]), st.text(max_size=80))
def test_yes_no_roundtrip_after_any_rationale(gold, rationale):
    task = Task("yes_no")
    pred = task.extract(f"{rationale}\n{task.answer_sentence(task.normalize_gold(gold))}").answer
    assert task.is_correct(pred, gold)


@given(st.sampled_from("ABCDEFGHIJ"), st.text(max_size=80))
def test_choice_roundtrip_after_any_rationale(letter, rationale):
    task = Task("choice")
    assert task.is_correct(task.extract(f"{rationale}\n{task.answer_sentence(letter)}").answer, f"({letter})")


@given(st.text(max_size=200), st.sampled_from(["number", "yes_no", "choice", "text"]))
def test_no_extractor_raises(text, answer_type):
    r = Task(answer_type).extract(text)
    assert (r.answer is None) == (r.reason is not None)
