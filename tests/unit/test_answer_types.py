"""Answer types on real output styles: numbers (GSM8K, MATH, units), choices (MMLU), text (SQuAD),
JSON with a schema, regex and custom checkers; canonical forms, round trips and untrusted input."""

import json
import pickle
import sys
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.config import TaskConfig
from distill.core.answers import (
    Extraction,
    Task,
    canonical_text,
    format_number,
    normalize_number,
    normalize_text,
    question_options,
)
from distill.core.errors import DistillError

GSM8K_SOLUTION = (
    "The factory makes 1,000 widgets a day for 1,234 days... no: it ships 617 boxes of 2.\n"
    "617 * 2 = <<617*2=1234>>1,234 widgets.\n#### 1,234"
)
MMLU = (
    "Which city is the capital of Germany?\n"
    "A. Paris\nB. London\nC. Rome\nD. Berlin\n"
    "Answer with the letter of the correct option."
)
MMLU_INLINE = "Which city is the capital of Germany? (A) Paris (B) London (C) Rome (D) Berlin"


# --- number -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        (GSM8K_SOLUTION, "1234"),
        ("Each costs $400.10, so three cost $1,200.30. The answer is $1,200.30.", "1200.3"),
        ("The answer is €5.", "5"),
        ("They drive 5 km then 7 km, so 12 km in all.", "12"),
        ("The bag weighs 3.5 kg.", "3.5"),
        ("45 of 100 passed, so the answer is 45%.", "45"),
        ("Half of 3/2 is 3/4", "0.75"),
        ("So the probability is $\\frac{3}{4}$.", "0.75"),
        ("The answer is \\dfrac{3}{4}.", "0.75"),
        ("Thus $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("The answer is $\\boxed{-\\frac{1}{3}}$", "-1/3"),
        ("Each gets 2 1/2 pies.", "2.5"),
        ("\\boxed{2\\frac{1}{2}}", "2.5"),
        ("The temperature drops to −7 degrees.", "-7"),
        ("The answer is -12.", "-12"),
        ("Final Answer: The final answer is $1{,}234$. I hope it is correct.", "1234"),
        ("Solving, the answer is x = 7.", "7"),
        ("The answer is 1,234,567 people.", "1234567"),
        ("The range is 5-10", "10"),  # the hyphen of a range is no minus sign
    ],
)
def test_number_real_styles(text, expected):
    assert Task("number").extract(text).answer == expected


def test_number_equal_values_share_one_canonical_form():
    task = Task("number")
    forms = ["0.75", "3/4", "\\frac{3}{4}", "\\dfrac{3}{4}", "\\boxed{\\frac{3}{4}}", "the answer is 0.750"]
    assert {task.extract(f).answer for f in forms} == {"0.75"}
    assert task.extract("so 1/3").answer == "1/3"  # no finite decimal: exact p/q, not 0.333...
    assert task.extract("3 apples").answer == task.extract("The answer is 3.0").answer == "3"


def test_number_explicit_and_fallback():
    task = Task("number")
    assert task.extract("#### 72").explicit and task.extract("\\boxed{72}").explicit
    assert not task.extract("first 3, then 72").explicit
    assert task.extract("first 3, then 72", fallback_last=False) == Extraction(None, "no number in output")
    # \boxed{} holding an expression is no stated number: the fallback reads the last number instead
    assert task.extract("\\boxed{3\\sqrt{2}} or about 4.24").answer == "4.24"


