"""The GPU path measured, in one prepared script: teacher decode, student training and the exported
student on onnxruntime's CUDA provider. Models are built from configs (random weights, no download):
throughput does not depend on the weights, and every decode runs its full length (EOS never stops it).

    python bench/gpu.py                      # on a CUDA machine (needs a GPU; refuses to run without one)
    python bench/gpu.py --dry-run            # every measurement on CPU at tiny sizes (tests run this)

1. teacher tokens/s at batch 64 and 256 (a Qwen2.5-1.5B-shaped teacher, 128-token prompts, 256 new tokens):
   HF ``generate`` vs the distill loop (``TransformersBackend.greedy``: rows leave as they end) vs HF
   ``generate`` with a static cache and ``torch.compile`` vs vLLM (when importable);
2. trainer tokens/s and model-FLOPs utilisation (6 · params · tokens/s / ``--peak-tflops``) of a
   SmolLM2-135M-shaped student at batch 64 × 512 tokens: distill's loss (``forward_loss``), AdamW, bf16;
3. the student exported to ONNX (``export_decoder``) decoding on onnxruntime's CUDA provider (when
   available): greedy tokens/s at batch 64, KV cache kept on the device between steps.

The dry run uses a tiny Qwen2-shaped model, batches 2 and 4, 8 new tokens, ``torch.compile`` with the
eager backend (no compiler needed) and the CPU provider; its table is marked "dry run" and its figures
are not measurements of anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()
sys.path.insert(0, str(ROOT / "tests"))

# Shapes of the published models (config.json), so the figures mean what they would for them.
TEACHER = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
STUDENT = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=400,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def build(folder: Path, arch: str, shape: dict, dtype, device: str):
    """A random model of ``shape`` (Qwen2 or Llama config) on ``device``, with the test tokenizer saved
    (and the config) in ``folder``; EOS is an id no prompt or sample will hit early."""
    import torch
    from tiny import build_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    eos = shape["vocab_size"] - 1
    config = cls(**shape, eos_token_id=eos, pad_token_id=0, bos_token_id=None)
    config.save_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    with torch.no_grad():  # the EOS logit can never win: every row decodes its full length
        model.get_output_embeddings().weight[eos].zero_()
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias[eos] = -1e4
    return model


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeat: int = 1) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeat


def teacher_rows(args, device: str, work: Path) -> list[dict]:
    """Teacher decode tokens/s for each engine and batch size."""
    import torch

    from distill.teachers.backends.transformers import TransformersBackend

    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shape = TINY if args.dry_run else TEACHER
    model = build(work / "teacher", "qwen2", shape, dtype, device)
    backend = TransformersBackend(work / "teacher", dtype=str(dtype).removeprefix("torch."), batch_size=max(args.batch))
    backend._model = model  # the weights built here, not loaded from the folder
    backend.eos_ids = {shape["vocab_size"] - 1}
    compiled, why = None, ""
    try:
        compiled = build(work / "teacher", "qwen2", shape, dtype, device)
        backend_name = "eager" if args.dry_run else "inductor"  # eager: the dry run needs no compiler
        compiled.forward = torch.compile(compiled.forward, backend=backend_name, dynamic=False)
    except Exception as e:  # a figure missing says why, the rest still runs
        why = f"{type(e).__name__}: {e}"
    rows = []
    for batch in args.batch:
        rows += _teacher_batch(args, device, batch, model, compiled, backend, why)
    rows += vllm_rows(args, model, work)
    return rows


def _teacher_batch(args, device: str, batch: int, model, compiled, backend, why: str) -> list[dict]:
    """One batch size's teacher rows: HF generate, the distill loop, static cache + torch.compile."""
    import torch

    ids = torch.randint(1, 300, (batch, args.prompt_tokens), device=device)
    mask = torch.ones_like(ids)
    new = args.new_tokens

    def hf(model=model, **extra):
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra
            )
        assert out.shape[1] == args.prompt_tokens + new

    def loop():
        with torch.inference_mode():
            out = backend.greedy(ids, mask, new)
        assert all(len(r) == new for r in out), [len(r) for r in out]

    rows = [
        _row("teacher", "HF generate", batch, batch * new / _timed(hf)),
        _row("teacher", "distill TransformersBackend loop", batch, batch * new / _timed(loop)),
    ]
    engine = "HF generate, static cache + torch.compile"
    try:
        if compiled is None:
            raise RuntimeError(why)
        seconds = _timed(lambda: hf(compiled, cache_implementation="static"))
        rows.append(_row("teacher", engine, batch, batch * new / seconds))
    except Exception as e:  # a figure missing says why, the rest still runs
        rows.append(_row("teacher", engine, batch, None, f"{type(e).__name__}: {e}"[:200]))
    return rows


def vllm_rows(args, model, work: Path) -> list[dict]:
    """vLLM on the same teacher (saved weights), when vLLM is importable and a GPU is there."""
    try:
        import vllm
    except ImportError:
        return [_row("teacher", "vLLM", b, None, "vllm not installed") for b in args.batch]
    if args.dry_run:
        return [_row("teacher", "vLLM", b, None, "needs CUDA (dry run)") for b in args.batch]
    import random

    model.save_pretrained(work / "teacher")
    llm = vllm.LLM(model=str(work / "teacher"), dtype="bfloat16", gpu_memory_utilization=0.5, seed=0)
    rows = []
    for batch in args.batch:
        prompts = [
            {"prompt_token_ids": [random.randint(1, 299) for _ in range(args.prompt_tokens)]} for _ in range(batch)
        ]
        params = vllm.SamplingParams(
            max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True, temperature=0
        )
        seconds = _timed(lambda prompts=prompts, params=params: llm.generate(prompts, params, use_tqdm=False))
        rows.append(_row("teacher", "vLLM", batch, batch * args.new_tokens / seconds))
    return rows


