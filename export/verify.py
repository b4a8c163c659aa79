"""An exported ONNX file checked against the torch model it came from, on real prompts."""

from __future__ import annotations

from pathlib import Path


def verify(model, tokenizer, folder: Path, model_file: str, questions: list[str], max_new_tokens: int) -> dict:
    """Compare ``folder/model_file`` (run by the torch-free runtime) against ``model``; returns
    ``max_abs_logit_error`` over the prompt pass of every question, ``top1_agreement`` (share of prompt
    positions whose argmax matches), ``greedy_identical`` (questions whose greedy continuation of up to
    ``max_new_tokens`` is the same text) and ``prompts``."""
    import numpy as np
    import torch

    from distill.export.runtime import OnnxGenerator
    from distill.students.evaluate import generate_torch

    gen = OnnxGenerator(folder, model_file)
    max_err, agree, total = 0.0, 0, 0
    for q in questions:
        ids = tokenizer(gen.render(q), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = model(ids).logits[0].float().numpy()
        n = ids.shape[1]
        past = [np.zeros((1, gen.kv_heads, 0, gen.head_dim), gen.kv_dtype) for _ in gen.past_names]
        got, _ = gen.step(ids.numpy(), np.ones((1, n), np.int64), np.arange(n)[None], past)
        max_err = max(max_err, float(np.abs(got[0] - ref).max()))
        agree += int((got[0].argmax(-1) == ref.argmax(-1)).sum())
        total += n
    torch_out = generate_torch(model, tokenizer, gen.meta["prompt_template"], questions, max_new_tokens, 8, "verify")
    onnx_out = gen.generate(questions, max_new_tokens)
    same = sum(a == b for a, b in zip(torch_out, onnx_out))
    return {
        "max_abs_logit_error": max_err,
        "top1_agreement": agree / total,
        "greedy_identical": same,
        "prompts": len(questions),
    }
