import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import export_bundle
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.export.bundle import FP32_FILE
from distill.export.onnx_export import export_decoder
from distill.export.quantize import matmul_nodes, quantize_dynamic_int8, quantize_weight_only
from distill.export.runtime import OnnxGenerator
from distill.export.verify import verify

QUESTIONS = ["State the final answer to the following arithmetic problem: 3 + 4 =", "12 - 7 =", "Calculate 2 + 2."]


@pytest.fixture(scope="module")
def bundle(tiny_student, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    tok = AutoTokenizer.from_pretrained(tiny_student)
    out = tmp_path_factory.mktemp("bundle")
    assert export_bundle(model, tok, out) == "fused"  # a llama: one GroupQueryAttention node per layer
    return model, tok, out


@pytest.fixture(scope="module")
def generic_bundle(bundle, tmp_path_factory):
    model, tok, _ = bundle
    out = tmp_path_factory.mktemp("generic")
    assert export_bundle(model, tok, out, attention="generic") == "generic"
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


def test_batched_generation_equals_single(bundle, generic_bundle):
    """Prompts of different lengths in one batch: right-padded for the fused export, left-padded for
    the generic one; every row decodes as it would alone, and both layouts write the same tokens."""
    texts = {}
    for name, (_, _, out) in {"fused": bundle, "generic": generic_bundle}.items():
        gen = OnnxGenerator(out, FP32_FILE)
        assert gen.right_pad == (name == "fused")
        texts[name] = gen.generate(QUESTIONS, 10, batch_size=3)
        assert texts[name] == [gen.generate([q], 10)[0] for q in QUESTIONS]
    assert texts["fused"] == texts["generic"]


def test_fused_export_is_one_node_per_attention_and_norm(bundle, generic_bundle):
    import collections

    import onnx

    model, tok, out = bundle
    n_layers = model.config.num_hidden_layers
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / FP32_FILE)).graph.node)
    assert ops["GroupQueryAttention"] == n_layers and ops["SimplifiedLayerNormalization"] == 2 * n_layers + 1
    assert "Softmax" not in ops and ops["Transpose"] <= 1  # at most the tied LM head's weight
    generic = sum(
        collections.Counter(n.op_type for n in onnx.load(str(generic_bundle[2] / FP32_FILE)).graph.node).values()
    )
    assert sum(ops.values()) < generic / 2
    v = verify(model, tok, generic_bundle[2], FP32_FILE, QUESTIONS, 12)
    assert v["max_abs_logit_error"] < 1e-4 and v["greedy_identical"] == len(QUESTIONS)


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("qwen2", {}),  # q/k/v biases
        ("qwen3", {"head_dim": 16}),  # per-head q/k RMSNorm before the rotation
        ("mistral", {"sliding_window": None}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
    ],
)
def test_fused_export_of_each_supported_architecture(arch, extra, tmp_path):
    """Each architecture the fused layout claims exports to it and matches torch, batched and alone."""
    from tiny import build_model

    folder = build_model(tmp_path / arch, arch, seed=3, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert export_bundle(model, tok, tmp_path) == "fused"
    v = verify(model, tok, tmp_path, FP32_FILE, QUESTIONS, 12)
    assert v["max_abs_logit_error"] < 1e-4 and v["greedy_identical"] == len(QUESTIONS)


def test_unsupported_architectures_take_the_generic_export():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from distill.export.gqa import unsupported_reason

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="fused attention export does not support model type 'gpt2'"):
        export_decoder(gpt2, Path("/nonexistent/model.onnx"), attention="fused")
    from distill.core.errors import DistillError
    from distill.stages.export import check_attention

    with pytest.raises(DistillError, match="export.attention=fused cannot export this student: model type 'gpt2'"):
        check_attention(gpt2, "fused")
    check_attention(gpt2, "auto")  # auto falls back to the generic export quietly
    windowed = MistralForCausalLM(
        MistralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=16,
        )
    )
    assert unsupported_reason(windowed) == "sliding-window attention"