def trainer_rows(args, device: str, work: Path) -> list[dict]:
    """Student training tokens/s and MFU with distill's loss, AdamW and bf16 autocast."""
    import torch

    from distill.students.trainer import forward_loss, use_bf16

    shape = TINY if args.dry_run else STUDENT
    model = build(work / "student", "llama", shape, torch.float32, device).train()
    params = sum(p.numel() for p in model.parameters())
    batch, seq = (4, 32) if args.dry_run else (64, 512)
    ids = torch.randint(1, 300, (batch, seq), device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    bf16 = use_bf16("auto", torch.device(device))

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = forward_loss(model, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _timed(step, repeat=2 if args.dry_run else 10)
    tok_s = batch * seq / seconds
    mfu = 6 * params * tok_s / (args.peak_tflops * 1e12)
    note = f"{params / 1e6:.1f}M params, {batch}x{seq}, {'bf16' if bf16 else 'fp32'}, MFU {100 * mfu:.2f}%"
    return [_row("trainer", "distill forward_loss + AdamW", batch, tok_s, note, mfu=mfu)]


def onnx_rows(args, device: str, work: Path) -> list[dict]:
    """Greedy decode tokens/s of the exported student on onnxruntime (CUDA provider; CPU in the dry run)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from distill.export.onnx_export import export_decoder, io_names, kv_shape

    provider = "CPUExecutionProvider" if args.dry_run else "CUDAExecutionProvider"
    if provider not in ort.get_available_providers():
        return [_row("onnx", f"onnxruntime {provider}", b, None, "provider not available") for b in args.batch[:1]]
    shape = TINY if args.dry_run else STUDENT
    model = build(work / "student", "llama", shape, torch.float32, "cpu")
    export_decoder(model, work / "onnx" / "model.onnx", attention="generic")
    session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), providers=[provider])
    n_layers, kv_heads, head_dim = kv_shape(model.config)
    in_names, out_names = io_names(n_layers)
    batch, new, prompt = args.batch[0], args.new_tokens, args.prompt_tokens
    dev = "cuda" if provider == "CUDAExecutionProvider" else "cpu"

    def decode():
        # The cache stays in onnxruntime's memory on the device (io binding): only the next ids move.
        ids = np.random.default_rng(0).integers(1, 300, (batch, prompt), dtype=np.int64)
        past = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, kv_heads, 0, head_dim), np.float32), dev, 0)] * (
            2 * n_layers
        )
        total = 0
        for _ in range(new):
            binding = session.io_binding()
            n = ids.shape[1]
            feed = {
                "input_ids": ids,
                "attention_mask": np.ones((batch, total + n), np.int64),
                "position_ids": np.broadcast_to(np.arange(total, total + n, dtype=np.int64), (batch, n)).copy(),
            }
            for name, value in feed.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, dev, 0))
            for name, value in zip(in_names[3:], past):
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            for name in out_names[1:]:
                binding.bind_output(name, dev)
            session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            ids = outputs[0].numpy()[:, -1].argmax(-1)[:, None].astype(np.int64)
            past = outputs[1:]
            total += n

    seconds = _timed(decode)
    return [_row("onnx", f"onnxruntime {provider}", batch, batch * new / seconds, f"{new} new tokens, fp32")]


def _row(part: str, engine: str, batch: int, tok_s: float | None, note: str = "", **extra) -> dict:
    return {"part": part, "engine": engine, "batch": batch, "tokens_per_s": tok_s, "note": note, **extra}


def table(rows: list[dict], title: str) -> str:
    """The rows as a Markdown table under ``title``."""
    lines = [f"**{title}**", "", "| part | engine | batch | tokens/s | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        tok = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['part']} | {r['engine']} | {r['batch']} | {tok} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every measurement on CPU at tiny sizes (not figures)")
    p.add_argument("--batch", type=int, nargs="+", help="teacher batch sizes (default 64 256; dry run 2 4)")
    p.add_argument("--new-tokens", type=int, help="decoded tokens per row (default 256; dry run 8)")
    p.add_argument("--prompt-tokens", type=int, help="prompt tokens per row (default 128; dry run 8)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOPS (H200: 989)")
    p.add_argument("--only", choices=["teacher", "trainer", "onnx"], nargs="+", help="run only these parts")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    args.batch = args.batch or ([2, 4] if args.dry_run else [64, 256])
    args.new_tokens = args.new_tokens or (8 if args.dry_run else 256)
    args.prompt_tokens = args.prompt_tokens or (8 if args.dry_run else 128)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.set_num_threads(1)
    parts = args.only or ["teacher", "trainer", "onnx"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="distill-gpu-") as tmp:
        work = Path(tmp)
        for part, fn in (("teacher", teacher_rows), ("trainer", trainer_rows), ("onnx", onnx_rows)):
            if part in parts:
                rows += fn(args, device, work)
    where = "dry run on CPU, tiny model — not measurements" if args.dry_run else torch.cuda.get_device_name()
    print(table(rows, f"GPU path ({where})"))
    if args.json:
        args.json.write_text(json.dumps({"dry_run": args.dry_run, "device": where, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
