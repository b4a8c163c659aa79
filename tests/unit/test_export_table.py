"""One variant table for the console, the model card and the run report."""

from distill.export.gate import VariantResult
from distill.export.table import COLUMNS, variant_markdown, variant_rich_table, variant_table


def _results() -> list[VariantResult]:
    return [
        VariantResult(
            "fp32",
            "model.onnx",
            1_000_000,
            0.5,
            3,
            6,
            120.4,
            1.0,
            "4/4",
            lost=0,
            gained=0,
            first_token_ms=41.2,
            peak_rss_bytes=612_300_000,
        ),
        VariantResult(
            "int8",
            "model.int8.onnx",
            270_000,
            0.5,
            3,
            6,
            250.0,
            0.98,
            "4/4",
            lost=1,
            gained=1,
            chosen=True,
            gap_low=-0.3,
            gap_high=0.3,
            decision="int8 within tolerance: +0.0 points, 95% CI −30.0 … +30.0, tolerance 50.0",
        ),
        VariantResult("int4", "model.int4.onnx", 0, error="MatMulNBits [bits=4] failed | x"),
    ]


CELLS = [
    ["fp32", "1.0 MB", "1.000", "100.0%", "50.0% (3/6)", "—", "—", "120", "41", "612 MB", ""],
    ["int8", "0.3 MB", "0.270", "98.0%", "50.0% (3/6)", "−1 / +1", "+0.0 (−30.0…+30.0)", "250", "—", "—", "✓"],
    ["int4", "—", "—", "—", "MatMulNBits [bits=4] failed | x", "—", "—", "—", "—", "—", ""],
]


def test_cells_from_results_and_from_metrics_dicts():
    headers, rows = variant_table(_results())
    assert headers == [
        "variant",
        "size",
        "size / fp32",
        "top-1 vs torch",
        "accuracy",
        "vs fp32 (problems)",
        "gap, 95% CI (points)",
        "tokens/s (1 thread)",
        "first token (ms)",
        "peak RSS",
        "kept",
    ]
    assert rows == CELLS
    # metrics.json dicts give the same cells; an older run's dicts lack lost/gained: "—"
    dicts = [r.row() for r in _results()]
    assert variant_table(dicts)[1] == CELLS
    for d in dicts:
        del d["lost"], d["gained"], d["gap_low"], d["gap_high"]
    assert [r[5:7] for r in variant_table(dicts)[1]] == [["—", "—"]] * 3
    ungated = [{**d, "accuracy": None, "correct": None, "n": None, "tokens_per_second": None} for d in dicts[:2]]
    assert variant_table(ungated)[1][1] == ["int8", "0.3 MB", "0.270", "98.0%", "—", "—", "—", "—", "—", "—", "✓"]


def test_markdown_table():
    md = variant_markdown(_results())
    lines = md.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| fp32 | 1.0 MB | 1.000 | 100.0% | 50.0% (3/6) | — | — | 120 | 41 | 612 MB |  |"
    assert (
        lines[3] == "| int8 | 0.3 MB | 0.270 | 98.0% | 50.0% (3/6) | −1 / +1 | +0.0 (−30.0…+30.0) | 250 | — | — | ✓ |"
    )
    assert lines[4] == "| int4 | — | — | — | MatMulNBits [bits=4] failed \\| x | — | — | — | — | — |  |"  # pipe escaped
    assert lines[5] == "" and lines[6].startswith("top-1 vs torch: ")
    assert lines[7:] == [
        "",
        "Gate (a variant is kept when its interval's lower end is within the tolerance):",
        "- int8 within tolerance: +0.0 points, 95% CI −30.0 … +30.0, tolerance 50.0",
    ]


def test_rich_table_has_the_same_cells_and_fits_80_columns():
    import re

    from rich.console import Console

    from distill.export.table import SHORT_COLUMNS

    console = Console(record=True, width=80)
    console.print(variant_rich_table(_results()))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    header = next(ln for ln in text.splitlines() if ln.lstrip().startswith("variant"))
    assert re.split(r"\s{2,}", header.strip()) == list(SHORT_COLUMNS)
    for row in CELLS:  # every cell printed as is (no size ratio, the gap's interval only);
        # a failed variant's error folds onto the next lines
        line = next(ln for ln in text.splitlines() if ln.startswith(f" {row[0]} "))
        cells = re.split(r"\s{2,}", line.strip())
        short = [c.split("(")[-1].rstrip(")") if i == 6 else c for i, c in enumerate(row) if i not in (2, 8, 9)]
        if "failed" not in row[4]:
            assert cells == [c for c in short if c]
        else:
            assert cells[0] == row[0] and row[4].startswith(cells[3]) and "[bits=4] failed |" in text


def test_report_and_model_card_use_the_same_table(tmp_path):
    from distill.export.bundle import Provenance, model_card
    from distill.stages.report import write_report

    results = _results()
    exp = {
        "fp32_verify": {"max_abs_logit_error": 1e-5, "greedy_identical": 4, "prompts": 4},
        "chosen": "int8",
        "chosen_fp32_size_ratio": 0.27,
        "tolerance": 0.01,
        "variants": [r.row() for r in results],
    }
    md = write_report(tmp_path, {"name": "r"}, {"export": 12.0}, {"export": exp}, {})
    table = variant_markdown(results).rstrip()
    assert table in md
    card = model_card(
        Provenance("r", "hf:s", "rationale", "hf:t", "cot", "reasoning_gym:chain_sum", 12, "abcd"), results
    )
    assert card == (
        "# r: distilled student (int8 ONNX)\n"
        "\n"
        "- student: `hf:s`, fine-tuned on `rationale` targets\n"
        "- teacher: `hf:t` (cot), 12 kept rationales on `reasoning_gym:chain_sum`\n"
        "- recipe hash: `abcd` (full recipe in `distill_config.json`)\n"
        '- model file: `model.int8.onnx`; runs with onnxruntime + tokenizers only: `python distill_runtime.py . "question"`\n'
        "\n" + table + "\n"
    )
    sweep = [{"group": "down", "bytes": 2_000_000, "top1_agreement": 0.9}]
    assert model_card(Provenance("r", "hf:s", "rationale", "hf:t", "cot", "x:y", "?", "abcd"), results, sweep).endswith(
        "| down | 2 MB | 90.0% |\n\n"
    )