def test_number_gold_forms():
    task = Task("number")
    assert task.normalize_gold(GSM8K_SOLUTION) == "1234"
    assert task.normalize_gold("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert task.normalize_gold("$1,200.50") == "1200.5"
    assert task.normalize_gold("12 km") == "12"
    assert task.normalize_gold("\\frac{1}{2}") == "0.5"
    assert task.normalize_gold(" 5. ") == "5"
    assert task.normalize_gold(task.normalize_gold("2/3")) == "2/3"
    with pytest.raises(DistillError, match="not a number"):
        task.normalize_gold("3 apples and 4 pears")  # which one? refuse to guess
    with pytest.raises(DistillError, match="not a number"):
        task.normalize_gold("none")


def test_number_tolerance_is_relative_to_the_gold():
    assert Task("number").is_correct("0.75", "3/4")
    assert not Task("number").is_correct("0.7500001", "0.75")
    loose = Task("number", tolerance=0.01)
    assert loose.is_correct("100.9", "100") and not loose.is_correct("101.1", "100")
    assert loose.is_correct("0.333", "1/3")
    assert not Task("number", tolerance=1e-6).is_correct("0.333", "1/3")
    assert not loose.is_correct(None, "100") and not loose.is_correct("12 apples", "100")


def test_number_rejects_absurd_tokens():
    assert Task("number").extract("1/0").answer is None
    assert normalize_number("1" * 5000) is None  # past Python's int-parsing limit: noise, not a number
    assert normalize_number("not a number") is None


fractions_ = st.builds(
    Fraction, st.integers(min_value=-(10**12), max_value=10**12), st.integers(min_value=1, max_value=10**6)
)


@given(fractions_)
def test_number_canonical_round_trips(value):
    task = Task("number")
    canonical = format_number(value)
    assert normalize_number(canonical) == canonical
    assert task.extract(task.answer_sentence(canonical)).answer == canonical
    assert task.is_correct(canonical, f"#### {canonical}")


@given(fractions_, st.sampled_from(["plain", "latex", "dollars", "percent"]))
def test_number_written_forms_read_as_the_value(value, style):
    n, d = value.numerator, value.denominator
    written = {
        "plain": f"{n}/{d}" if d != 1 else f"{n:,}",
        "latex": f"\\frac{{{n}}}{{{d}}}",
        "dollars": f"${n:,}" if n >= 0 else f"-${-n:,}",
        "percent": f"{n}%",
    }[style]
    expected = format_number(value if style in ("plain", "latex") else Fraction(n))
    assert Task("number").extract(f"So the answer is {written}.").answer == expected


# --- choice -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        "D",
        "D.",
        "(D)",
        "D)",
        "**D**",
        "The answer is D.",
        "The answer is (D).",
        "Answer: D",
        "so the answer is $\\boxed{D}$",
        "Paris is in France and Rome in Italy.\nThe answer is Berlin.",
        "Paris is in France, London in England and Rome in Italy.\nBerlin",
        "The capital of Germany is Berlin.\nD) Berlin",
    ],
)
@pytest.mark.parametrize("question", [MMLU, MMLU_INLINE])
def test_choice_mmlu_outputs(output, question):
    assert Task("choice").extract(output, question=question).answer == "D"


def test_choice_options_need_the_question():
    assert Task("choice").extract("The answer is Berlin.").answer is None
    assert Task("choice").extract("The answer is Berlin.", question=MMLU).explicit


def test_choice_article_a_is_no_letter():
    task = Task("choice")
    assert task.extract("A farmer has 3 cows and 2 pigs.").answer is None
    assert task.extract("A farmer has 3 cows.", question=MMLU).answer is None
    assert task.extract("A farmer has 3 cows, so (C) is right.").answer == "C"


def test_choice_explicit_only_when_stated():
    task = Task("choice")
    assert task.extract("D").explicit  # the whole output is the letter
    guessed = task.extract("Berlin is the capital.\nD")
    assert guessed.answer == "D" and not guessed.explicit
    assert task.extract("Berlin is the capital.\nD", fallback_last=False).answer is None
    assert task.extract("Berlin is the capital.\nD", fallback_last=False, question=MMLU).answer is None


def test_choice_last_statement_wins():
    out = "The answer is A. Wait, Paris is in France. The answer is Berlin."
    assert Task("choice").extract(out, question=MMLU).answer == "D"


