"""Student models: layer subsets (DistilBERT-style), models from a config, loading rules. Training a
student (LoRA, the train stage) is in tests/integration/test_student_training.py."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import StudentConfig
from distill.core.errors import DistillError
from distill.students.architecture import keep_layers, model_from_config


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


def test_pickle_only_student_is_refused(tmp_path, tiny_student):
    import shutil

    from safetensors.torch import load_file

    from distill.students.models import load_student

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_student, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DistillError, match=f"^{re.escape(str(folder))} has no loadable safetensors weights"):
        load_student(f"hf:{folder}")
