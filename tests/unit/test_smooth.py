import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.export.smooth import calibrate, smooth, smoothable


def test_smoothing_preserves_outputs_and_flattens_outliers(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    assert smoothable(model)
    # Plant an outlier channel in the down-projection input, as real small LMs have.
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3] *= 40
    batches = [dict(tok(t, return_tensors="pt")) for t in ["12 + 7 - 3 =", "Let's think step by step."]]
    with torch.inference_mode():
        before = [model(**b).logits for b in batches]
    stats = calibrate(model, batches)
    spread_before = (stats["0.down"].max() / stats["0.down"].median()).item()
    assert smooth(model, stats, alpha=0.5) == 3 * model.config.num_hidden_layers
    with torch.inference_mode():
        after = [model(**b).logits for b in batches]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after))
    spread_after = (calibrate(model, batches)["0.down"].max() / calibrate(model, batches)["0.down"].median()).item()
    assert spread_after < spread_before / 4
