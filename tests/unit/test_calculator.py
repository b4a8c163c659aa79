"""The decoding calculator: what it reads, what it refuses, and that every decoder (torch evaluation,
the ONNX runtime, a bundle's own copy in a bare environment) writes its values the same way."""

import json
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.core.calculator import CalculatorState, evaluate, forced_text, format_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\[ 8 + 2 =", " 10"),
        ("First, 8 + 2 = ", "10"),  # the model's own space is kept, not doubled
        ("Next, -3 - 8 =", " -11"),
        ("(3 + 4) \\times 2 =", " 14"),
        ("12 ÷ 4 × 3 =", " 9"),
        ("2 + 3 * 4 =", " 14"),  # precedence
        ("10 / 4 =", " 2.5"),
        ("10 / 3 =", " 3.3333"),
        ("$5 + 3 =", " 8"),
        ("18 − 3 =", " 15"),  # a Unicode minus
        ("so 0.1 + 0.2 =", " 0.3"),  # exact, not float
        ("x + 2 =", None),  # a variable
        ("3x + 2 =", None),
        ("1,200 + 5 =", None),  # a thousands separator: the visible "200 + 5" is not the sum
        ("2^3 + 1 =", None),
        ("7 =", None),  # no operator
        ("a =", None),
        ("5 / 0 =", None),
        ("18 puppies - 3 puppies =", None),
        ("8 + 2 =\n", None),  # the line went on
        ("2 - 5 - 3 - 0 = \\]", None),  # the model already moved past the "="
        ("The answer is 12.", None),
        ("9" * 20 + " + 1 =", None),  # past the digit bound
        ("(" * 12 + "1" + ")" * 12 + " + 1 =", None),  # past the nesting bound
        ("1 + (2 =", None),
        ("", None),
        ("3 4 + 1 =", None),  # two numbers side by side, not 34 + 1
        # LaTeX as the embedded teacher writes it: unit labels, currency, spacing and fractions
        ("\\[ 3 \\text{ hours (Monday)} + 5 \\text{ hours (Tuesday)} =", " 8"),
        ("\\text{Points} = \\frac{24 \\text{ pounds}}{3 \\text{ pounds per point}} =", " 8"),
        ("8 \\text{ hours} \\times \\$6 \\text{ per hour} =", " 48"),
        ("\\dfrac{3}{4} + 1 =", " 1.75"),
        ("\\frac{\\frac{1}{2}}{4} =", " 0.125"),
        ("\\left( 2 + 3 \\right) \\times 4 =", " 20"),
        ("\\text{Points for Bianca} =", None),  # no expression, only a label
        ("3 \\text{ boxes of } 4 + 1 =", None),  # a label between two numbers leaves them side by side
        ("\\[ 8 + 2 = 10 \\]\n\\[ 10 \\text{ apples} - 4 =", " 6"),  # only the line being written
    ],
)
def test_forced_text(text, expected):
    assert forced_text(text) == expected


