"""Synthesis de-duplication (exact Jaccard vs MinHash LSH past ``lsh_rows``) and the parsing of the
teacher's untrusted outputs into instructions and code problems."""

import random

import pytest
from guards import finishes_within

from distill.teachers.backends.base import Completion, render_chat
from distill.teachers.dedup import NearDuplicateIndex, jaccard, shingles
from distill.teachers.synthesis import (
    instruction_question,
    parse_code_problem,
    parse_instruction,
    synthesize_instructions,
)


def planted_corpus(n: int = 2000, every: int = 10, seed: int = 0):
    """``n`` instruction-like texts sharing template 3-grams; every ``every``-th is followed by a copy
    with one word changed (word 3-gram Jaccard 0.7-0.87 to it). Returns the texts and the copies' indices."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(3000)]
    texts, copies = [], []
    while len(texts) < n:
        head = rng.choice(["Write a short story about", "Explain how to", "Classify the following list of"])
        text = f"{head} " + " ".join(rng.choices(words, k=rng.randint(17, 40)))
        texts.append(text)
        if len(texts) % every == 0:
            tokens = text.split()
            tokens[rng.randrange(4, len(tokens) - 1)] = "changed"
            copies.append(len(texts))
            texts.append(" ".join(tokens))
    return texts, copies


def verdicts(texts: list[str], lsh_rows: int) -> tuple[list[str | None], NearDuplicateIndex]:
    index = NearDuplicateIndex(0.7, lsh_rows=lsh_rows)
    out = []
    for t in texts:
        out.append(index.find(t))
        index.add(t)
    return out, index


def test_lsh_agrees_with_exact_jaccard_on_planted_near_duplicates():
    texts, copies = planted_corpus()
    assert all(jaccard(shingles(texts[c - 1]), shingles(texts[c])) >= 0.7 for c in copies)
    exact, exact_index = verdicts(texts, lsh_rows=len(texts) + 1)
    lsh, lsh_index = verdicts(texts, lsh_rows=0)
    assert exact_index.method == "jaccard" and lsh_index.method == "minhash_lsh"
    assert all(exact[c] == "near" for c in copies)  # exact Jaccard finds every planted pair
    recall = sum(lsh[c] == "near" for c in copies) / len(copies)
    assert recall >= 0.95, recall
    # every candidate the LSH reports is checked by exact Jaccard: it never reports one the exact index does not
    assert all(e is not None for e, m in zip(exact, lsh) if m is not None)
    assert sum(m is not None for m in lsh) >= 0.95 * sum(e is not None for e in exact)


def test_the_index_moves_to_lsh_past_the_row_count_and_keeps_its_rows():
    texts, copies = planted_corpus(400, every=8)
    index = NearDuplicateIndex(0.7, lsh_rows=100)
    for t in texts[:100]:
        index.add(t)
    assert index.method == "jaccard" and len(index) == 100
    index.add(texts[100])
    assert index.method == "minhash_lsh"
    # rows stored before the move are found by the LSH: originals with another word changed
    variants = [texts[c - 1].rsplit(" ", 1)[0] + " other" for c in copies if c <= 100]
    assert sum(index.find(v) == "near" for v in variants) >= 0.95 * len(variants)
    assert index.find(texts[5].upper() + " !") == "exact"
    assert index.find("Something else entirely: " + " ".join(f"x{i}" for i in range(20))) is None


@pytest.mark.parametrize(
    ("text", "finish", "want"),
    [
        (
            " Sort the numbers in ascending order.\nInput: 3, 1, 2",
            "stop",
            ("Sort the numbers in ascending order.", "3, 1, 2"),
        ),
        ("Name three primary colours.\nInput: <noinput>", "stop", ("Name three primary colours.", "")),
        (
            "**Translate the sentence into French.**\n**Input:** I like tea.\n**Output:** J'aime le thé.",
            "stop",
            ("Translate the sentence into French.", "I like tea."),
        ),
        ("Sort the numbers ascending. Input: 5, 4", "stop", ("Sort the numbers ascending.", "5, 4")),
        (
            "Give a synonym for happy.\nInput: None\nTask 2\nInstruction: Another task",
            "length",
            ("Give a synonym for happy.", ""),
        ),
        (
            "Summarise the paragraph in one sentence.\nInput: The cat sat.\nThe mat was red.\nResponse: A cat sat.",
            "stop",
            ("Summarise the paragraph in one sentence.", "The cat sat.\nThe mat was red."),
        ),
        ("Instruction: Explain what a prime number is.\nInput: n/a", "stop", ("Explain what a prime number is.", "")),
    ],
)
def test_parse_instruction_reads_well_formed_and_messy_outputs(text, finish, want):
    item, why = parse_instruction(text, finish)
    assert why is None and (item["instruction"], item["input"]) == want


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ("   ", "stop", "empty output"),
        ("\nInput: 3, 1, 2", "stop", "no instruction"),
        ("Do it.\nInput: x", "stop", "instruction under 3 words"),
        ("Describe the image below in detail.\nInput: <noinput>", "stop", "needs a non-text modality"),
        ("Write a poem about the sea and then keep going and going", "length", "truncated"),
        ("- Write a list of fruits.", "stop", "instruction starts with punctuation"),
        (" ".join(["word"] * 200), "stop", "instruction over 150 words"),
    ],
)
def test_parse_instruction_drops_malformed_outputs_with_a_reason(text, finish, reason):
    item, why = parse_instruction(text, finish)
    assert item is None and why.startswith(reason)


def test_parse_instruction_is_linear_on_a_hostile_output():
    hostile = ("*" * 50_000 + " input" * 10_000 + ":") * 4
    with finishes_within(60, "parsing a hostile output"):
        parse_instruction(hostile)
        parse_code_problem(hostile)


GOOD_CODE = """ Write a function double(x) that returns twice the number x.
Tests:
```python
assert double(2) == 4
assert double(-1) == -2
```"""


def test_parse_code_problem_takes_the_statement_and_only_calling_asserts():
    item, why = parse_code_problem(GOOD_CODE)
    assert why is None
    assert item == {
        "question": "Write a function double(x) that returns twice the number x.",
        "tests": "assert double(2) == 4\nassert double(-1) == -2",
    }
    # a solution written anyway is no test, nor is an assert that calls nothing; repeats count once
    with_solution = GOOD_CODE.replace(
        "```python\n", "```python\ndef double(x):\n    return 2 * x\n\nassert True\nassert double(2) == 4\n"
    )
    assert parse_code_problem(with_solution)[0]["tests"] == item["tests"]
    # unfenced assert lines, and an unclosed block (the output ran out)
    bare = "Write a function inc(n) returning n plus one.\nTests:\nassert inc(1) == 2\nassert inc(0) == 1"
    assert parse_code_problem(bare)[0]["tests"] == "assert inc(1) == 2\nassert inc(0) == 1"
    cut = "Write a function inc(n) returning n plus one.\n```python\nassert inc(1) == 2\nassert inc("
    assert parse_code_problem(cut, "length")[0]["tests"] == "assert inc(1) == 2"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("```python\nassert f(1) == 2\n```", "no problem statement"),
        ("Add them.\nTests:\nassert add(1, 2) == 3", "problem statement not 5-300 words"),
        ("Write a function add(a, b) returning their sum.\nTests:\n```python\nprint(add(1, 2))\n```", "no tests"),
        ("Write a function add(a, b) returning their sum.", "no tests"),
    ],
)
def test_parse_code_problem_drops_malformed_outputs_with_a_reason(text, reason):
    item, why = parse_code_problem(text)
    assert item is None and why.startswith(reason)


class ScriptedTeacher:
    """A real (if trivial) backend for the loop: it writes the scripted outputs in request order."""

    model_id = "scripted"

    def __init__(self, outputs: list[str]):
        self.outputs, self.asked = list(outputs), 0

    def chat_prompt(self, messages, assistant_prefix=""):
        return render_chat(None, messages, assistant_prefix)

    def generate(self, requests):
        out = []
        for _ in requests:
            text = self.outputs[self.asked % len(self.outputs)]
            self.asked += 1
            out.append(Completion(text, 10, 10, "stop"))
        return out


def test_instruction_synthesis_counts_every_drop_and_logs_every_candidate():
    seeds = [
        {"instruction": "Name three primary colours.", "input": ""},
        {"instruction": "Sort the numbers in ascending order.", "input": "3, 1, 2"},
    ]
    avoid = [instruction_question("Translate the sentence into French.", "I like tea.")]
    outputs = [
        "Give an antonym for the word cold.\nInput: <noinput>",  # new
        "Sort the numbers in ascending order.\nInput: 3, 1, 2",  # a seed, exactly
        "Translate the sentence into French.\nInput: I like tea!",  # the eval split
        "Ok.",  # unparsable
        "Give an antonym for the word cold .\nInput: none",  # exact duplicate of the first
        "Write a haiku about autumn leaves falling slowly.\nInput: <noinput>",  # new
    ]
    log = []
    got, stats = synthesize_instructions(ScriptedTeacher(outputs), seeds, 2, avoid, seed=3, log=log)
    assert [g["question"] for g in got] == [
        "Give an antonym for the word cold.",
        "Write a haiku about autumn leaves falling slowly.",
    ]
    assert stats == {
        "requested": 4 + 2,  # 2 + 1 + 1, then 1 + 0 + 1 for the one still missing
        "unparsable": 1,
        "exact_duplicates": 2,
        "near_duplicates": 0,
        "eval_overlap": 1,
        "accepted": 2,
        "unparsable_reasons": {"instruction under 3 words": 1},
        "dedup": "jaccard",
    }
    assert [e["verdict"] for e in log] == [
        "kept",
        "exact duplicate",
        "eval overlap",
        "unparsable: instruction under 3 words",
        "exact duplicate",
        "kept",
    ]


def test_the_readme_synthesis_recipes_load():
    import re
    from pathlib import Path

    import yaml

    from distill.config import Recipe

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- synthesis-recipes -->\n```yaml\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- synthesis-recipes --> block"
    instructions, code = (Recipe.model_validate(d) for d in yaml.safe_load_all(block.group(1)))
    assert (instructions.task.synthesis, instructions.task.answer_type) == ("instructions", "open")
    assert (code.task.synthesis, code.task.answer_type, code.teacher.method) == ("code", "code", "zero_shot_cot")
    with pytest.raises(ValueError, match="task.synthesis=code needs task.answer_type=code"):
        Recipe.model_validate({"task": {**code.task.model_dump(), "answer_type": "number"}})