def test_fused_reference_op_matches_the_hf_model_on_a_right_padded_batch(bundle):
    """The torch reference of the fused attention (what the ONNX node computes) reproduces the HF
    model for each row of a right-padded batch, in the prompt pass and in cached decoding steps."""
    from distill.export.gqa import FusedDecoder
    from distill.export.onnx_export import kv_shape

    model = bundle[0]
    n_layers, kv_heads, head_dim = kv_shape(model.config)
    fused = FusedDecoder(model).eval()
    rows = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids = torch.tensor([r + [0] * (5 - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in rows])
    past = [torch.zeros(2, kv_heads, 0, head_dim) for _ in range(2 * n_layers)]
    with torch.inference_mode():
        logits, *past = fused(ids, mask, torch.zeros_like(ids), *past)
        last = logits[torch.arange(2), torch.tensor([4, 2])]
        for _ in range(3):
            for r in range(2):
                ref = model(torch.tensor([rows[r]])).logits[0, -1]
                assert torch.allclose(last[r], ref, atol=1e-4)
            nxt = last.argmax(-1)
            for r in range(2):
                rows[r].append(int(nxt[r]))
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            logits, *past = fused(nxt[:, None], mask, torch.zeros_like(nxt[:, None]), *past)
            last = logits[:, -1]


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


def test_runtime_imports_no_torch(bundle, tmp_path):
    _, _, out = bundle
    code = (
        "import sys, json\n"
        "from distill.export.runtime import OnnxGenerator\n"
        f"g = OnnxGenerator({str(out)!r}, {FP32_FILE!r})\n"
        "print(json.dumps({'text': g.generate(['1 + 1 ='], 4)[0], 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))\n"
    )
    res = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout.splitlines()[-1]
    )
    assert res["torch"] is False and res["transformers"] is False
    assert res["text"] == OnnxGenerator(out, FP32_FILE).generate(["1 + 1 ="], 4)[0]