@pytest.mark.parametrize(
    "question",
    [
        "Capital?\nA) Paris\nB) London",
        "Capital?\nA. Paris\nB. London",
        "Capital?\nA: Paris\nB: London",
        "Capital?\n(A) Paris\n(B) London",
        "Capital? (A) Paris (B) London",
        "Of (A) and (B) below, pick one. (A) Paris (B) London",
    ],
)
def test_question_option_formats(question):
    assert question_options(question) == (("A", "Paris"), ("B", "London"))
    assert Task("choice").extract("I am sure the answer is London", question=question).answer == "B"


def test_question_without_options():
    assert question_options("A farmer has 3 cows. How many legs?") == ()


@pytest.mark.parametrize("gold", ["D", "d", "(D)", "D)", "D.", "The answer is D", "\\boxed{D}", "Berlin", " berlin. "])
def test_choice_gold_forms(gold):
    assert Task("choice").normalize_gold(gold, question=MMLU) == "D"
    assert Task("choice").is_correct("D", gold, question=MMLU)


def test_choice_bad_golds():
    task = Task("choice")
    with pytest.raises(DistillError, match="lists options"):
        task.normalize_gold("Berlin")  # no question: option text cannot map
    with pytest.raises(DistillError, match="ABCDEFGHIJ"):
        task.normalize_gold("3", question=MMLU)  # an index (cais/mmlu): say how to map it
    with pytest.raises(DistillError, match="not a choice letter"):
        task.normalize_gold("Madrid", question=MMLU)


@given(st.sampled_from(["A", "B", "C", "D"]), st.text(max_size=80))
def test_choice_option_gold_round_trips(letter, rationale):
    task = Task("choice")
    text = dict(question_options(MMLU))[letter]
    gold = task.normalize_gold(text, question=MMLU)
    out = f"{rationale}\n{task.answer_sentence(gold)}"
    assert task.is_correct(task.extract(out, question=MMLU).answer, text, question=MMLU)


# --- yes/no -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("The answer is: Yes", "yes"), ("So the answer is **No**.", "no"), ("\\boxed{\\text{Yes}}", "yes")],
)
def test_yes_no_forms(text, expected):
    extraction = Task("yes_no").extract(text, fallback_last=False)
    assert extraction.answer == expected and extraction.explicit


# --- text -------------------------------------------------------------------------------------------


def test_text_squad_normalisation():
    task = Task("text")
    pred = task.extract("Super Bowl 50 was won by them.\nThe answer is the Denver Broncos.").answer
    assert pred == "denver broncos"
    assert task.is_correct(pred, "Denver Broncos")
    assert task.is_correct(task.extract("Answer: Paris,").answer, "PARIS")
    assert not task.is_correct(task.extract("The answer is Lyon").answer, "Paris")


def test_text_normalisation_steps_are_each_optional():
    assert not Task("text", normalize=("punctuation", "articles", "whitespace")).is_correct("Paris", "paris")
    assert not Task("text", normalize=("case", "articles", "whitespace")).is_correct("paris!", "paris")
    assert not Task("text", normalize=("case", "punctuation", "whitespace")).is_correct("the tower", "tower")
    assert not Task("text", normalize=("case", "punctuation", "articles")).is_correct("new  york", "new york")
    assert Task("text").is_correct("The  New York!", "new york")


def test_text_punctuation_inside_words_is_kept():
    task = Task("text")
    assert canonical_text("(3.14),") == "3.14"
    assert not task.is_correct("314", "3.14")
    assert not task.is_correct("n-a-e-y", "naey")  # last letters: spelled out is not the word


def test_text_contains_and_f1():
    contains = Task("text", match="contains")
    pred = contains.extract("The answer is the city of New York, USA.").answer
    assert contains.is_correct(pred, "New York")
    assert not contains.is_correct(pred, "York City")
    assert not contains.is_correct("yorkshire", "york")  # whole tokens, not substrings
    pred = Task("text").extract("Answer: the Denver Broncos team").answer
    assert Task("text", match="f1", f1_threshold=0.8).is_correct(pred, "Denver Broncos")  # F1 = 0.8
    assert not Task("text", match="f1", f1_threshold=0.9).is_correct(pred, "Denver Broncos")
    assert not Task("text", match="f1").is_correct(pred, "Carolina Panthers")


