"""Stage 3 — export: the trained student to ONNX with KV cache, quantized variants, a quality gate
that keeps the smallest variant within tolerance of fp32 accuracy, and a runnable bundle.

Every variant is verified against torch on real prompts (max logit error, top-1 agreement, greedy
tokens identical). Layout: ``variants/`` holds every file tried (each quantized one with the config
that produced it, ``model.<preset>.quant.json``), ``gate/`` the per-example outputs, ``bundle/`` what a
device needs (chosen model, tokenizer, generation + genai config, runtime, card). The pieces live in
``distill.export``; this stage wires the recipe into them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from distill.core.artifacts import write_config, write_json, write_text
from distill.core.errors import DistillError
from distill.core.progress import console

VERIFY_PROMPTS = 4  # eval questions every variant is checked against torch on
VERIFY_NEW_TOKENS = 32
HELD_OUT_FEEDS = 16  # training prompts past the calibration ones, for the sensitivity sweep


@dataclass
class ExportResult:
    dir: Path
    bundle: Path
    metrics: dict


def check_attention(model, attention: str) -> None:
    """One clear error before any work when ``export.attention=fused`` names a student it cannot take."""
    from distill.export.gqa import unsupported_reason

    reason = unsupported_reason(model) if attention == "fused" else None
    if reason:
        raise DistillError(
            f"export.attention=fused cannot export this student: {reason}",
            "set export.attention=auto (fused where the architecture allows) or generic",
        )


def _check_qat_layout(recipe, train_dir: Path) -> None:
    """Warn when the student was trained quantization-aware for another int4 block layout than the
    export's (the export settings changed after training): its int4 is then post-training rounding."""
    metrics = train_dir / "metrics.json"
    trained = json.loads(metrics.read_text()).get("qat") if metrics.exists() else None
    if not trained or "int4" not in recipe.export.variants:
        return
    layout = trained["layout"]
    now = recipe.export.weight_only_blocks
    then = (layout["block_size"], layout["group_block_sizes"], layout["embed_block_size"])
    if now != then:
        console.print(
            f"[yellow]export: the student was trained quantization-aware for int4 blocks {then}, this export uses "
            f"{now}: its int4 is rounded after training (run `distill train` again to train for these blocks)[/]"
        )


def quant_presets(cfg) -> dict:
    """The recipe's ``export`` settings as one ``QuantPreset`` per variant name."""
    from distill.export.quantize import QuantPreset

    weight_only = {
        "block_size": cfg.block_size,
        "group_block_sizes": cfg.group_block_sizes,
        "embed_block_size": cfg.embed_block_size,
        "keep_fp32": cfg.keep_fp32_nodes,
    }
    return {
        "int8": QuantPreset.int8(**weight_only),
        "int4": QuantPreset.int4(**weight_only, algorithm=cfg.int4_algorithm, symmetric=cfg.int4_symmetric),
        "int4_mixed": QuantPreset.int4_mixed(
            [] if cfg.int4_mixed_groups == "auto" else cfg.int4_mixed_groups, **weight_only
        ),
        "int8_dynamic": QuantPreset.int8_dynamic(keep_fp32=cfg.keep_fp32_nodes),
        "int8_static": QuantPreset.int8_static(
            keep_groups=cfg.static_keep_groups,
            calibrate_method=cfg.calibrate_method,
            embed_block_size=cfg.embed_block_size or cfg.block_size,
            keep_fp32=cfg.keep_fp32_nodes,
        ),
        "fp16": QuantPreset.fp16(),
    }


def _gate_split(recipe, gen_dir: Path, eval_problems: list[dict]) -> tuple[list[dict], str]:
    """(problems, "gate" | "eval"): ``export.gate_size`` problems the student never trained or was
    evaluated on, or the evaluation split when that is 0 or the task has no other problems."""
    from distill.core.problems import gate_problems, load_problems
    from distill.teachers.rows import read_rows

    size = recipe.export.gate_size
    if size == "auto":
        from distill.export.gate import auto_gate_size

        size = auto_gate_size(recipe.export.tolerance)
    if not size:
        return eval_problems, "eval"
    seen = {r["question"] for r in read_rows(gen_dir / "dataset" / "train.parquet", ("question",))}
    seen |= {p["question"] for p in eval_problems}
    if recipe.task.source != "synthetic":  # every training problem, kept by the teacher or not
        seen |= {p["question"] for p in load_problems(recipe.task)[0]}
    gate = gate_problems(recipe.task, size, seen)
    if not gate:
        console.print(
            f"[yellow]export: the task has no problems beyond its train and eval splits; gating on the "
            f"{len(eval_problems)} eval problems[/]"
        )
        return eval_problems, "eval"
    if len(gate) < size:
        console.print(
            f"[yellow]export: the task has {len(gate)} problems left for the gate (export.gate_size={size})[/]"
        )
    return gate, "gate"


