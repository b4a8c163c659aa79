"""Synthesis of instructions and of code problems end to end through the CLI, with a real (tiny) teacher
(its tokenizer, chat template and request keys) and its outputs replayed from the completion cache:
a rerun's path, so no weights load. The outputs are written in the embedded teacher's format, with a
malformed, a duplicate and a failing one planted. Instructions: seeds → new de-duplicated instructions →
answered rows in the dataset; code: a problem is kept only when the teacher's solution passes its tests,
the failing one is dropped with its reason."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app
from distill.config import load_recipe
from distill.core.answers import Task
from distill.core.problems import load_problems, load_seeds
from distill.core.sources import resolve_model
from distill.teachers import synthesis
from distill.teachers.backends.base import Completion
from distill.teachers.cache import CompletionCache
from distill.teachers.methods import METHODS
from distill.teachers.workers import make_backend

pytestmark = pytest.mark.integration


@pytest.fixture
def teacher(tiny_teacher) -> str:
    """The teacher's model source: the tiny test model (`make test` installs no embedded weights)."""
    return f"hf:{tiny_teacher}"


class Recording:
    """Records the completions a run will ask for: the real backend renders every prompt; ``answer(prompt)``
    is the teacher's recorded output for it. ``save`` puts them in the run's completion cache."""

    def __init__(self, backend, answer):
        self.backend, self.answer, self.model_id, self.done = backend, answer, backend.model_id, {}

    def chat_prompt(self, messages, assistant_prefix=""):
        return self.backend.chat_prompt(messages, assistant_prefix)

    def generate(self, requests):
        out = [Completion(self.answer(r.prompt), 40, 40, "stop") for r in requests]
        self.done.update({r.key(self.model_id): c for r, c in zip(requests, out)})
        return out

    def save(self, path):
        CompletionCache(path).put_many(self.model_id, list(self.done.items()))


def _scripted(outputs: list[str]):
    left = list(outputs)
    return lambda prompt: left.pop(0)


def _run(tmp_path, recipe: dict) -> tuple:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path, [])
    cfg = loaded.teacher
    backend = make_backend(cfg, str(resolve_model(cfg.model, False, "teacher")))  # tokenizer only
    return path, loaded, backend


INSTRUCTION_SEEDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, move, sleep."},
    {"instruction": "Translate the sentence into French.", "input": "I like tea.", "output": "J'aime le thé."},
    {"instruction": "Sort the numbers in ascending order.", "input": "9, 2, 7", "output": "2, 7, 9"},
    {"instruction": "Name the capital city of the given country.", "input": "Canada", "output": "Ottawa"},
    {"instruction": "Give an antonym of the word.", "input": "ancient", "output": "modern"},  # eval
]
WRITTEN = [  # what the teacher writes after "Instruction:", request by request
    " Write a short poem about the moon.\nInput: <noinput>",
    " Sort the numbers in ascending order.\nInput: 9, 2, 7",  # a seed again: exact duplicate
    " Ok",  # malformed: dropped, its reason counted
    " **Classify the animal as a mammal or a bird.**\n**Input:** penguin\n**Output:** bird",
    " Write a short poem about the moon tonight.\nInput: <noinput>",  # not reached: two are accepted
]
ANSWERS = {
    "Write a short poem about the moon.": "Silver lamp of night,\nyou keep the tide in your hand.",
    "Classify the animal as a mammal or a bird.\n\npenguin": "A penguin is a bird.",
    "Give an antonym of the word.\n\nancient": "modern",
}


def _answer_of(prompt: str) -> str:
    return next(a for q, a in ANSWERS.items() if q in prompt)


def test_instruction_synthesis_writes_deduplicated_instructions_and_answers_them(tmp_path, teacher):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTION_SEEDS))
    recipe = {
        "name": "instr",
        "output_dir": str(tmp_path / "runs"),
        "cache": str(tmp_path / "cache.sqlite"),
        "task": {
            "source": "synthetic",
            "synthesis": "instructions",
            "name": str(seeds),
            "answer_type": "open",
            "train_size": 2,
            "eval_size": 1,
        },
        "teacher": {"model": teacher, "method": "zero_shot_cot", "trigger": "", "keep": "all", "executor": "local"},
    }
    path, loaded, backend = _run(tmp_path, recipe)
    t = loaded.task
    writer = Recording(backend, _scripted(WRITTEN))
    avoid = [synthesis.instruction_question("Give an antonym of the word.", "ancient")]
    items, _ = synthesis.synthesize_instructions(
        writer, INSTRUCTION_SEEDS[:-1], 2, avoid, seed=t.seed, shots=t.seed_shots, temperature=0.7
    )
    answerer = Recording(backend, _answer_of)
    problems = synthesis.instruction_split(str(seeds), 1)[1] + synthesis.as_train_problems(items, "instructions", {})
    METHODS["zero_shot_cot"](answerer, problems, loaded.teacher, Task("open"))
    writer.save(tmp_path / "cache.sqlite")
    answerer.save(tmp_path / "cache.sqlite")

    res = CliRunner().invoke(app, ["generate", str(path)])
    assert res.exit_code == 0, res.output

    gen = tmp_path / "runs" / "instr" / "generate"
    train = pq.read_table(gen / "dataset" / "train.parquet").to_pylist()
    assert [(r["question"], r["pred"]) for r in train] == [
        ("Write a short poem about the moon.", ANSWERS["Write a short poem about the moon."]),
        ("Classify the animal as a mammal or a bird.\n\npenguin", "A penguin is a bird."),
    ]
    assert all(r["cached"] for r in train)  # replayed: nothing was generated
    evals = pq.read_table(gen / "dataset" / "eval.parquet").to_pylist()
    assert [(r["question"], r["pred"], r["gold"]) for r in evals] == [
        ("Give an antonym of the word.\n\nancient", "modern", "modern")
    ]
    stats = json.loads((gen / "metrics.json").read_text())["synthesis"]
    assert stats == {
        "requested": 4,  # 2 + 1 + 1 in the first round, which was enough
        "unparsable": 1,
        "exact_duplicates": 1,
        "near_duplicates": 0,
        "eval_overlap": 0,
        "accepted": 2,
        "unparsable_reasons": {"instruction under 3 words": 1},
        "dedup": "jaccard",
    }
    log = [json.loads(line) for line in (gen / "synthesis.jsonl").read_text().splitlines()]
    assert [e["verdict"] for e in log] == [
        "kept",
        "exact duplicate",
        "unparsable: instruction under 3 words",
        "kept",
    ]
    assert log[2]["output"] == " Ok"  # the raw output of a dropped candidate is kept


