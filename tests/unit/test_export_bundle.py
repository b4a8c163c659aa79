"""The bundle pieces of the export library: file names, genai config, the assembled device folder,
the gate's scoring of every variant, and SmoothQuant's calibration text."""

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distill.export.bundle import (
    FP32_FILE,
    assemble_bundle,
    genai_config,
    model_bytes,
    variant_file,
    write_bundle_files,
)


def test_file_names_and_sizes(tmp_path):
    assert variant_file("fp32") == FP32_FILE == "model.onnx"
    assert variant_file("int8_static") == "model.int8_static.onnx"
    (tmp_path / "a.onnx").write_bytes(b"x" * 10)
    assert model_bytes(tmp_path, "a.onnx") == 10
    (tmp_path / "a.onnx.data").write_bytes(b"y" * 5)
    assert model_bytes(tmp_path, "a.onnx") == 15


def test_genai_config_of_the_tiny_student(tiny_student, tmp_path):
    config = AutoConfig.from_pretrained(tiny_student)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    meta = write_bundle_files(tok, config, tmp_path, 16, "model.int8.onnx", padding_side="right")
    g = genai_config(config, meta, 1024)
    assert g["model"]["decoder"]["filename"] == "model.int8.onnx"
    assert (g["model"]["decoder"]["num_hidden_layers"], g["model"]["decoder"]["num_key_value_heads"]) == (2, 2)
    assert (g["model"]["decoder"]["head_size"], g["model"]["decoder"]["hidden_size"]) == (16, 64)
    assert g["model"]["eos_token_id"] == tok.eos_token_id and g["model"]["pad_token_id"] == tok.pad_token_id
    assert g["model"]["bos_token_id"] == tok.pad_token_id  # no bos in the config: the pad id
    assert g["model"]["type"] == "llama" and g["model"]["vocab_size"] == config.vocab_size
    assert g["search"]["max_length"] == g["model"]["context_length"] == 1024 and g["search"]["top_k"] == 1


def test_assemble_bundle_writes_the_device_folder(tiny_student, tmp_path):
    import distill.export.runtime as runtime
    from distill.core.artifacts import CONFIG_FILE

    config = AutoConfig.from_pretrained(tiny_student)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    variants = tmp_path / "variants"
    variants.mkdir()
    (variants / "model.int8.onnx").write_bytes(b"graph")
    (variants / "model.int8.onnx.data").write_bytes(b"weights")
    (variants / "model.int4.onnx").write_bytes(b"other")
    bundle = tmp_path / "bundle"
    qconfig = {"preset": "int8", "bits": 8}
    meta = assemble_bundle(
        variants,
        bundle,
        "model.int8.onnx",
        tok,
        config,
        max_new_tokens=24,
        fmt="rationale",
        padding_side="right",
        quant_config=qconfig,
        card="# card\n",
    )
    files = {p.name for p in bundle.iterdir()}
    assert {"model.int8.onnx", "model.int8.onnx.data", "distill_generation.json", "genai_config.json"} <= files
    assert {"quantization_config.json", "distill_runtime.py", "README.md", "tokenizer.json"} <= files
    assert "model.int4.onnx" not in files and CONFIG_FILE not in files  # the stage writes its own config
    assert (bundle / "model.int8.onnx.data").read_bytes() == b"weights"
    assert json.loads((bundle / "distill_generation.json").read_text()) == meta
    assert meta["model_file"] == "model.int8.onnx" and meta["max_new_tokens"] == 24 and meta["padding_side"] == "right"
    assert "ort_model_file" not in meta
    assert json.loads((bundle / "genai_config.json").read_text()) == genai_config(config, meta, 1024)
    assert json.loads((bundle / "quantization_config.json").read_text()) == qconfig
    assert (bundle / "distill_runtime.py").read_bytes() == open(runtime.__file__, "rb").read()
    assert (bundle / "README.md").read_text() == "# card\n"
    # fp32 has no quantization config
    fp32 = tmp_path / "fp32"
    assemble_bundle(
        variants, fp32, "model.int4.onnx", tok, config, max_new_tokens=8, fmt="rationale", padding_side="left"
    )
    assert not (fp32 / "quantization_config.json").exists() and not (fp32 / "README.md").exists()


def test_score_variants_fills_accuracy_and_paired_changes(monkeypatch, tmp_path):
    import distill.export.gate as gate
    from distill.export.gate import VariantResult, score_variants

    outcomes = {"model.onnx": [True, True, False, True], "model.int8.onnx": [True, False, True, False]}

    def fake_score(folder, file, problems, task, max_new_tokens, batch_size, label, reference=None, tolerance=None):
        rows = [{"id": p["id"], "correct": c} for p, c in zip(problems, outcomes[file])]
        correct = sum(outcomes[file])
        return {"accuracy": correct / 4, "correct": correct, "n": 4, "tokens_per_second": 100.0 + correct}, rows

    monkeypatch.setattr(gate, "score_variant", fake_score)
    results = [
        VariantResult("fp32", "model.onnx", 100),
        VariantResult("int8", "model.int8.onnx", 30),
        VariantResult("int4", "model.int4.onnx", 0, error="failed"),
    ]
    problems = [{"id": str(i), "question": "q", "gold": "1"} for i in range(4)]
    rows = score_variants(results, tmp_path, problems, None, 16, 2)
    assert set(rows) == {"fp32", "int8"} and [r["correct"] for r in rows["int8"]] == outcomes["model.int8.onnx"]
    fp32, int8, int4 = results
    assert (fp32.accuracy, fp32.correct, fp32.n, fp32.lost, fp32.gained) == (0.75, 3, 4, 0, 0)
    assert (int8.accuracy, int8.correct, int8.tokens_per_second, int8.lost, int8.gained) == (0.5, 2, 102.0, 2, 1)
    assert int4.accuracy is None and int4.lost is None  # a failed variant is not scored
    assert (fp32.gap_low, fp32.gap_high) == (0.0, 0.0) and int8.gap_low < -0.25 < int8.gap_high < 1


def test_smoothquant_calibrates_on_prompt_and_rationale(tiny_student):
    from distill.export.smooth import calibration_texts, smooth_on_texts
    from distill.students.data import prompt_template, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    rows = [{"question": "1 + 2 =", "rationale": "First 1 + 2 = 3."}, {"question": "4 - 1 =", "rationale": "3."}]
    texts = calibration_texts(tok, rows)
    template = prompt_template(tok)
    assert texts == [render_prompt(template, "1 + 2 =") + "First 1 + 2 = 3.", render_prompt(template, "4 - 1 =") + "3."]
    assert texts[0] == "<|im_start|>user\n1 + 2 =<|im_end|>\n<|im_start|>assistant\nFirst 1 + 2 = 3."
    ids = tok(texts[0], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        before = model(ids).logits
    assert smooth_on_texts(model, tok, texts, 0.5) == 3 * model.config.num_hidden_layers
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))  # scales folded in