def export_stage(recipe, train_dir: Path, gen_dir: Path, out: Path) -> ExportResult:
    """Export ``train_dir/model``, build and gate the variants, assemble ``out/bundle``."""
    from distill.core.answers import Task
    from distill.export.bundle import (
        FP32_FILE,
        Provenance,
        assemble_bundle,
        model_bytes,
        model_card,
        variant_file,
        write_bundle_files,
    )
    from distill.export.calibration import calibration_ids, feeds_for
    from distill.export.gate import VariantResult, choose, score_variants
    from distill.export.onnx_export import PADDING_SIDE, export_decoder, kv_shape
    from distill.export.quantize import make_variant
    from distill.export.sensitivity import int4_mixed_choice, static_int8_sweep
    from distill.export.smooth import calibration_texts, smooth_on_texts, smoothable
    from distill.export.table import variant_rich_table
    from distill.export.verify import verify
    from distill.students.models import load_student
    from distill.teachers.rows import read_eval_problems, read_rows

    cfg, student = recipe.export, recipe.student
    task = Task.from_config(recipe.task)
    variants_dir, bundle = out / "variants", out / "bundle"
    fp32 = variants_dir / FP32_FILE
    train_parquet = gen_dir / "dataset" / "train.parquet"

    # load
    model, tokenizer = load_student(str(train_dir / "model"))
    model = model.cpu().eval()
    check_attention(model, cfg.attention)
    problems = read_eval_problems(gen_dir)
    if cfg.smooth_alpha > 0 and smoothable(model):
        rows = read_rows(train_parquet, ("question", "rationale"))[:32]
        smooth_on_texts(model, tokenizer, calibration_texts(tokenizer, rows), cfg.smooth_alpha)
    elif cfg.smooth_alpha > 0:
        console.print("[yellow]export.smooth_alpha ignored: not a Llama-style decoder[/]")

    _check_qat_layout(recipe, train_dir)

    # the fp32 graph, and what every variant is built from
    t0 = time.time()
    with console.status(f"export {train_dir / 'model'} → ONNX (dynamo, opset {cfg.opset})"):
        layout = export_decoder(model, fp32, opset=cfg.opset, attention=cfg.attention)
    meta = write_bundle_files(
        tokenizer,
        model.config,
        variants_dir,
        student.eval_max_new_tokens,
        FP32_FILE,
        student.format,
        padding_side=PADDING_SIDE[layout],
        calculator=student.calculator,
    )
    metrics: dict = {
        "export_seconds": time.time() - t0,
        "fp32_bytes": model_bytes(variants_dir, FP32_FILE),
        "attention": layout,
    }
    presets = quant_presets(cfg)
    calib, held_out = [], []
    gptq = "int4" in cfg.variants and cfg.int4_algorithm == "gptq"
    mixed_sweep = "int4_mixed" in cfg.variants and cfg.int4_mixed_groups == "auto"
    if "int8_static" in cfg.variants or cfg.sensitivity or gptq or mixed_sweep:
        n = cfg.calibration_examples
        ids = calibration_ids(
            tokenizer, train_parquet, student.format, task, n + HELD_OUT_FEEDS, student.max_length, student.kd.loss
        )
        _, kv_heads, head_dim = kv_shape(model.config)
        feeds = feeds_for(fp32, ids, kv_heads, head_dim)
        calib, held_out = feeds[:n], feeds[n:] or feeds[:HELD_OUT_FEEDS]

    # run: the sweep, every variant built and verified against torch, the gate
    if cfg.sensitivity:
        with console.status("sensitivity sweep of int8_static (one group at a time)"):
            emb = cfg.embed_block_size or cfg.block_size
            metrics["sensitivity"] = static_int8_sweep(fp32, calib, held_out, cfg.calibrate_method, emb)
    if mixed_sweep:
        with console.status("int4_mixed: sensitivity sweep (each projection group alone in int4)"):
            metrics["int4_mixed"] = int4_mixed_choice(
                fp32, held_out, presets["int4_mixed"], cfg.int4_mixed_max_size * metrics["fp32_bytes"]
            )
        chosen = metrics["int4_mixed"]["int8_groups"]
        presets["int4_mixed"] = replace(presets["int4_mixed"], int8_groups=tuple(chosen))
        console.print(
            f"int4_mixed: {', '.join(chosen) or 'no group'} kept in int8 "
            f"(+{metrics['int4_mixed']['int8_extra_bytes'] / 1e6:.1f} MB over int4)"
        )
    questions = [p["question"] for p in problems[:VERIFY_PROMPTS]]
    results: list[VariantResult] = []
    quant_configs: dict[str, dict] = {}
    for preset in ["fp32", *cfg.variants]:
        file = variant_file(preset)
        try:
            if preset != "fp32":
                with console.status(f"quantize {preset}"):
                    quant_configs[preset] = make_variant(presets[preset], fp32, variants_dir / file, calib)
            v = verify(model, tokenizer, variants_dir, file, questions, VERIFY_NEW_TOKENS)
        except Exception as e:  # a variant the runtime cannot build or run is a row in the table, not a crash
            if preset == "fp32":
                raise
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            results.append(VariantResult(preset, file, 0, error=msg))
            console.print(f"[yellow]variant {preset} failed: {msg}[/]")
            continue
        if preset == "fp32":
            metrics["fp32_verify"] = v
        results.append(
            VariantResult(
                preset,
                file,
                model_bytes(variants_dir, file),
                top1_agreement=v["top1_agreement"],
                greedy_identical=f"{v['greedy_identical']}/{v['prompts']}",
            )
        )
    write_json(variants_dir / "quantization_configs.json", quant_configs)  # every preset's config, by preset
    if cfg.gate:
        gate_set, split = _gate_split(recipe, gen_dir, problems)
        metrics["gate_split"] = {"split": split, "problems": len(gate_set)}
        outcomes = score_variants(
            results,
            variants_dir,
            gate_set,
            task,
            student.eval_max_new_tokens,
            student.eval_batch_size,
            cfg.tolerance,
            cfg.gate_workers,
            early_reject=cfg.gate_rule == "interval",
        )
        for preset, rows in outcomes.items():
            write_text(out / "gate" / f"{preset}.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
        chosen = choose(results, cfg.tolerance, cfg.gate_rule)
    else:
        chosen = min((r for r in results if not r.error), key=lambda r: r.bytes)
    chosen.chosen = True

    # write artifacts
    gen_metrics = json.loads((gen_dir / "metrics.json").read_text()) if (gen_dir / "metrics.json").exists() else {}
    provenance = Provenance(
        name=recipe.name,
        student=student.model if student.from_teacher is None else f"a smaller copy of {recipe.teacher.model}",
        student_format=student.format,
        teacher=recipe.teacher.model,
        teacher_method=recipe.teacher.method,
        task=f"{recipe.task.source}:{recipe.task.name}",
        rows_kept=gen_metrics.get("train_rows_kept", "?"),
        recipe_hash=hashlib.sha256(json.dumps(recipe.dump(), sort_keys=True).encode()).hexdigest()[:16],
        calculator=student.calculator,
        qat_steps=student.qat.steps if student.qat is not None else 0,
    )
    assemble_bundle(
        variants_dir,
        bundle,
        chosen.file,
        tokenizer,
        model.config,
        max_new_tokens=meta["max_new_tokens"],
        fmt=student.format,
        padding_side=meta["padding_side"],
        calculator=student.calculator,
        quant_config=quant_configs.get(chosen.preset),
        ort_format=cfg.ort_format,
        card=model_card(provenance, results, metrics.get("sensitivity")),
    )
    write_config(bundle, "export", cfg.model_dump(), recipe.dump())
    metrics.update(
        {
            "variants": [r.row() for r in results],
            "chosen": chosen.preset,
            "chosen_file": chosen.file,
            "chosen_bytes": chosen.bytes,
            "chosen_fp32_size_ratio": chosen.bytes / metrics["fp32_bytes"],
            "tolerance": cfg.tolerance,
            "gate_rule": cfg.gate_rule,
            "gated": cfg.gate,
            "seconds": time.time() - t0,
        }
    )
    write_json(out / "metrics.json", metrics)
    write_config(out, "export", cfg.model_dump(), recipe.dump())
    console.print(variant_rich_table(results))
    console.print(
        f"export: kept {chosen.preset} ({chosen.bytes / 1e6:.0f} MB, {chosen.bytes / metrics['fp32_bytes']:.2f} of fp32) "
        f"in {out.parent / 'export' / 'bundle'}"
    )
    return ExportResult(out, bundle, metrics)
