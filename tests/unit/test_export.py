import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.stages.export import FP32_FILE, verify, write_bundle_files
from export.onnx_export import export_decoder
from export.quantize import matmul_nodes, quantize_dynamic_int8, quantize_weight_only
from export.runtime import OnnxGenerator

QUESTIONS = ["State the final answer to the following arithmetic problem: 3 + 4 =", "12 - 7 =", "Calculate 2 + 2."]


@pytest.fixture(scope="module")
def bundle(tiny_student, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    tok = AutoTokenizer.from_pretrained(tiny_student)
    out = tmp_path_factory.mktemp("bundle")
    export_decoder(model, out / FP32_FILE)
    write_bundle_files(tok, model.config, out, 16, FP32_FILE)
    return model, tok, out


def test_onnx_matches_torch_logits_and_greedy_tokens(bundle):
    model, tok, out = bundle
    v = verify(model, tok, out, FP32_FILE, QUESTIONS, 12)
    assert v["max_abs_logit_error"] < 1e-4
    assert v["top1_agreement"] == 1.0
    assert v["greedy_identical"] == len(QUESTIONS)


def test_kv_cache_decoding_equals_full_recompute(bundle):
    model, tok, out = bundle
    gen = OnnxGenerator(out, FP32_FILE)
    prompt = tok(gen.render(QUESTIONS[0]), add_special_tokens=False).input_ids
    new = gen.generate_ids([prompt], 8)[0]
    # Recompute without cache: feed the whole sequence each step.
    ids = list(prompt)
    for _ in range(len(new)):
        with torch.inference_mode():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(prompt) :] == new


def test_batched_left_padded_generation_equals_single(bundle):
    _, _, out = bundle
    gen = OnnxGenerator(out, FP32_FILE)
    assert gen.generate(QUESTIONS, 10, batch_size=3) == [gen.generate([q], 10)[0] for q in QUESTIONS]


def test_int8_dynamic_quantizes_matmuls_except_kept(bundle):
    import onnx

    INT8_FILE = "model.int8_dynamic.onnx"
    _, _, out = bundle
    nodes = matmul_nodes(out / FP32_FILE)
    keep = nodes[:1]
    cfg = quantize_dynamic_int8(out / FP32_FILE, out / INT8_FILE, keep)
    assert cfg["nodes_kept_fp32"] == keep
    q = onnx.load(str(out / INT8_FILE))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") >= len(nodes) - 1 - 1
    assert keep[0] in [n.name for n in q.graph.node if n.op_type == "MatMul"]
    assert len(OnnxGenerator(out, INT8_FILE).generate(QUESTIONS[:1], 4)) == 1


def test_runtime_imports_no_torch(bundle):
    _, _, out = bundle
    code = (
        "import sys, json\n"
        "from export.runtime import OnnxGenerator\n"
        f"g = OnnxGenerator({str(out)!r}, {FP32_FILE!r})\n"
        "print(json.dumps({'text': g.generate(['1 + 1 ='], 4)[0], 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))\n"
    )
    res = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    )
    assert res["torch"] is False and res["transformers"] is False


def test_bundle_metadata(bundle):
    _, tok, out = bundle
    meta = json.loads((out / "distill_generation.json").read_text())
    assert meta["placeholder"] in meta["prompt_template"] and tok.eos_token_id in meta["eos_token_ids"]
    assert np.isfinite(meta["num_kv_heads"])


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_quantization_keeps_tokens(bundle, bits):
    import onnx

    model, tok, out = bundle
    name = f"model.int{bits}.onnx"
    nodes = matmul_nodes(out / FP32_FILE)
    cfg = quantize_weight_only(out / FP32_FILE, out / name, bits=bits, block_size=16, accuracy_level=4)
    assert cfg["bits"] == bits and cfg["op"] == "MatMulNBits"
    q = onnx.load(str(out / name))
    ops = [n.op_type for n in q.graph.node]
    # Every linear layer, plus the tied LM head now sharing the int8 embedding tensor.
    assert ops.count("MatMulNBits") == len(nodes) + 1 and ops.count("GatherBlockQuantized") == 1
    assert "Gather" not in ops and "tied_embedding" in cfg
    v = verify(model, tok, out, name, QUESTIONS, 8)
    # 8-bit blockwise barely moves a tiny random model; 4-bit may flip near-ties but mostly agrees.
    assert v["top1_agreement"] >= (0.95 if bits == 8 else 0.6)
    assert (out / name).stat().st_size < (out / FP32_FILE).stat().st_size
