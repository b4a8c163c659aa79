"""Quantization-aware fine-tuning on a tiny real model: the phase trains the int4 export's model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import StudentConfig
from distill.students.data import collate, tokenize_example
from distill.students.losses import completion_cross_entropy
from distill.students.qat import QuantLayout, fake_quantized, quantization_aware_finetune, quantized_modules
from distill.students.trainer import train

pytestmark = pytest.mark.integration

# blocks of 16 on a 64-wide model: a coarse int4 grid, so its loss is far from the fp32 one
LAYOUT = QuantLayout(bits=4, block_size=16, group_block_sizes=(), embed_bits=8, embed_block_size=16)


def _examples(tok):
    return [
        tokenize_example(
            tok, f"Q: {i} + {i % 3} =", f" First {i} + {i % 3} = {i + i % 3}. The answer is {i + i % 3}.", 64
        )
        for i in range(12)
    ]


def _loss(model, examples, tok, layout=None) -> float:
    batch = collate(examples, tok.pad_token_id)
    with torch.inference_mode():
        if layout is None:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            with fake_quantized(model, layout):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_cross_entropy(logits.float(), batch["labels"])[0].item()


def _cfg(**qat):
    return StudentConfig(
        model="x", epochs=40, lr=3e-3, batch_size=4, micro_batch_size=4, seed=0, precision="fp32", save_every=0,
        qat={"steps": 9, "lr": 3e-3, **qat},
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    # One large weight per int4 block, as real LLM weights have outliers: it sets the block's scale and
    # the small weights round coarsely (on a random init int4 barely matters).
    g = torch.Generator().manual_seed(0)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (bits, block) in quantized_modules(model, LAYOUT).items():
            if bits == 4:
                w = modules[name].weight
                w[:, ::block] = 1.5 * torch.sign(torch.randn(w[:, ::block].shape, generator=g))
    train(model, _examples(tok), _cfg(), tok.pad_token_id)
    return model, tok


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_the_phase_lowers_the_int4_loss_more_than_as_many_plain_steps(trained, distill):
    """After training, the quantized model's loss is well above fp32's. The phase brings it down;
    the same number of plain steps at the same rate, then rounded (post-training int4), does not as far."""
    model, tok = trained
    ex = _examples(tok)
    ptq = _loss(model, ex, tok, LAYOUT)
    assert ptq > 1.5 * _loss(model, ex, tok)

    qat_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    cfg = _cfg(distill=distill)
    record = quantization_aware_finetune(qat_model, ex, cfg, tok.pad_token_id, LAYOUT)
    more = cfg.model_copy(update={"epochs": 3, "lr": 3e-3, "warmup_ratio": 0.0, "seed": 1})
    train(plain_model, ex, more, tok.pad_token_id)

    qat, plain = _loss(qat_model, ex, tok, LAYOUT), _loss(plain_model, ex, tok, LAYOUT)
    assert record["steps"] == 9 and record["modules"] == 7 * model.config.num_hidden_layers + 2
    assert qat < 0.7 * ptq and qat < 0.8 * plain
    # the weights stay full precision (the export rounds them), and the plain forward is back
    assert "forward" not in vars(qat_model.model.layers[0].mlp.down_proj)
    assert _loss(qat_model, ex, tok) != pytest.approx(qat, rel=1e-3)


def test_the_phase_scores_the_dev_split_through_the_grid(trained):
    model, tok = trained
    seen = []

    def dev(m):
        seen.append("forward" in vars(m.model.layers[0].self_attn.q_proj))  # called inside fake_quantized
        return {"dev_loss": 1.0, "dev_accuracy": 0.5}

    record = quantization_aware_finetune(
        copy.deepcopy(model), _examples(tok), _cfg(steps=2), tok.pad_token_id, LAYOUT, dev
    )
    assert seen == [True, True] and record["dev_before"]["dev_accuracy"] == 0.5 and "dev_after" in record