def test_text_reads_the_last_line_without_a_marker():
    task = Task("text")
    guessed = task.extract("Let me think.\n\nParis\n")
    assert guessed.answer == "paris" and not guessed.explicit
    assert task.extract("Let me think.\nParis", fallback_last=False).answer is None


@given(st.text(max_size=120))
def test_text_normalisation_is_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert canonical_text("the-end") == "the-end"  # an article is a whole word: "the-end" keeps it


steps = st.lists(st.sampled_from(["case", "punctuation", "articles", "whitespace"]), unique=True).map(tuple)


@given(st.text(max_size=120), steps)
def test_text_canonical_round_trips(text, normalize):
    task = Task("text", normalize=normalize)
    answer = task.extract(text).answer
    if answer is not None:
        assert canonical_text(answer, normalize) == answer
        assert task.extract(task.answer_sentence(answer)).answer == answer
        assert task.is_correct(answer, answer)


# --- json -------------------------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize(
    "output",
    [
        'Here is the record:\n```json\n{\n  "name": "Ann",\n  "age": 30\n}\n```',
        'The answer is {"age": 30.0, "name": "Ann"}.',
        'I extracted {"name": "Ann", "age": 30} from the text.',
        'Example: {"x": 1} is not it. The answer is:\n```json\n{"name": "Ann", "age": 30}\n```',
    ],
)
def test_json_outputs(output):
    assert Task("json", json_schema=PERSON).extract(output).answer == '{"age":30,"name":"Ann"}'


def test_json_schema_failures_name_the_problem():
    task = Task("json", json_schema=PERSON)
    missing = task.extract('The answer is {"name": "Ann"}')
    assert missing.answer is None and "'age' is a required property" in missing.reason
    assert "task.answer.json_schema" in missing.reason
    wrong = task.extract('{"name": "Ann", "age": "thirty"}')
    assert wrong.answer is None and "$.age" in wrong.reason
    broken = task.extract('The answer is {"name": "Ann", age: 30}')
    assert broken.answer is None and broken.reason.startswith("JSON does not parse")
    assert task.extract("no braces at all").reason == "no JSON value in output"
    assert task.extract('{"name": "Ann", "age": NaN}').answer is None  # not JSON
    deep = Task("json").extract("The answer is " + "[" * 900 + "]" * 900)  # parses; then too deep to handle
    assert deep.answer is None and "nested deeper" in deep.reason


def test_json_schema_is_checked_at_construction():
    with pytest.raises(DistillError, match="not a valid JSON Schema"):
        Task("json", json_schema={"type": "objekt"})
    assert Task("json").extract("[1, 2]").answer == "[1,2]"  # no schema: any JSON value


def test_json_gold_field_by_field():
    task = Task("json", json_schema=PERSON)
    pred = task.extract('{"name": "Ann", "age": 30, "tags": ["a", 1.0]}').answer
    assert task.is_correct(pred, '{"name": "Ann"}')  # only the gold's fields count
    assert task.is_correct(pred, '{"age": 30.0, "tags": ["a", 1]}')  # numbers as numbers
    assert task.check(pred, '{"name": "Bob"}') == (False, "answer differs from the gold at $.name")
    assert not task.is_correct(pred, '{"tags": ["a"]}')  # lists match element by element
    assert not task.is_correct(pred, '{"nickname": "A"}')
    assert task.is_correct(pred, "") and task.is_correct(pred, None)  # no gold: valid is correct
    assert not task.is_correct('{"name": "Ann"}', "")  # a prediction failing the schema never is
    assert not Task("json").is_correct("true", "1") and not Task("json").is_correct("1", "true")
    with pytest.raises(DistillError, match="not JSON"):
        task.normalize_gold("Ann, 30")
    assert task.normalize_gold({"b": 1, "a": [2.0]}) == '{"a":[2],"b":1}'  # a structured gold


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_json_canonical_round_trips(value):
    task = Task("json")
    canonical = task.normalize_gold(json.dumps(value))
    assert task.extract(task.answer_sentence(canonical)).answer == canonical
    assert task.extract(f"```json\n{json.dumps(value, indent=2)}\n```").answer == canonical
    assert task.is_correct(canonical, json.dumps(value))


