"""Stage 3 — export: the trained student to ONNX with KV cache, quantized variants, a quality gate
that keeps the smallest variant within tolerance of fp32 accuracy, and a runnable bundle.

Every variant is verified against torch on real prompts (max logit error, top-1 agreement, greedy
tokens identical). Layout: ``variants/`` holds every file tried, ``gate/`` the per-example outputs,
``bundle/`` what a device needs (chosen model, tokenizer, generation + genai config, runtime, card).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from distill.core.artifacts import write_config, write_json, write_text
from distill.core.errors import DistillError
from distill.core.progress import console
from distill.export.gate import changes_cell
from distill.export.runtime import FORMAT_VERSION, GENERATION_FILE

FP32_FILE = "model.onnx"


@dataclass
class ExportResult:
    dir: Path
    bundle: Path
    metrics: dict


def variant_file(preset: str) -> str:
    return FP32_FILE if preset == "fp32" else f"model.{preset}.onnx"


def default_fp32_nodes(model_path: Path, n_layers: int) -> list[str]:
    """MatMuls ``int8_dynamic`` keeps in fp32: the MLP down-projections, whose inputs carry the
    activation outliers that per-tensor scales cannot represent (found by a per-group sweep)."""
    from distill.export.quantize import matmul_nodes

    nodes = matmul_nodes(model_path)  # the lm_head may or may not be among them (tied weights)
    per_layer = len(nodes) // n_layers if n_layers else 0
    if per_layer == 7 and len(nodes) - 7 * n_layers in (0, 1):  # q, k, v, o, gate, up, down
        return [nodes[7 * i + 6] for i in range(n_layers)]
    return []


def check_attention(model, attention: str) -> None:
    """One clear error before any work when ``export.attention=fused`` names a student it cannot take."""
    from distill.export.gqa import unsupported_reason

    reason = unsupported_reason(model) if attention == "fused" else None
    if reason:
        raise DistillError(
            f"export.attention=fused cannot export this student: {reason}",
            "set export.attention=auto (fused where the architecture allows) or generic",
        )


def write_bundle_files(
    tokenizer,
    config,
    bundle: Path,
    max_new_tokens: int,
    model_file: str,
    fmt: str = "rationale",
    *,
    padding_side: str,
) -> dict:
    """Tokenizer + generation metadata a torch-free runtime needs; returns the metadata.
    ``padding_side``: how the exported model takes a batch (``PADDING_SIDE`` of its attention layout)."""
    from distill.export.onnx_export import kv_shape
    from distill.students.data import PLACEHOLDER, prompt_template

    bundle.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(bundle)
    n_layers, kv_heads, head_dim = kv_shape(config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    meta = {
        "prompt_template": prompt_template(tokenizer, fmt),
        "placeholder": PLACEHOLDER,
        "eos_token_ids": sorted({*eos, tokenizer.eos_token_id} - {None}),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "num_layers": n_layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "max_new_tokens": max_new_tokens,
        "model_file": model_file,  # the variant runtimes load by default
        "padding_side": padding_side,  # "right" for fused-attention exports (export.gqa)
        "format_version": FORMAT_VERSION,
    }
    write_json(bundle / GENERATION_FILE, meta)
    return meta


def genai_config(config, meta: dict, context_length: int) -> dict:
    """``genai_config.json`` in the layout onnxruntime-genai reads for a decoder-only model."""
    text = config.get_text_config(decoder=True)
    return {
        "model": {
            "bos_token_id": text.bos_token_id if text.bos_token_id is not None else meta["pad_token_id"],
            "context_length": context_length,
            "eos_token_id": meta["eos_token_ids"] if len(meta["eos_token_ids"]) > 1 else meta["eos_token_ids"][0],
            "pad_token_id": meta["pad_token_id"],
            "type": text.model_type,
            "vocab_size": text.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": meta["model_file"],
                "head_size": meta["head_dim"],
                "hidden_size": text.hidden_size,
                "num_attention_heads": text.num_attention_heads,
                "num_hidden_layers": meta["num_layers"],
                "num_key_value_heads": meta["num_kv_heads"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def verify(model, tokenizer, folder: Path, model_file: str, questions: list[str], max_new_tokens: int) -> dict:
    """Compare ONNX against torch: max |logit diff| on the prompts, greedy-token equality, top-1 agreement."""
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


def export_stage(recipe, train_dir: Path, gen_dir: Path, out: Path) -> ExportResult:
    """Export ``train_dir/model``, build and gate the variants, assemble ``out/bundle``."""
    from distill.core.answers import Task
    from distill.export.calibration import calibration_ids, feeds_for
    from distill.export.gate import VariantResult, choose, paired_changes, score_variant
    from distill.export.onnx_export import PADDING_SIDE, export_decoder, kv_shape
    from distill.export.quantize import linear_groups, make_variant
    from distill.students.models import load_student
    from distill.teachers.rows import read_eval_problems

    cfg = recipe.export
    variants_dir, bundle = out / "variants", out / "bundle"
    model, tokenizer = load_student(str(train_dir / "model"))
    model = model.cpu().eval()
    check_attention(model, cfg.attention)
    if cfg.smooth_alpha > 0:
        _smooth(model, tokenizer, gen_dir, cfg.smooth_alpha)
    t0 = time.time()
    with console.status(f"export {train_dir / 'model'} → ONNX (dynamo, opset {cfg.opset})"):
        layout = export_decoder(model, variants_dir / FP32_FILE, opset=cfg.opset, attention=cfg.attention)
    meta = write_bundle_files(
        tokenizer,
        model.config,
        variants_dir,
        recipe.student.eval_max_new_tokens,
        FP32_FILE,
        recipe.student.format,
        padding_side=PADDING_SIDE[layout],
    )
    metrics: dict = {
        "export_seconds": time.time() - t0,
        "fp32_bytes": _size(variants_dir, FP32_FILE),
        "attention": layout,
    }
    problems = read_eval_problems(gen_dir)
    questions = [p["question"] for p in problems[:4]]

    results: list[VariantResult] = []
    n_layers, kv_heads, head_dim = kv_shape(model.config)
    dynamic_keep = default_fp32_nodes(variants_dir / FP32_FILE, n_layers)
    groups = linear_groups(variants_dir / FP32_FILE, n_layers)
    node_blocks = {n: b for g, b in cfg.group_block_sizes.items() for n in groups.get(g, [])}
    static_keep = [n for g in cfg.static_keep_groups for n in groups.get(g, [])]
    calib, held_out = [], []
    if "int8_static" in cfg.variants or cfg.sensitivity:
        ids = calibration_ids(
            tokenizer,
            gen_dir / "dataset" / "train.parquet",
            recipe.student.format,
            Task(recipe.task.answer_type),
            cfg.calibration_examples + 16,
            recipe.student.max_length,
        )
        feeds = feeds_for(variants_dir / FP32_FILE, ids, kv_heads, head_dim)
        calib, held_out = feeds[: cfg.calibration_examples], feeds[cfg.calibration_examples :] or feeds[:16]
    if cfg.sensitivity:
        with console.status("sensitivity sweep of int8_static (one group at a time)"):
            metrics["sensitivity"] = _sensitivity(variants_dir / FP32_FILE, groups, calib, held_out, cfg)
    quant_configs = {}
    for preset in ["fp32", *cfg.variants]:
        file = variant_file(preset)
        try:
            if preset != "fp32":
                with console.status(f"quantize {preset}"):
                    quant_configs[preset] = make_variant(
                        preset,
                        variants_dir / FP32_FILE,
                        variants_dir / file,
                        cfg.block_size,
                        cfg.keep_fp32_nodes,
                        dynamic_keep,
                        node_blocks,
                        cfg.embed_block_size,
                        static_keep,
                        calib,
                        cfg.calibrate_method,
                    )
                    if preset == "int8_static":
                        quant_configs[preset]["static_keep_groups"] = list(cfg.static_keep_groups)
            v = verify(model, tokenizer, variants_dir, file, questions, 32)
            results.append(
                VariantResult(
                    preset,
                    file,
                    _size(variants_dir, file),
                    top1_agreement=v["top1_agreement"],
                    greedy_identical=f"{v['greedy_identical']}/{v['prompts']}",
                )
            )
            if preset == "fp32":
                metrics["fp32_verify"] = v
        except Exception as e:  # a variant the runtime cannot build or run is a row in the table, not a crash
            if preset == "fp32":
                raise
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            results.append(VariantResult(preset, file, 0, error=msg))
            console.print(f"[yellow]variant {preset} failed: {msg}[/]")

    write_json(variants_dir / "quantization_configs.json", quant_configs)  # every preset's config, by preset
    task = Task(recipe.task.answer_type)
    if cfg.gate:
        solved: dict[str, list[bool]] = {}
        for r in results:
            if r.error:
                continue
            summary, rows = score_variant(
                variants_dir,
                r.file,
                problems,
                task,
                recipe.student.eval_max_new_tokens,
                recipe.student.eval_batch_size,
                r.preset,
            )
            r.accuracy, r.correct, r.n = summary["accuracy"], summary["correct"], summary["n"]
            r.tokens_per_second = summary["tokens_per_second"]
            solved[r.preset] = [bool(x["correct"]) for x in rows]
            write_text(out / "gate" / f"{r.preset}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
        for r in results:
            if r.preset in solved:
                r.lost, r.gained = paired_changes(solved["fp32"], solved[r.preset])
        chosen = choose(results, cfg.tolerance)
    else:
        chosen = min((r for r in results if not r.error), key=lambda r: r.bytes)
    chosen.chosen = True

    _assemble_bundle(
        recipe,
        model.config,
        tokenizer,
        variants_dir,
        bundle,
        chosen,
        meta,
        results,
        quant_configs,
        gen_dir,
        metrics.get("sensitivity"),
    )
    metrics.update(
        {
            "variants": [r.row() for r in results],
            "chosen": chosen.preset,
            "chosen_file": chosen.file,
            "chosen_bytes": chosen.bytes,
            "chosen_fp32_size_ratio": chosen.bytes / metrics["fp32_bytes"],
            "tolerance": cfg.tolerance,
            "gated": cfg.gate,
            "seconds": time.time() - t0,
        }
    )
    write_json(out / "metrics.json", metrics)
    write_config(out, "export", cfg.model_dump(), recipe.dump())
    _print_table(results)
    console.print(
        f"export: kept {chosen.preset} ({chosen.bytes / 1e6:.0f} MB, {chosen.bytes / metrics['fp32_bytes']:.2f} of fp32) "
        f"in {out.parent / 'export' / 'bundle'}"
    )
    return ExportResult(out, bundle, metrics)


def _assemble_bundle(
    recipe, config, tokenizer, variants_dir, bundle, chosen, meta, results, quant_configs, gen_dir, sensitivity=None
):
    """The device folder: chosen model, tokenizer, generation/genai config, runtime copy, model card."""
    import hashlib

    import distill.export.runtime as runtime

    bundle.mkdir(parents=True, exist_ok=True)
    for f in [chosen.file, chosen.file + ".data"]:
        if (variants_dir / f).exists():
            shutil.copy2(variants_dir / f, bundle / f)
    meta = write_bundle_files(
        tokenizer,
        config,
        bundle,
        meta["max_new_tokens"],
        chosen.file,
        recipe.student.format,
        padding_side=meta["padding_side"],
    )
    if recipe.export.ort_format:
        from distill.export.onnx_export import save_ort_format

        ort_file = Path(chosen.file).with_suffix(".ort").name
        with console.status(f"ORT format → {ort_file}"):
            save_ort_format(bundle / chosen.file, bundle / ort_file)
        meta["ort_model_file"] = ort_file
        write_json(bundle / GENERATION_FILE, meta)
    context = int(getattr(config.get_text_config(decoder=True), "max_position_embeddings", 2048) or 2048)
    write_json(bundle / "genai_config.json", genai_config(config, meta, context))
    if chosen.preset in quant_configs:
        write_json(bundle / "quantization_config.json", quant_configs[chosen.preset])
    shutil.copy2(runtime.__file__, bundle / "distill_runtime.py")
    recipe_hash = hashlib.sha256(json.dumps(recipe.dump(), sort_keys=True).encode()).hexdigest()[:16]
    gen_metrics = json.loads((gen_dir / "metrics.json").read_text()) if (gen_dir / "metrics.json").exists() else {}
    lines = [
        f"# {recipe.name}: distilled student ({chosen.preset} ONNX)",
        "",
        f"- student: `{recipe.student.model}`, fine-tuned on `{recipe.student.format}` targets",
        f"- teacher: `{recipe.teacher.model}` ({recipe.teacher.method}), {gen_metrics.get('train_rows_kept', '?')} "
        f"kept rationales on `{recipe.task.source}:{recipe.task.name}`",
        f"- recipe hash: `{recipe_hash}` (full recipe in `distill_config.json`)",
        f"- model file: `{chosen.file}`; runs with onnxruntime + tokenizers only: "
        f'`python distill_runtime.py . "question"`',
        "",
        "| variant | size | size / fp32 | top-1 vs torch | accuracy | vs fp32 (problems) | tokens/s (1 thread) | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp32_bytes = next(r.bytes for r in results if r.preset == "fp32")
    for r in results:
        acc = f"{r.accuracy:.1%} ({r.correct}/{r.n})" if r.accuracy is not None else (r.error or "—")
        tps = f"{r.tokens_per_second:.0f}" if r.tokens_per_second else "—"
        agree = f"{r.top1_agreement:.1%}" if r.top1_agreement is not None else "—"
        lines.append(
            f"| {r.preset} | {r.bytes / 1e6:.0f} MB | {r.bytes / fp32_bytes:.3f} | {agree} | {acc} | {changes_cell(r.preset, r.lost, r.gained)} "
            f"| {tps} | {'✓' if r.chosen else ''} |"
        )
    if sensitivity:
        from distill.export.sensitivity import markdown_table

        lines += ["", markdown_table(sensitivity, "int8_static")]
    write_text(bundle / "README.md", "\n".join(lines) + "\n")
    write_config(bundle, "export", recipe.export.model_dump(), recipe.dump())


def _print_table(results) -> None:
    from rich.table import Table

    table = Table(
        title="export variants",
        caption="top-1: agreement with torch; vs fp32: eval problems lost / gained; tok/s at 1 thread",
    )
    for col in ("variant", "size", "/ fp32", "top-1", "accuracy", "vs fp32", "tok/s", "kept"):
        table.add_column(col, no_wrap=True)
    fp32_bytes = next(r.bytes for r in results if r.preset == "fp32")
    for r in results:
        table.add_row(
            r.preset,
            f"{r.bytes / 1e6:.1f} MB",
            f"{r.bytes / fp32_bytes:.3f}",
            f"{r.top1_agreement:.1%}" if r.top1_agreement is not None else "—",
            f"{r.accuracy:.1%}" if r.accuracy is not None else (r.error or "—"),
            changes_cell(r.preset, r.lost, r.gained),
            f"{r.tokens_per_second:.0f}" if r.tokens_per_second else "—",
            "✓" if r.chosen else "",
        )
    console.print(table)


def _sensitivity(fp32: Path, groups: dict, calib: list, held_out: list, cfg) -> list[dict]:
    """Per-group sweep of int8_static: each projection group alone, the tied embedding/LM head
    alone, then everything; top-1 agreement measured on held-out training prompts."""
    from functools import partial

    from distill.export.quantize import quantize_static_int8, quantize_weight_only
    from distill.export.sensitivity import group_sensitivity

    emb = cfg.embed_block_size or cfg.block_size
    builders = {
        g: partial(
            quantize_static_int8, feeds=calib, only=nodes, calibrate_method=cfg.calibrate_method, embed_block_size=None
        )
        for g, nodes in groups.items()
    }
    # weight-only pass with every MatMul excluded: only the tied embedding / LM head gets quantized
    all_nodes = [n for nodes in groups.values() for n in nodes]
    builders["embedding+lm_head"] = partial(quantize_weight_only, bits=8, block_size=emb, exclude=all_nodes)
    builders["all"] = partial(
        quantize_static_int8, feeds=calib, calibrate_method=cfg.calibrate_method, embed_block_size=emb
    )
    return group_sensitivity(fp32, builders, held_out)


def _smooth(model, tokenizer, gen_dir: Path, alpha: float) -> None:
    """Fold SmoothQuant scales into the model, calibrated on prompts from the distilled dataset."""
    import pyarrow.parquet as pq

    from distill.export.smooth import calibrate, smooth, smoothable
    from distill.students.data import prompt_template, render_prompt

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