def test_bundle_metadata(bundle):
    model, tok, out = bundle
    meta = json.loads((out / "distill_generation.json").read_text())
    assert meta["placeholder"] in meta["prompt_template"] and tok.eos_token_id in meta["eos_token_ids"]
    c = model.config
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (
        c.num_hidden_layers,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
    )


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
    inits = {i.name for i in q.graph.initializer}
    assert "tied_embedding" in cfg  # and no fp32 embedding table is gathered from any more:
    assert not [n for n in q.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    v = verify(model, tok, out, name, QUESTIONS, 8)
    # 8-bit blockwise barely moves a tiny random model; 4-bit may flip near-ties but mostly agrees.
    assert v["top1_agreement"] >= (0.95 if bits == 8 else 0.6)
    assert (out / name).stat().st_size < (out / FP32_FILE).stat().st_size


# --- static int8, calibration, sensitivity, size options, ORT format, bundle format version ---


@pytest.fixture(scope="module")
def calib(bundle, tmp_path_factory):
    """Calibration feeds built from a distilled-dataset-shaped parquet through the chat template."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.core.answers import Task
    from distill.export.calibration import calibration_ids, feeds_for

    model, tok, out = bundle
    rows = [
        {"question": f"{a} + {b} =", "rationale": f"First {a} + {b} = {a + b}.", "pred": str(a + b), "gold": str(a + b)}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 3), (6, 5)]
    ]
    parquet = tmp_path_factory.mktemp("data") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    ids = calibration_ids(tok, parquet, "rationale", Task("number"), n=8, max_length=64)
    cfg = model.config
    return ids, feeds_for(out / FP32_FILE, ids, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)


def test_calibration_ids_are_training_examples_through_the_chat_template(bundle, calib):
    _, tok, _ = bundle
    ids, feeds = calib
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "1 + 2 ="}], add_generation_prompt=True, tokenize=False
    )
    target = "Let's think step by step. First 1 + 2 = 3.\nTherefore, the answer is 3."
    assert ids[0] == tok(prompt + target, add_special_tokens=False).input_ids + [tok.eos_token_id] or ids[0] == (
        tok(prompt, add_special_tokens=False).input_ids + tok(target, add_special_tokens=False).input_ids
    ) + [tok.eos_token_id]
    assert len(feeds) == 8 and feeds[0]["input_ids"].shape == (1, len(ids[0]))
    assert feeds[0]["past_key_values.0.key"].shape[2] == 0  # prefill path: empty past


def test_int8_static_is_qdq_calibrated_and_keeps_excluded_nodes(bundle, calib):
    import onnx

    from distill.export.quantize import linear_groups, quantize_static_int8
    from distill.export.sensitivity import prefill_top1, top1_agreement

    model, tok, out = bundle
    _, feeds = calib
    groups = linear_groups(out / FP32_FILE, model.config.num_hidden_layers)
    assert list(groups) == ["q", "k", "v", "o", "gate", "up", "down"]
    cfg = quantize_static_int8(out / FP32_FILE, out / "model.int8_static.onnx", feeds, exclude=groups["down"])
    assert cfg["calibration_examples"] == len(feeds) and cfg["nodes_kept_fp32"] == sorted(groups["down"])
    q = onnx.load(str(out / "model.int8_static.onnx"))
    ops = [n.op_type for n in q.graph.node]
    inits = {i.name: i for i in q.graph.initializer}
    # every non-excluded linear layer has an int8 per-channel weight behind a DequantizeLinear
    int8_weights = [
        i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 and 1 not in i.dims
    ]
    assert len(int8_weights) == 6 * model.config.num_hidden_layers
    per_channel_scales = [
        n
        for n in q.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8
        and len(inits[n.input[1]].dims) == 1
    ]
    assert len(per_channel_scales) == len(int8_weights)
    assert ops.count("QuantizeLinear") >= 6 * model.config.num_hidden_layers  # static activation ranges
    kept = {n.name for n in q.graph.node if n.op_type == "MatMul"}
    assert set(groups["down"]) <= kept
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1  # shared int8 embedding
    reference = prefill_top1(out / FP32_FILE, feeds)
    assert top1_agreement(out / "model.int8_static.onnx", feeds, reference) >= 0.9
    # decodes through the KV-cache path with the ranges calibrated on the prefill path
    v = verify(model, tok, out, "model.int8_static.onnx", QUESTIONS, 8)
    assert v["top1_agreement"] >= 0.9


def test_group_sensitivity_ranks_a_broken_group_first(bundle, calib):
    import shutil
    from functools import partial

    import onnx
    from onnx import numpy_helper

    from distill.export.quantize import linear_groups, quantize_weight_only
    from distill.export.sensitivity import group_sensitivity, markdown_table, sensitive_groups

    model, _, out = bundle
    _, feeds = calib
    groups = linear_groups(out / FP32_FILE, model.config.num_hidden_layers)
    others = [n for g, nodes in groups.items() if g != "up" for n in nodes]

    def blow_up_down(src, dst):  # a "quantizer" that destroys the down projections
        m = onnx.load(str(src))
        inits = {i.name: i for i in m.graph.initializer}
        for node in m.graph.node:
            if node.name in groups["down"]:
                w = inits[node.input[1]]
                w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1000, w.name))
        onnx.save(m, str(dst))

    builders = {
        "identity": lambda src, dst: shutil.copy(src, dst),
        "down": blow_up_down,
        "up": partial(quantize_weight_only, bits=8, block_size=16, exclude=others, embed_block_size=None),
    }
    rows = group_sensitivity(out / FP32_FILE, builders, feeds)
    by = {r["group"]: r for r in rows}
    assert rows[0]["group"] == "down" and by["down"]["top1_agreement"] < 0.9
    assert by["identity"]["top1_agreement"] == 1.0 and by["up"]["top1_agreement"] >= 0.95
    assert by["up"]["bytes"] < by["identity"]["bytes"]
    assert sensitive_groups(rows, 0.9) == ["down"]
    assert "| down |" in markdown_table(rows, "test")


def test_block_size_per_group_and_embedding(bundle):
    import onnx

    from distill.export.quantize import linear_groups, quantize_weight_only

    model, _, out = bundle
    groups = linear_groups(out / FP32_FILE, model.config.num_hidden_layers)
    mlp = {n: 64 for g in ("gate", "up", "down") for n in groups[g]}
    cfg = quantize_weight_only(
        out / FP32_FILE, out / "m.blocks.onnx", 8, 16, 4, node_block_sizes=mlp, embed_block_size=32
    )
    q = onnx.load(str(out / "m.blocks.onnx"))
    blocks = {
        n.name: next(a.i for a in n.attribute if a.name == "block_size")
        for n in q.graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    mlp_q = [b for name, b in blocks.items() if name.removesuffix("_Q8") in mlp]
    attn_q = [b for name, b in blocks.items() if name.removesuffix("_Q8") in groups["q"] + groups["o"]]
    assert mlp_q == [64] * len(mlp) and set(attn_q) == {16}
    assert sorted(b for name, b in blocks.items() if name.endswith("_q8")) == [32, 32]  # Gather + LM head
    assert "block 32" in cfg["tied_embedding"]
    # the shared embedding stores one scale tensor and no zero points; no exporter metadata left
    names = [i.name for i in q.graph.initializer]
    assert sum(n.endswith("_q8_scales") for n in names) == 1 and not any(n.endswith("_zp") for n in names)
    assert not any(n.metadata_props for n in q.graph.node)
    smaller = quantize_weight_only(out / FP32_FILE, out / "m.b16.onnx", 8, 16, 4)
    assert smaller["node_block_sizes"] == {}
    assert (out / "m.blocks.onnx").stat().st_size < (out / "m.b16.onnx").stat().st_size


def test_exported_model_has_no_exporter_metadata(bundle):
    import onnx

    _, _, out = bundle
    m = onnx.load(str(out / FP32_FILE), load_external_data=False)
    assert not any(n.metadata_props for n in m.graph.node)


def test_ort_format_model_loads_in_the_runtime(bundle):
    from distill.export.onnx_export import save_ort_format

    _, _, out = bundle
    save_ort_format(out / FP32_FILE, out / "model.ort")
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # flatbuffers file identifier
    onnx_gen, ort_gen = OnnxGenerator(out, FP32_FILE), OnnxGenerator(out, "model.ort")
    assert ort_gen.generate(QUESTIONS, 8, batch_size=3) == onnx_gen.generate(QUESTIONS, 8, batch_size=3)


def test_bundle_of_another_major_format_is_refused(bundle, tmp_path):
    import shutil

    from distill.export.runtime import FORMAT_VERSION, BundleFormatError

    _, _, out = bundle
    assert json.loads((out / "distill_generation.json").read_text())["format_version"] == FORMAT_VERSION
    other = tmp_path / "b"
    shutil.copytree(out, other)
    meta = json.loads((other / "distill_generation.json").read_text())
    minor = f"{FORMAT_VERSION.split('.')[0]}.{int(FORMAT_VERSION.split('.')[1]) + 1}"
    (other / "distill_generation.json").write_text(json.dumps({**meta, "format_version": minor}))
    assert len(OnnxGenerator(other, FP32_FILE).generate(QUESTIONS[:1], 2)) == 1  # a newer minor still loads
    (other / "distill_generation.json").write_text(json.dumps({**meta, "format_version": "99.0"}))
    with pytest.raises(BundleFormatError, match="format 99.0"):
        OnnxGenerator(other, FP32_FILE)
    from distill.export.runtime import main

    assert main([str(other), "1 + 1 ="]) == 2  # `distill infer` on it: tests/integration/test_cli.py


def test_export_config_block_sizes_must_be_powers_of_two():
    from pydantic import ValidationError

    from distill.config import ExportConfig

    assert ExportConfig().group_block_sizes == {"gate": 64, "up": 64, "down": 64}
    with pytest.raises(ValidationError, match="group_block_sizes"):
        ExportConfig(group_block_sizes={"down": 48})
    with pytest.raises(ValidationError, match="embed_block_size"):
        ExportConfig(embed_block_size=96)
    with pytest.raises(ValidationError):
        ExportConfig(group_block_sizes={"lm_head": 64})  # not a projection group


def test_int8_static_histogram_calibration_takes_prompts_of_different_lengths(bundle, calib):
    from distill.export.calibration import prefill_feed
    from distill.export.quantize import quantize_static_int8
    from distill.export.sensitivity import prefill_top1, top1_agreement

    model, _, out = bundle
    ids, feeds = calib
    past = [k for k in feeds[0] if k.startswith("past_key_values")]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    feeds = feeds + [prefill_feed(ids[0] + ids[1], past, model.config.num_key_value_heads, head_dim)]
    assert len({f["input_ids"].shape[1] for f in feeds}) > 1
    cfg = quantize_static_int8(out / FP32_FILE, out / "m.pct.onnx", feeds, calibrate_method="Percentile")
    assert cfg["calibrate_method"] == "Percentile"
    assert top1_agreement(out / "m.pct.onnx", feeds, prefill_top1(out / FP32_FILE, feeds)) >= 0.8


def test_paired_changes_count_the_discordant_problems():
    from distill.export.gate import changes_cell, paired_changes

    fp32 = [True, True, False, False, True]
    int8 = [True, False, True, False, False]
    assert paired_changes(fp32, int8) == (2, 1)  # accuracy 3/5 vs 2/5: two lost, one gained
    assert paired_changes(fp32, fp32) == (0, 0)
    with pytest.raises(ValueError, match="same problems"):
        paired_changes(fp32, int8[:3])
    assert changes_cell("int8", 2, 1) == "−2 / +1"
    assert changes_cell("fp32", 0, 0) == "—"
    assert changes_cell("int8", None, None) == "—"  # no gate run, or a report of an older run


def test_gemv_ceiling_bench_multiplies_the_exported_models_matrices(bundle):
    """bench/gemv_ceiling.py stands for one decoded token's weight traffic: its matrices must be the
    exported graph's (every constant-weight MatMul, plus the tied LM head read through a Transpose)."""
    import importlib.util

    import onnx
    from onnx import numpy_helper

    spec = importlib.util.spec_from_file_location(
        "gemv_ceiling", Path(__file__).parents[2] / "bench" / "gemv_ceiling.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, _, out = bundle
    graph = onnx.load(str(out / FP32_FILE)).graph
    inits = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    transposed = {
        n.output[0]: inits[n.input[0]][::-1] for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits
    }
    exported = sorted(
        inits.get(n.input[1]) or transposed[n.input[1]]
        for n in graph.node
        if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in transposed)
    )
    assert sorted(bench.shapes(model.config.to_dict()).values()) == exported
    assert len(exported) == 7 * model.config.num_hidden_layers + 1