# --- regex ------------------------------------------------------------------------------------------


def test_regex_last_match_first_group():
    task = Task("regex", pattern=r"<answer>(.*?)</answer>")
    out = "Draft: <answer>41</answer>. Checking again... <answer> 42 </answer>"
    assert task.extract(out) == Extraction("42", explicit=True)
    miss = task.extract("I think it is 42")
    assert miss.answer is None and "no match of task.answer.pattern" in miss.reason
    assert task.is_correct("42", " 42 \n") and not task.is_correct("42", "42.0")  # stripped, then exact


def test_regex_bad_patterns():
    with pytest.raises(DistillError, match="not a valid regex"):
        Task("regex", pattern="(unclosed")
    with pytest.raises(DistillError, match="no group"):
        Task("regex", pattern=r"\d+")
    with pytest.raises(DistillError, match="needs task.answer.pattern"):
        Task("regex")


@given(
    st.sampled_from(
        [
            r"<answer>(.*?)</answer>",
            r"#### (\w+)",
            r"(?i)FINAL\s*=\s*\[(.+?)\]",
            r"answer is (\w+)",
            r"^Result: ([A-Za-z0-9]+)$",
            r"(\w+),\s*done",
            r"(?:Answer|Solution): (\w+)",
        ]
    ),
    st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True),
)
def test_regex_answer_sentence_round_trips(pattern, answer):
    task = Task("regex", pattern=pattern)
    assert task.extract(task.answer_sentence(answer)).answer == answer


# --- custom -----------------------------------------------------------------------------------------


@pytest.fixture
def checks(tmp_path, monkeypatch):
    """A checker module, importable under a name unique to this test."""
    name = f"user_checks_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import math\n"
        "IMPORTS = []\n"
        "IMPORTS.append(1)\n"
        "def grade(answer, gold):\n"
        "    if gold == 'explode':\n"
        "        raise ValueError('cannot grade ' + 'x' * 500)\n"
        "    return answer.casefold() == gold.casefold()\n"
        "def score(answer, gold):\n"
        "    return float(gold)\n"
        "def truthy(answer, gold):\n"
        "    return gold\n"
        "NOT_A_FUNCTION = 3\n"
        "class Graders:\n"
        "    @staticmethod\n"
        "    def exact(answer, gold):\n"
        "        return answer == gold\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_checker_grades_extracted_text(checks):
    task = Task("custom", checker=f"{checks}:grade")
    pred = task.extract("Let me think.\nThe answer is Hello World.").answer
    assert pred == "Hello World"  # case kept for the checker
    assert task.check(pred, "hello world") == (True, None)
    assert task.check(pred, "goodbye") == (False, None)
    assert task.is_correct(pred, "HELLO WORLD")
    assert not task.is_correct(None, "hello world")
    assert sys.modules[checks].IMPORTS == [1]  # imported once
    assert Task("custom", checker=f"{checks}:Graders.exact").is_correct("Hi", "Hi")


def test_custom_checker_exception_is_a_wrong_row_with_reason(checks):
    task = Task("custom", checker=f"{checks}:grade")
    correct, reason = task.check("anything", "explode")
    assert not correct
    assert reason.startswith(f"checker {checks}:grade raised ValueError: cannot grade xxx")
    assert len(reason) < 300  # the message is truncated


@pytest.mark.parametrize("gold,expected", [("0.7", True), ("0.5", True), ("0.3", False), ("nan", False), ("2.0", True)])
def test_custom_checker_scores(checks, gold, expected):
    assert Task("custom", checker=f"{checks}:score").is_correct("x", gold) is expected


