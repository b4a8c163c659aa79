"""Student models: layer subsets (DistilBERT-style), models from a config, LoRA merged before saving."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import LoraSettings, Recipe, StudentConfig
from distill.core.errors import DistillError
from distill.students.architecture import keep_layers, model_from_config
from distill.students.lora import add_lora, merge_lora, trainable_parameters


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory):
    from tiny import build_model

    return build_model(tmp_path_factory.mktemp("four"), "llama", seed=5, layers=4)


def _ids(tok):
    return tok(["Let's think step by step. 12 + 7 = 19.", "0 1 2 3"], return_tensors="pt", padding=True)


def test_keeping_every_layer_changes_nothing(four_layer):
    tok = AutoTokenizer.from_pretrained(four_layer)
    ref = AutoModelForCausalLM.from_pretrained(four_layer).eval()
    cut = keep_layers(AutoModelForCausalLM.from_pretrained(four_layer).eval(), [0, 1, 2, 3])
    enc = _ids(tok)
    assert torch.equal(ref(**enc).logits, cut(**enc).logits)


def test_layer_subset_keeps_those_weights_and_saves_a_standalone_model(four_layer, tmp_path):
    tok = AutoTokenizer.from_pretrained(four_layer)
    ref = AutoModelForCausalLM.from_pretrained(four_layer).eval()
    cut = keep_layers(AutoModelForCausalLM.from_pretrained(four_layer).eval(), [0, 2])
    assert cut.config.num_hidden_layers == 2 and len(cut.model.layers) == 2
    for new, old in ((0, 0), (1, 2)):
        for (n1, p1), (n2, p2) in zip(
            cut.model.layers[new].named_parameters(), ref.model.layers[old].named_parameters()
        ):
            assert n1 == n2 and torch.equal(p1, p2)
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in ref.parameters())
    enc = _ids(tok)
    logits = cut(**enc).logits
    assert not torch.allclose(logits, ref(**enc).logits)
    cut.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 2
    assert torch.equal(again(**enc).logits, logits)
    # The KV cache is indexed by the new layer positions: cached and uncached greedy decoding agree.
    one = tok(["12 + 7"], return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cut.generate(**one, use_cache=True, **kw), cut.generate(**one, use_cache=False, **kw))


def test_layer_out_of_range_is_a_clear_error(four_layer):
    with pytest.raises(DistillError, match="out of range"):
        keep_layers(AutoModelForCausalLM.from_pretrained(four_layer), [0, 4])
    with pytest.raises(ValueError, match="increasing"):
        StudentConfig(layers=[2, 0])


def test_model_from_inline_config_is_seeded_and_checks_the_vocab():
    spec = 'config:{"model_type": "llama", "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}'
    a, b = model_from_config(spec, 300, seed=3), model_from_config(spec, 300, seed=3)
    assert a.config.num_hidden_layers == 1 and a.config.hidden_size == 32
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(DistillError, match="vocab_size 400 is smaller"):
        model_from_config(spec, 500)


def test_config_student_loads_with_a_tokenizer_from_another_source(tiny_student, tmp_path):
    from distill.students.models import load_student

    cfg = {"model_type": "llama", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64}
    cfg.update(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    model, tok = load_student(f"config:{tmp_path / 'c.json'}", f"hf:{tiny_student}", seed=0)
    assert model.config.vocab_size == 512 and tok.eos_token == "<|im_end|>"
    with pytest.raises(DistillError, match="needs a tokenizer"):
        load_student(f"config:{json.dumps(cfg)}")


def test_lora_trains_only_adapters_and_merged_logits_equal_peft_logits(tiny_student):
    from distill.students.data import tokenize_example
    from distill.students.trainer import train

    tok = AutoTokenizer.from_pretrained(tiny_student)
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    n_lora = trainable_parameters(model)
    assert 0 < n_lora < 0.2 * sum(p.numel() for p in model.parameters())
    examples = [tokenize_example(tok, f"Q: {i} + 1 =", f" Therefore, the answer is {i + 1}.", 64) for i in range(8)]
    cfg = StudentConfig(model="x", epochs=3, lr=1e-2, batch_size=4, micro_batch_size=4, warmup_ratio=0)
    result = train(model, examples, cfg, tok.pad_token_id)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    enc = _ids(tok)
    peft_logits = model(**enc).logits
    merged = merge_lora(model).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(**enc).logits, peft_logits, atol=1e-5)
    # Only the adapted projections changed; embeddings and norms are the base model's.
    after = merged.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], frozen["model.embed_tokens.weight"])
    assert not torch.equal(
        after["model.layers.0.self_attn.q_proj.weight"], frozen["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        after["model.layers.0.self_attn.k_proj.weight"], frozen["model.layers.0.self_attn.k_proj.weight"]
    )


def test_train_stage_with_layers_and_lora_saves_a_plain_smaller_model(four_layer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.stages.train import train_stage

    gen = tmp_path / "generate" / "dataset"
    gen.mkdir(parents=True)
    rows = [
        {"question": f"{i} + 1 =", "rationale": f"{i} plus one.", "gold": str(i + 1), "pred": str(i + 1)}
        for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(rows), gen / "train.parquet")
    recipe = Recipe.model_validate(
        {
            "task": {"answer_type": "number"},
            "student": {
                "model": f"hf:{four_layer}",
                "layers": [1, 3],
                "lora": {"r": 4, "alpha": 8},
                "epochs": 1,
                "batch_size": 2,
                "micro_batch_size": 2,
                "max_length": 64,
            },
        }
    )
    res = train_stage(recipe, tmp_path / "generate", tmp_path / "train")
    saved = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert saved.config.num_hidden_layers == 2
    assert not any("lora" in k for k in saved.state_dict())
    m = res.metrics
    assert (
        m["parameters"] == sum(p.numel() for p in saved.parameters())
        and m["trainable_parameters"] < m["parameters"] / 5
    )
