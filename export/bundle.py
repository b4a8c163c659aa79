"""The device bundle: the chosen ONNX file, its tokenizer and generation metadata, an onnxruntime-genai
``genai_config.json``, the quantization config, a copy of the torch-free runtime and a model card.
Also the file names of the export folder (``model.onnx``, ``model.<preset>.onnx``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from distill.core.artifacts import write_json, write_text
from distill.export.gate import VariantResult
from distill.export.runtime import FORMAT_VERSION, GENERATION_FILE

FP32_FILE = "model.onnx"
RUNTIME_FILE = "distill_runtime.py"
CALCULATOR_FILE = "distill_calculator.py"  # the runtime's copy of distill.core.calculator


def variant_file(preset: str) -> str:
    """File name of a variant: ``model.onnx`` for fp32, ``model.<preset>.onnx`` otherwise."""
    return FP32_FILE if preset == "fp32" else f"model.{preset}.onnx"


def model_bytes(folder: Path, name: str) -> int:
    """Bytes of an ONNX model including its external-data file."""
    total = (folder / name).stat().st_size
    data = folder / (name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def model_context(config) -> int:
    """Tokens the model attends over (prompt + generated): its ``max_position_embeddings``, 2048 when
    the config states none. Runtimes refuse (or truncate) prompts that would run past it."""
    return int(getattr(config.get_text_config(decoder=True), "max_position_embeddings", 2048) or 2048)


def write_bundle_files(
    tokenizer,
    config,
    bundle: Path,
    max_new_tokens: int,
    model_file: str,
    fmt: str = "rationale",
    *,
    padding_side: str,
    calculator: bool = False,
) -> dict:
    """Tokenizer + generation metadata a torch-free runtime needs; returns the metadata.
    ``padding_side``: how the exported model takes a batch (``PADDING_SIDE`` of its attention layout);
    ``calculator``: whether runtimes decode with the calculator (``student.calculator``)."""
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
        "max_new_tokens": max_new_tokens,  # the runtime's and `distill infer`'s default
        "context_length": model_context(config),  # prompt + new tokens must fit (format 2.1)
        "model_file": model_file,  # the variant runtimes load by default
        "padding_side": padding_side,  # "right" for fused-attention exports (export.gqa)
        "calculator": calculator,  # decode with distill.core.calculator (format 2.2)
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


@dataclass(frozen=True)
class Provenance:
    """Where a bundled model came from, as the model card states it."""

    name: str  # run name
    student: str  # student model source
    student_format: str  # training target format (rationale, answer, kd, ...)
    teacher: str  # teacher model source
    teacher_method: str
    task: str  # "<source>:<name>"
    rows_kept: int | str  # kept teacher rationales ("?" when unknown)
    recipe_hash: str
    calculator: bool = False  # decoded with the calculator (student.calculator)
    qat_steps: int = 0  # steps of quantization-aware training for the int4 grid (student.qat)


def model_card(provenance: Provenance, variants: list[VariantResult], sensitivity: list[dict] | None = None) -> str:
    """``README.md`` of the bundle: provenance, how to run it, the variant table (``export.table``) and,
    when swept, the sensitivity table. ``variants`` must mark the bundled one ``chosen``."""
    from distill.export.table import variant_markdown

    chosen = next(v for v in variants if v.chosen)
    p = provenance
    lines = [
        f"# {p.name}: distilled student ({chosen.preset} ONNX)",
        "",
        f"- student: `{p.student}`, fine-tuned on `{p.student_format}` targets",
        f"- teacher: `{p.teacher}` ({p.teacher_method}), {p.rows_kept} kept rationales on `{p.task}`",
        f"- recipe hash: `{p.recipe_hash}` (full recipe in `distill_config.json`)",
        f'- model file: `{chosen.file}`; runs with onnxruntime + tokenizers only: `python {RUNTIME_FILE} . "question"`',
        *(
            [
                f"- decodes with a calculator (`{CALCULATOR_FILE}`): after the model writes an arithmetic expression "
                "and `=`, the value is written for it; every accuracy below was measured so. Runtimes that do not "
                "call it (onnxruntime-genai's loop, `--no-calculator`) decode the model alone."
            ]
            if p.calculator
            else []
        ),
        *(
            [
                f"- trained quantization-aware: its last {p.qat_steps} training steps computed through the int4 "
                "variant's grid (`student.qat`), so `int4` holds the weights that loss was computed with"
            ]
            if p.qat_steps
            else []
        ),
        "",
        variant_markdown(variants).rstrip(),
    ]
    if sensitivity:
        from distill.export.sensitivity import markdown_table

        lines += ["", markdown_table(sensitivity, "int8_static")]
    return "\n".join(lines) + "\n"


def assemble_bundle(
    variants_dir: Path,
    bundle: Path,
    model_file: str,
    tokenizer,
    config,
    *,
    max_new_tokens: int,
    fmt: str,
    padding_side: str,
    calculator: bool = False,
    quant_config: dict | None = None,
    ort_format: bool = False,
    card: str = "",
) -> dict:
    """Fill ``bundle`` with ``variants_dir/model_file`` (and its external data), the tokenizer and
    generation metadata (``write_bundle_files``), an ORT-format copy when ``ort_format``,
    ``genai_config.json``, ``quantization_config.json`` (the variant's ``quant_config``, if quantized),
    the runtime as ``distill_runtime.py`` (with its calculator, ``distill_calculator.py``) and ``card`` as ``README.md``. Returns the generation metadata."""
    from distill.core.progress import console

    bundle.mkdir(parents=True, exist_ok=True)
    for f in _model_files(variants_dir, model_file):
        shutil.copy2(variants_dir / f, bundle / f)
    meta = write_bundle_files(
        tokenizer, config, bundle, max_new_tokens, model_file, fmt, padding_side=padding_side, calculator=calculator
    )
    if ort_format:
        from distill.export.onnx_export import save_ort_format

        ort_file = Path(model_file).with_suffix(".ort").name
        with console.status(f"ORT format → {ort_file}"):
            save_ort_format(bundle / model_file, bundle / ort_file)
        meta["ort_model_file"] = ort_file
        write_json(bundle / GENERATION_FILE, meta)
    write_json(bundle / "genai_config.json", genai_config(config, meta, meta["context_length"]))
    if quant_config is not None:
        write_json(bundle / "quantization_config.json", quant_config)
    copy_runtime(bundle)
    if card:
        write_text(bundle / "README.md", card)
    return meta


def copy_runtime(bundle: Path) -> None:
    """The torch-free runtime as ``distill_runtime.py`` and its calculator as ``distill_calculator.py``."""
    import distill.core.calculator as calculator_module
    import distill.export.runtime as runtime

    shutil.copy2(runtime.__file__, bundle / RUNTIME_FILE)
    shutil.copy2(calculator_module.__file__, bundle / CALCULATOR_FILE)


def _model_files(folder: Path, model_file: str) -> Iterable[str]:
    return [f for f in (model_file, model_file + ".data") if (folder / f).exists()]
