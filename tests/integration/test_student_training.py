"""Training students: LoRA merged before saving, and the train stage on a layer subset with LoRA."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import LoraSettings, Recipe, StudentConfig
from distill.students.lora import add_lora, merge_lora, trainable_parameters

pytestmark = pytest.mark.integration


def _ids(tok):
    return tok(["Let's think step by step. 12 + 7 = 19.", "0 1 2 3"], return_tensors="pt", padding=True)


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