def _tree():
    leaf = st.integers(0, 999).map(lambda n: (str(n), Fraction(n)))

    def combine(children):
        def node(a, op, b):
            if op == "/" and b[1] == 0:
                return a
            value = {"+": a[1] + b[1], "-": a[1] - b[1], "*": a[1] * b[1], "/": a[1] / b[1] if b[1] else 0}[op]
            return (f"({a[0]} {op} {b[0]})", value)

        return st.builds(node, children, st.sampled_from("+-*/"), children)

    return st.recursive(leaf, combine, max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(_tree())
def test_random_expressions_get_their_exact_value(tree):
    text, value = tree
    if "(" not in text:  # a lone number: nothing to compute
        assert forced_text(text + " =") is None
        return
    text = text[1:-1]  # the outer parentheses, as a model would not write them
    if len(text) > 120 or abs(value) > 10**15:
        return
    assert evaluate(text) == value
    assert forced_text(f"so {text} =") == " " + format_number(value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/×÷().= \n\\timesdivx,^")), max_size=200))
def test_any_model_output_is_read_or_left_alone_never_raises(text):
    out = forced_text(text)
    assert out is None or out.strip().lstrip("-").replace(".", "").isdigit()


def test_format_number():
    assert [format_number(Fraction(x)) for x in ("4", "-6", "5/2", "1/3", "-2/3", "1/100000")] == [
        "4",
        "-6",
        "2.5",
        "0.3333",
        "-0.6667",
        "0",
    ]


def test_state_writes_the_value_then_bans_digits_once():
    encode = lambda text: [ord(c) for c in text]  # noqa: E731 - one id per character
    state = CalculatorState(2, encode, number_tokens=[ord("0")])
    text = "so 3 + 4 ="
    written = []
    for _ in range(3):
        tok = state.next_forced(0, text)
        if tok is None:
            break
        written.append(chr(tok))
        text += chr(tok)
    assert "".join(written) == " 7" and state.blocks_digits(0)
    assert state.next_forced(0, text + ".") is None and not state.blocks_digits(0)
    assert state.next_forced(1, "nothing to do") is None and not state.blocks_digits(1)
    assert state.calls == 1


# --- the decoders, on a tiny model that has memorised a wrong sum -----------------------------------

WRONG = "Let's compute: 3 + 4 = 9 so the answer is 9."


@pytest.fixture(scope="module")
def wrong_adder(tiny_student, tmp_path_factory):
    """The tiny student trained until it writes ``WRONG`` for one question (greedy), and its bundle."""
    import torch
    from tiny import export_bundle
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.export.bundle import copy_runtime
    from distill.students.data import prompt_template, render_prompt

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    template = prompt_template(tok, "rationale")
    prompt = tok(render_prompt(template, "What is 3 + 4?"), add_special_tokens=False).input_ids
    target = tok(WRONG, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    out = tmp_path_factory.mktemp("calc_bundle")
    export_bundle(model, tok, out, 40, calculator=True)
    copy_runtime(out)
    return model, tok, template, out


def test_torch_and_onnx_decoders_write_the_calculators_value(wrong_adder):
    from distill.export.bundle import FP32_FILE
    from distill.export.runtime import OnnxGenerator
    from distill.students.evaluate import generate_torch

    model, tok, template, out = wrong_adder
    questions = ["What is 3 + 4?", "What is 3 + 4?"]  # a batch: every row gets its own state
    plain = generate_torch(model, tok, template, questions, 40, 2, "t", show_progress=False)
    assert plain[0].startswith(WRONG[:24])  # memorised: "... 3 + 4 = 9"
    calc = generate_torch(model, tok, template, questions, 40, 2, "t", show_progress=False, calculator=True)
    assert calc[0] == calc[1]
    assert calc[0].startswith("Let's compute: 3 + 4 = 7")
    assert not calc[0][len("Let's compute: 3 + 4 = 7") :][:1].isdigit()  # no "= 79"

    gen = OnnxGenerator(out, FP32_FILE)
    assert gen.calculator  # from the bundle's metadata
    assert gen.generate(questions, 40) == calc
    assert gen.calculator_writes >= 2
    assert gen.generate(questions[:1], 40, calculator=False) == plain[:1]


def test_a_bundles_runtime_brings_its_calculator(wrong_adder, tmp_path):
    """``python distill_runtime.py`` in a folder where distill is not importable uses the bundle's copy."""
    _, _, _, out = wrong_adder
    code = (
        "import sys, json, runpy\n"
        "sys.modules['distill'] = None  # as if distill were not installed: importing it fails\n"
        f"distill_runtime = type(sys)('distill_runtime'); distill_runtime.__dict__.update(runpy.run_path({str(out / 'distill_runtime.py')!r}))\n"
        "assert distill_runtime.CalculatorState.__module__ == 'distill_calculator'\n"
        f"g = distill_runtime.OnnxGenerator({str(out)!r})\n"
        "print(json.dumps(g.generate(['What is 3 + 4?'], 40)[0]))\n"
    )
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]).startswith("Let's compute: 3 + 4 = 7")


def test_infer_decodes_as_the_bundle_says_unless_told(wrong_adder):
    from typer.testing import CliRunner

    from distill.cli import app

    _, _, _, out = wrong_adder
    args = ["infer", str(out), "What is 3 + 4?", "--max-new-tokens", "40"]
    on, off = CliRunner().invoke(app, args), CliRunner().invoke(app, [*args, "--no-calculator"])
    assert on.exit_code == 0 and off.exit_code == 0, on.output + off.output
    assert on.output.startswith("Let's compute: 3 + 4 = 7") and off.output.startswith(WRONG[:24])