CODE_SEEDS = [
    ("Write a function add(a, b) that returns the sum of a and b.", "assert add(1, 2) == 3"),
    ("Write a function is_even(n) that returns True when n is even.", "assert is_even(2)\nassert not is_even(3)"),
    ("Write a function reverse_string(s) that returns s reversed.", "assert reverse_string('ab') == 'ba'"),
    ("Write a function square(x) that returns x squared.", "assert square(3) == 9"),  # eval
]
CODE_WRITTEN = [  # after "Problem:"
    " Write a function triple(x) that returns three times x.\nTests:\n```python\nassert triple(2) == 6\n"
    "assert triple(0) == 0\n```",
    " Write a function that is nice.",  # no tests
    " Write a function last(xs) that returns the last item of a non-empty list.\nTests:\n```python\n"
    "assert last([1, 2, 3]) == 3\n```",  # its solution fails
    " Write a function add(a, b) that returns the sum of a and b.\nTests:\n```python\nassert add(1, 2) == 3\n```",
    # second round: one more is needed
    " Write a function negate(x) that returns minus x.\nTests:\n```python\nassert negate(4) == -4\n```",
    " Write a function negate(x) that returns minus x, the opposite.\nTests:\n```python\nassert negate(1) == -1\n```",
]
SOLUTIONS = {
    "triple(x)": "def triple(x):\n    return 3 * x",
    "last(xs)": "def last(xs):\n    return xs[0]",  # wrong: the first item
    "negate(x)": "def negate(x):\n    return -x",
    "square(x)": "def square(x):\n    return x * x",
}


def _solution_of(prompt: str) -> str:
    code = next(c for name, c in SOLUTIONS.items() if name in prompt)
    return f"I write the function.\n```python\n{code}\n```"


def test_code_synthesis_keeps_only_problems_whose_solution_passes(tmp_path, teacher):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in CODE_SEEDS))
    recipe = {
        "name": "code",
        "output_dir": str(tmp_path / "runs"),
        "cache": str(tmp_path / "cache.sqlite"),
        "task": {
            "source": "synthetic",
            "synthesis": "code",
            "name": str(seeds),
            "answer_type": "code",
            "answer": {"timeout_s": 5},
            "train_size": 2,
            "eval_size": 1,
        },
        "teacher": {"model": teacher, "method": "zero_shot_cot", "executor": "local"},
    }
    path, loaded, backend = _run(tmp_path, recipe)
    t, task = loaded.task, Task.from_config(loaded.task)
    writer, solver = Recording(backend, _scripted(CODE_WRITTEN)), Recording(backend, _solution_of)
    evals = load_problems(t)[1]

    def solve(problems):
        return METHODS["zero_shot_cot"](solver, problems, loaded.teacher, task)

    avoid = [p["question"] for p in evals]
    items, _ = synthesis.synthesize_code(
        writer, load_seeds(t), 2, avoid, solve, seed=t.seed, shots=t.seed_shots, temperature=0.7
    )
    solve(evals + synthesis.as_train_problems(items, "code", {}))  # the stage's own requests
    writer.save(tmp_path / "cache.sqlite")
    solver.save(tmp_path / "cache.sqlite")

    res = CliRunner().invoke(app, ["generate", str(path)])
    assert res.exit_code == 0, res.output

    gen = tmp_path / "runs" / "code" / "generate"
    train = pq.read_table(gen / "dataset" / "train.parquet").to_pylist()
    assert [(r["question"], r["gold"], r["pred"], r["correct"]) for r in train] == [
        (
            "Write a function triple(x) that returns three times x.",
            "assert triple(2) == 6\nassert triple(0) == 0",
            SOLUTIONS["triple(x)"],
            True,
        ),
        ("Write a function negate(x) that returns minus x.", "assert negate(4) == -4", SOLUTIONS["negate(x)"], True),
    ]
    stats = json.loads((gen / "metrics.json").read_text())["synthesis"]
    assert stats == {
        "requested": 4 + 2,
        "unparsable": 1,
        "exact_duplicates": 1,
        "near_duplicates": 1,
        "eval_overlap": 0,
        "accepted": 2,
        "unparsable_reasons": {"no tests (no assert calling a function)": 1},
        "dedup": "jaccard",
        "solution_failed": 1,
        "solution_failed_reasons": {"tests failed": 1},
    }
    log = [json.loads(line) for line in (gen / "synthesis.jsonl").read_text().splitlines()]
    assert [e["verdict"] for e in log] == [
        "kept",
        "unparsable: no tests (no assert calling a function)",
        "solution failed: tests failed: AssertionError at line 1 of the tests: assert last([1, 2, 3]) == 3",
        "exact duplicate",
        "kept",
        "near duplicate",
    ]
    assert log[2]["solution"] == SOLUTIONS["last(xs)"] and log[2]["tests"] == "assert last([1, 2, 3]) == 3"
