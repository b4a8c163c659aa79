"""Stage 3 — export: the trained student to ONNX with KV cache, quantized, in a runnable bundle.

Verified after export: logits vs torch on real prompts (max abs error) and greedy tokens identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import write_config, write_json
from distill.progress import console
from export.runtime import GENERATION_FILE

FP32_FILE = "model.onnx"


@dataclass
class ExportResult:
    dir: Path
    bundle: Path
    metrics: dict


def default_fp32_nodes(model_path: Path, n_layers: int) -> list[str]:
    """MatMuls kept in fp32 by default: the ones our sensitivity sweep found quantization breaks."""
    from export.quantize import matmul_nodes

    nodes = matmul_nodes(model_path)  # the lm_head may or may not be among them (tied weights)
    per_layer = len(nodes) // n_layers if n_layers else 0
    keep = []
    if per_layer == 7 and len(nodes) - 7 * n_layers in (
        0,
        1,
    ):  # q, k, v, o, gate, up, down per layer (Llama/Qwen/Mistral-style blocks)
        keep += [nodes[7 * i + 6] for i in range(n_layers)]  # down_proj: large activation outliers
    return keep


def write_bundle_files(tokenizer, config, bundle: Path, max_new_tokens: int, model_file: str) -> dict:
    """Tokenizer + generation metadata a torch-free runtime needs; returns the metadata."""
    from export.onnx_export import kv_shape
    from students.data import PLACEHOLDER, prompt_template

    tokenizer.save_pretrained(bundle)
    n_layers, kv_heads, head_dim = kv_shape(config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    meta = {
        "prompt_template": prompt_template(tokenizer),
        "placeholder": PLACEHOLDER,
        "eos_token_ids": sorted({*eos, tokenizer.eos_token_id} - {None}),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "num_layers": n_layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "max_new_tokens": max_new_tokens,
        "model_file": model_file,  # the variant runtimes load by default
    }
    write_json(bundle / GENERATION_FILE, meta)
    return meta


def verify(model, tokenizer, bundle: Path, model_file: str, questions: list[str], max_new_tokens: int) -> dict:
    """Compare ONNX against torch: max |logit diff| on the prompts, greedy-token equality, top-1 agreement."""
    import numpy as np
    import torch

    from export.runtime import OnnxGenerator
    from students.evaluate import generate_torch

    gen = OnnxGenerator(bundle, model_file)
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


def export_stage(recipe, train_dir: Path, gen_dir: Path, out: Path) -> ExportResult:
    """Export ``train_dir/model`` into ``out/bundle``; returns sizes and verification numbers."""
    import pyarrow.parquet as pq

    from distill.stages.train import load_student
    from export.onnx_export import export_decoder, kv_shape
    from export.quantize import quantize_dynamic_int8, quantize_weight_only

    cfg = recipe.export
    bundle = out / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_student(str(train_dir / "model"))
    model = model.cpu().eval()
    if cfg.smooth_alpha > 0:
        _smooth(model, tokenizer, gen_dir, cfg.smooth_alpha)
    console.print(f"[bold]export[/] {train_dir / 'model'} → ONNX (dynamo, opset {cfg.opset})")
    t0 = time.time()
    export_decoder(model, bundle / FP32_FILE, opset=cfg.opset)
    meta = write_bundle_files(tokenizer, model.config, bundle, recipe.student.eval_max_new_tokens, FP32_FILE)
    metrics: dict = {"export_seconds": time.time() - t0, "fp32_bytes": _size(bundle, FP32_FILE)}
    questions = [r["question"] for r in pq.read_table(gen_dir / "dataset" / "eval.parquet").to_pylist()[:4]]
    metrics["fp32_verify"] = verify(model, tokenizer, bundle, FP32_FILE, questions, 32)
    if cfg.quantization != "none":
        QUANT_FILE = f"model.{cfg.quantization}.onnx"
        t1 = time.time()
        keep = list(cfg.keep_fp32_nodes)
        if cfg.quantization == "int8_dynamic":
            keep += default_fp32_nodes(bundle / FP32_FILE, kv_shape(model.config)[0])
            qcfg = quantize_dynamic_int8(bundle / FP32_FILE, bundle / QUANT_FILE, keep)
        else:
            bits = 8 if cfg.quantization == "int8" else 4
            qcfg = quantize_weight_only(bundle / FP32_FILE, bundle / QUANT_FILE, bits, cfg.block_size, 4, keep)
        write_json(bundle / "quantization_config.json", qcfg)
        metrics["quantization"] = qcfg
        metrics["quantize_seconds"] = time.time() - t1
        metrics["quant_bytes"] = _size(bundle, QUANT_FILE)
        metrics["quant_fp32_size_ratio"] = metrics["quant_bytes"] / metrics["fp32_bytes"]
        metrics["quant_verify"] = verify(model, tokenizer, bundle, QUANT_FILE, questions, 32)
        metrics["quant_file"] = QUANT_FILE
        write_json(bundle / GENERATION_FILE, {**meta, "model_file": QUANT_FILE})
    write_json(out / "metrics.json", metrics)
    write_config(out, "export", cfg.model_dump(), recipe.dump())
    write_config(bundle, "export", cfg.model_dump(), recipe.dump())
    v = metrics["fp32_verify"]
    console.print(
        f"export: fp32 {metrics['fp32_bytes'] / 1e6:.0f} MB (max logit err {v['max_abs_logit_error']:.1e}, "
        f"greedy identical {v['greedy_identical']}/{v['prompts']})"
        + (
            f", {cfg.quantization} {metrics['quant_bytes'] / 1e6:.0f} MB (ratio {metrics['quant_fp32_size_ratio']:.2f}, "
            f"top-1 agreement {metrics['quant_verify']['top1_agreement']:.1%})"
            if "quant_bytes" in metrics
            else ""
        )
    )
    return ExportResult(out, bundle, metrics)


def _smooth(model, tokenizer, gen_dir: Path, alpha: float) -> None:
    """Fold SmoothQuant scales into the model, calibrated on prompts from the distilled dataset."""
    import pyarrow.parquet as pq

    from export.smooth import calibrate, smooth, smoothable
    from students.data import prompt_template, render_prompt

    if not smoothable(model):
        console.print("[yellow]export.smooth_alpha ignored: not a Llama-style decoder[/]")
        return
    template = prompt_template(tokenizer)
    rows = pq.read_table(gen_dir / "dataset" / "train.parquet").to_pylist()[:32]
    texts = [render_prompt(template, r["question"]) + r["rationale"] for r in rows]
    batches = [dict(tokenizer(t, return_tensors="pt", add_special_tokens=False)) for t in texts]
    smooth(model, calibrate(model, batches), alpha)


def _size(folder: Path, name: str) -> int:
    """Bytes of an ONNX model including its external-data files."""
    total = (folder / name).stat().st_size
    data = folder / (name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)
