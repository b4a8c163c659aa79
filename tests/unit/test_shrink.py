"""A smaller copy of the teacher (students/shrink.py): layers kept, heads pruned in whole KV groups,
MLP neurons pruned, by weight norm; the copy saves, reloads and exports like any model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from distill.config import FromTeacherSettings, StudentConfig, load_recipe
from distill.core.errors import DistillError
from distill.students.shrink import decode_speed, kv_group_scores, neuron_scores, prune_heads, prune_mlp, shrink


def _ids(tok):
    return tok(["Let's think step by step. 12 + 7 = 19.", "0 1 2 3"], return_tensors="pt", padding=True)


def _llama_params(vocab, hidden, layers, heads, kv, head_dim, inter):
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    return vocab * hidden + layers * (attn + 3 * hidden * inter + 2 * hidden) + hidden  # tied LM head


def test_shrunk_config_is_exact_and_round_trips(four_layer, tmp_path):
    tok = AutoTokenizer.from_pretrained(four_layer)
    model = shrink(AutoModelForCausalLM.from_pretrained(four_layer).eval(), [0, 2], num_heads=2, intermediate_size=40)
    c = model.config
    shape = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    assert [getattr(c, k) for k in shape] == [2, 2, 1, 16, 40]
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.v_proj.weight.shape == (16, 64) and attn.o_proj.weight.shape == (64, 32)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (40, 64) and mlp.down_proj.weight.shape == (64, 40)
    assert sum(p.numel() for p in model.parameters()) == _llama_params(len(tok), 64, 2, 2, 1, 16, 40)
    enc = _ids(tok)
    logits = model(**enc).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [getattr(again.config, k) for k in shape] == [2, 2, 1, 16, 40]
    assert torch.equal(again(**enc).logits, logits)
    one = tok(["12 + 7"], return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(again.generate(**one, use_cache=True, **kw), again.generate(**one, use_cache=False, **kw))


def test_qwen2_biases_follow_their_rows(tmp_path):
    from tiny import build_model

    folder = build_model(tmp_path / "q", "qwen2", seed=4)
    ref = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    kept = prune_heads(model, 2)
    for layer, old, groups in zip(model.model.layers, ref.model.layers, kept):
        rows = torch.cat([torch.arange(g * 16, (g + 1) * 16) for g in groups])  # head_dim 16, one KV head per group
        assert torch.equal(layer.self_attn.k_proj.bias, old.self_attn.k_proj.bias[rows])
        assert layer.self_attn.q_proj.bias.shape == (32,)
    model.save_pretrained(tmp_path / "out")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_key_value_heads == 1


def _silence(linear_rows=(), linear_cols=(), rows=(), cols=()):
    """Make the given rows tiny and columns zero, so their unit weighs least and contributes nothing."""
    with torch.no_grad():
        for linear in linear_rows:
            linear.weight[list(rows)] *= 0.01
        for linear in linear_cols:
            linear.weight[:, list(cols)] = 0.0


def test_pruning_keeps_the_largest_norm_heads_and_neurons(four_layer):
    """Per layer, one KV group and most MLP neurons are silenced (small inputs, zero outputs): pruning
    drops exactly those, and the pruned model computes what the full one did."""
    tok = AutoTokenizer.from_pretrained(four_layer)
    model = AutoModelForCausalLM.from_pretrained(four_layer).eval()
    drop_group = [0, 1, 1, 0]
    keep_neurons = [[3, 17, 90, 127], [0, 1, 2, 64], [5, 6, 7, 8], [100, 110, 120, 126]]
    for layer, g, keep in zip(model.model.layers, drop_group, keep_neurons):
        a, m = layer.self_attn, layer.mlp
        q, kv = range(g * 32, (g + 1) * 32), range(g * 16, (g + 1) * 16)  # 2 query heads of 16 per group
        _silence((a.q_proj,), (a.o_proj,), q, q)
        _silence((a.k_proj, a.v_proj), (), kv)
        drop = [i for i in range(128) if i not in keep]
        _silence((m.gate_proj, m.up_proj), (m.down_proj,), drop, drop)
        assert int(kv_group_scores(a, 4, 2, 16).argmin()) == g
        assert sorted(neuron_scores(m).topk(4).indices.tolist()) == keep
    enc = _ids(tok)
    full = model(**enc).logits
    assert prune_heads(model, 2) == [[1 - g] for g in drop_group]
    assert prune_mlp(model, 4) == keep_neurons
    assert torch.allclose(model(**enc).logits, full, atol=1e-5)


def test_without_gqa_single_heads_are_pruned():
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        ref.model.layers[0].self_attn.o_proj.weight[:, 8:16] *= 10  # head 1 (head_dim 8) weighs most
    scores = kv_group_scores(ref.model.layers[0].self_attn, 4, 4, 8)
    three, one = copy.deepcopy(ref), copy.deepcopy(ref)
    assert prune_heads(three, 3) == [sorted(scores.argsort(descending=True)[:3].tolist())]
    assert prune_heads(one, 1) == [[1]] and one.config.num_key_value_heads == 1
    attn, old = one.model.layers[0].self_attn, ref.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, old.q_proj.weight[8:16]) and torch.equal(
        attn.v_proj.weight, old.v_proj.weight[8:16]
    )
    assert torch.equal(attn.o_proj.weight, old.o_proj.weight[:, 8:16])


def test_shapes_that_do_not_fit_are_clear_errors(four_layer):
    model = AutoModelForCausalLM.from_pretrained(four_layer)
    with pytest.raises(
        DistillError, match=r"num_heads=3 does not fit .* 4 query heads in 2 KV groups of 2.*pick one of 2, 4"
    ):
        prune_heads(model, 3)
    with pytest.raises(DistillError, match="intermediate_size=500 is not between 1 and the teacher's 128"):
        prune_mlp(model, 500)
    with pytest.raises(DistillError, match=r"from_teacher.layers \[4\] out of range: the teacher has 4 layers"):
        shrink(model, [0, 4])
    from transformers import GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(DistillError, match="cannot prune the attention heads of this model: model type 'gpt2'") as e:
        prune_heads(gpt2, 1)
    assert "llama/qwen2/qwen3/mistral" in e.value.fix
    with pytest.raises(DistillError, match="cannot keep a layer subset of this 'gpt2' model"):
        shrink(gpt2, [0])


def test_fused_onnx_export_of_a_pruned_llama_matches_torch(tiny_student, tmp_path):
    from distill.export.bundle import FP32_FILE, write_bundle_files
    from distill.export.onnx_export import export_decoder
    from distill.export.verify import verify

    tok = AutoTokenizer.from_pretrained(tiny_student)
    shrink(AutoModelForCausalLM.from_pretrained(tiny_student), [1], num_heads=2, intermediate_size=48).save_pretrained(
        tmp_path / "model"
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    out = tmp_path / "bundle"
    assert export_decoder(model, out / FP32_FILE) == "fused"
    write_bundle_files(tok, model.config, out, 16, FP32_FILE, padding_side="right")
    questions = ["State the final answer: 3 + 4 =", "12 - 7 ="]
    v = verify(model, tok, out, FP32_FILE, questions, 8)
    assert v["max_abs_logit_error"] < 1e-4 and v["greedy_identical"] == len(questions)


def test_build_student_copies_the_teacher_with_its_tokenizer(tiny_student):
    from distill.students.models import build_student

    cfg = StudentConfig(model="unused", from_teacher=FromTeacherSettings(layers=[0], num_heads=2, intermediate_size=32))
    model, tok = build_student(cfg, f"hf:{tiny_student}")
    teacher_tok = AutoTokenizer.from_pretrained(tiny_student)
    assert tok.get_vocab() == teacher_tok.get_vocab()
    assert sum(p.numel() for p in model.parameters()) == _llama_params(len(tok), 64, 1, 2, 1, 16, 32)
    for source in ("replay:rows.jsonl", None):
        with pytest.raises(DistillError, match="student.from_teacher copies the teacher's weights"):
            build_student(cfg, source)
    speed = decode_speed(model, tok("12 + 7 =").input_ids, new_tokens=4)
    assert speed > 0 and torch.get_num_threads() == 1


def test_recipe_keys_are_validated():
    with pytest.raises(DistillError, match="teacher replay:x.jsonl has none"):
        load_recipe(None, ["teacher.model=replay:x.jsonl", "student.from_teacher.layers=[0]"])
    with pytest.raises(DistillError, match="choose the kept layers in student.from_teacher.layers"):
        load_recipe(None, ["student.layers=[0]", "student.from_teacher.num_heads=2"])
    with pytest.raises(DistillError, match="increasing"):
        load_recipe(None, ["student.from_teacher.layers=[2, 0]"])
    with pytest.raises(DistillError, match="student.from_teacher.num_heads"):
        load_recipe(None, ["student.from_teacher.num_heads=0"])
    r = load_recipe(None, ["student.from_teacher.intermediate_size=64"])
    assert r.student.from_teacher == FromTeacherSettings(intermediate_size=64)
