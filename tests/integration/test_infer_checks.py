"""`distill infer` on a real tiny bundle: prompts past the context are refused at once (or cut with
--truncate), empty ones refused, the bundle's max_new_tokens is the default, seeded sampling, and a
file of questions answered one line each (issue #19, item 6)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_MAX_NEW_TOKENS = 3  # not the runtime's fallback (256), so the bundle's value is what shows
LONG = "State the final answer: " + "12 + 7 - 3 + " * 2800 + "1 ="  # ~36,000 characters


def _cli(*args, stdin: str | None = None):
    """The command as a user runs it; a refusal must come back well within the timeout."""
    return subprocess.run(
        [sys.executable, "-m", "distill", "infer", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        input=stdin,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )


def _one_error_line(res) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stdout + res.stderr
    return lines[0]


def _answers(res) -> list[dict]:
    assert res.returncode == 0, res.stdout + res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def bundle(tiny_student, tmp_path_factory):
    """A device bundle of the tiny student, assembled as the export stage does (fp32, fused attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.export.bundle import FP32_FILE, assemble_bundle
    from distill.export.onnx_export import PADDING_SIDE, export_decoder

    root = tmp_path_factory.mktemp("infer")
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    layout = export_decoder(model, root / "variants" / FP32_FILE)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    assemble_bundle(
        root / "variants",
        root / "bundle",
        FP32_FILE,
        tok,
        model.config,
        max_new_tokens=BUNDLE_MAX_NEW_TOKENS,
        fmt="rationale",
        padding_side=PADDING_SIDE[layout],
    )
    return root / "bundle"


@pytest.fixture(scope="module")
def gen(bundle):
    from distill.export.runtime import OnnxGenerator

    return OnnxGenerator(bundle)


def test_the_bundle_states_its_context(bundle, gen):
    meta = json.loads((bundle / "distill_generation.json").read_text())
    genai = json.loads((bundle / "genai_config.json").read_text())
    assert meta["context_length"] == genai["model"]["context_length"] == gen.context_length == 1024
    assert gen.max_new_tokens == BUNDLE_MAX_NEW_TOKENS


def test_a_prompt_past_the_context_is_refused_in_one_line(bundle, gen):
    n = len(gen.tokenizer.encode(gen.render(LONG), add_special_tokens=False).ids)
    assert n > 1024 and len(LONG) > 35_000
    line = _one_error_line(_cli(bundle, LONG))
    assert line == (
        f"error: the prompt is {n} tokens and {BUNDLE_MAX_NEW_TOKENS} new tokens are asked for: "
        f"{n + BUNDLE_MAX_NEW_TOKENS} tokens, past the model's 1024-token context — shorten the question, "
        f"lower --max-new-tokens (max_new_tokens), or pass --truncate (truncate=True) to keep the prompt's "
        f"last {1024 - BUNDLE_MAX_NEW_TOKENS} tokens"
    )
    # a short prompt asking for more new tokens than the context holds is refused too
    line = _one_error_line(_cli(bundle, "1 + 2 =", "--max-new-tokens", 1024))
    assert "max_new_tokens 1024 leaves no room for a prompt in the model's 1024-token context" in line


def test_the_bundle_copy_of_the_runtime_refuses_too(bundle):
    """The torch-free copy inside the bundle, in an isolated interpreter: the same check, one line."""
    res = subprocess.run(
        [sys.executable, "-I", "distill_runtime.py", ".", LONG],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.startswith("error: the prompt is ") and res.stderr.count("\n") == 1


def test_truncate_keeps_the_end_of_the_prompt(bundle, gen):
    from distill.export.runtime import RequestError

    full = gen.tokenizer.encode(gen.render(LONG), add_special_tokens=False).ids
    kept = gen.encode(LONG, 24, truncate=True)
    assert kept == full[-(1024 - 24) :]
    with pytest.raises(RequestError, match="past the model's 1024-token context"):
        gen.encode(LONG, 24)
    expected = gen.generate([LONG], 2, truncate=True)
    assert _answers(_cli(bundle, LONG, "--truncate", "--max-new-tokens", 2, "--jsonl")) == [
        {"question": LONG, "answer": expected[0]}
    ]


@pytest.mark.parametrize("question", ["", "   \n\t "])
def test_an_empty_question_is_refused(bundle, question):
    assert _one_error_line(_cli(bundle, question)) == "error: the question is empty — pass the text of a question"


def test_the_bundle_max_new_tokens_is_the_default(bundle, gen):
    q = "State the final answer: 12 + 7 - 3 ="
    longer = gen.generate([q], 12)[0]
    short = gen.generate([q], BUNDLE_MAX_NEW_TOKENS)[0]
    assert short != longer  # the check can tell the bundle's 3 tokens from more
    assert gen.generate([q])[0] == short
    assert _answers(_cli(bundle, q, "--jsonl")) == [{"question": q, "answer": short}]
    assert _answers(_cli(bundle, q, "--jsonl", "--max-new-tokens", 12)) == [{"question": q, "answer": longer}]


def test_seeded_sampling_is_reproducible_and_not_greedy(bundle, gen):
    q = "1 + 2 ="
    greedy = gen.generate([q], 8)[0]
    seed = next(s for s in range(20) if gen.generate([q], 8, temperature=1.0, seed=s)[0] != greedy)
    sampled = gen.generate([q], 8, temperature=1.0, seed=seed)[0]
    args = (bundle, q, "--jsonl", "--max-new-tokens", 8, "--temperature", 1.0, "--seed", seed)
    first, again = _answers(_cli(*args)), _answers(_cli(*args))
    assert first == again == [{"question": q, "answer": sampled}]
    assert _answers(_cli(bundle, q, "--jsonl", "--max-new-tokens", 8)) == [{"question": q, "answer": greedy}]
    line = _one_error_line(_cli(bundle, q, "--temperature", 1.0, "--top-p", 0))
    assert line.startswith("error: top_p is 0.0 — ")


def test_a_file_of_questions_gives_one_line_each(bundle, gen, tmp_path):
    questions = ["1 + 2 =", "State the final answer: 12 + 7 - 3 =", "4 - 1 ="]
    file = tmp_path / "questions.txt"
    file.write_text("\n".join([questions[0], "", questions[1], questions[2]]) + "\n")
    expected = gen.generate(questions, 12)
    res = _cli(bundle, "--input", file, "--max-new-tokens", 12)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [" ".join(a.splitlines()) for a in expected]
    from_stdin = _cli(bundle, "--input", "-", "--jsonl", "--max-new-tokens", 12, stdin=file.read_text())
    assert _answers(from_stdin) == [{"question": q, "answer": a} for q, a in zip(questions, expected)]


def test_a_bad_line_of_the_file_is_named_before_anything_runs(bundle, tmp_path):
    file = tmp_path / "questions.txt"
    file.write_text(f"1 + 2 =\n   \n{LONG}\n")
    line = _one_error_line(_cli(bundle, "--input", file))
    assert line.startswith(f"error: {file} line 3: the prompt is ")
    assert _one_error_line(_cli(bundle)) == (
        "error: infer takes one question or --input, not neither — pass a QUESTION argument, "
        "or --input FILE (one question a line, - for stdin)"
    )
    assert _one_error_line(_cli(bundle, "--input", tmp_path / "missing.txt")).startswith("error: --input ")


def test_an_older_bundle_takes_its_context_from_genai_config(bundle, tmp_path):
    """Format 2.0 bundles have no context_length in distill_generation.json; genai_config.json has it."""
    import shutil

    from distill.export.runtime import OnnxGenerator, RequestError

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    meta = json.loads((old / "distill_generation.json").read_text())
    del meta["context_length"]
    (old / "distill_generation.json").write_text(json.dumps({**meta, "format_version": "2.0"}))
    with pytest.raises(RequestError, match="past the model's 1024-token context"):
        OnnxGenerator(old).generate([LONG])