def test_custom_checker_truthy_values(checks):
    task = Task("custom", checker=f"{checks}:truthy")
    assert task.is_correct("x", "non-empty") and not task.is_correct("x", "")


def test_custom_checker_bad_entry_points(checks):
    with pytest.raises(DistillError, match="PYTHONPATH"):
        Task("custom", checker="no_such_module_xyz.checks:grade").check("a", "b")  # lazily, on first use
    with pytest.raises(DistillError, match="has no attribute 'missing'"):
        Task("custom", checker=f"{checks}:missing").check("a", "b")
    with pytest.raises(DistillError, match="not a function"):
        Task("custom", checker=f"{checks}:NOT_A_FUNCTION").check("a", "b")
    with pytest.raises(DistillError, match="module:function"):
        Task("custom", checker="just_a_module")


# --- the task object --------------------------------------------------------------------------------


def test_from_config_reads_task_answer():
    cfg = TaskConfig(answer_type="text", answer={"normalize": ["case"], "match": "f1", "f1_threshold": 0.5})
    task = Task.from_config(cfg)
    assert task == Task("text", normalize=("case",), match="f1", f1_threshold=0.5)
    assert hash(task) == hash(Task("text", normalize=["case"], match="f1", f1_threshold=0.5))
    schema_cfg = TaskConfig(answer_type="json", answer={"json_schema": PERSON})
    assert Task.from_config(schema_cfg).extract('{"name": "A"}').answer is None
    assert Task.from_config(SimpleNamespace(answer_type="number")) == Task("number")  # no answer settings


def test_task_settings_are_checked():
    with pytest.raises(DistillError, match="unknown answer type"):
        Task("essay")
    with pytest.raises(DistillError, match="normalize"):
        Task("text", normalize=("stemming",))
    with pytest.raises(DistillError, match="match"):
        Task("text", match="fuzzy")


def test_tasks_pickle_for_workers(checks):
    for task in (
        Task("regex", pattern=r"=(\d+)"),
        Task("json", json_schema=PERSON),
        Task("custom", checker=f"{checks}:grade"),
    ):
        task.is_correct(task.extract("a=1").answer, "1")  # fill the caches first
        copy = pickle.loads(pickle.dumps(task))
        assert copy == task
        assert copy.extract("x=5 y=7").answer == task.extract("x=5 y=7").answer


ALL_TASKS = [
    Task("number"),
    Task("yes_no"),
    Task("choice"),
    Task("text"),
    Task("text", normalize=()),
    Task("json", json_schema=PERSON),
    Task("regex", pattern=r"answer is (\w+)"),
    Task("custom", checker="os.path:join"),
]


@settings(max_examples=60)
@given(st.text(max_size=300), st.sampled_from(ALL_TASKS), st.booleans(), st.sampled_from([None, MMLU]))
def test_extractions_are_consistent_and_round_trip(text, task, fallback_last, question):
    r = task.extract(text, fallback_last=fallback_last, question=question)
    assert (r.answer is None) == (r.reason is not None)
    assert not (r.explicit and r.answer is None)
    if r.answer is not None:
        again = task.extract(task.answer_sentence(r.answer), question=question)
        assert again.answer == r.answer and again.explicit


ADVERSARIAL = [
    "1" * 100_000,
    "111," * 25_000,
    ("answer is" + "\n" * 1000) * 100,
    "answer (" * 12_500,
    "[" * 100_000,
    '{"a":' * 20_000,
    "\\boxed{" * 14_000,
    "1 1/" * 25_000,
    "A) " * 33_000,
    " " * 100_000 + "x",
    ("1" + " " * 1000) * 100,
    "The answer is " * 7_000,
    "the '" * 20_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_long_adversarial_outputs_finish(text):
    """100 kB of hostile output: every extractor returns (each regex is linear, the JSON search bounded)."""
    for task in ALL_TASKS:
        r = task.extract(text, question=MMLU)
        assert (r.answer is None) == (r.reason is not None)
    assert question_options(text) == ()
