"""Greedy decoding speed at 1 thread: torch fp32 student vs its ONNX variants, same prompts, same run.

    .venv/bin/python bench/export_speed.py runs/quickstart [--prompts 8] [--new-tokens 64] [--rounds 3]

Prints tokens/s, ratio to torch fp32, size ratio to fp32 ONNX and peak RSS of each runtime process
(each variant runs in its own process so peak memory is its own). Batch-1 decoding reads every weight
once per token, so each row also shows the weight bytes streamed per second (tok/s x weight bytes) and
its byte cap (torch's weight bytes / the variant's): where both sides stream weights at the same
bandwidth no kernel beats it (``bench/gemv_ceiling.py`` measures how close the kernels themselves get).
With ``--rounds N`` the models run interleaved N times (torch, v1, v2, ..., torch, v1, ...) and each
keeps its best round, so load from other processes on a shared machine hits all of them alike instead
of whichever ran during a spike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()  # offline, no telemetry, one thread (before torch or onnxruntime load)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _questions(run: Path, n: int) -> list[str]:
    import pyarrow.parquet as pq

    return [r["question"] for r in pq.read_table(run / "generate" / "dataset" / "eval.parquet").to_pylist()[:n]]


def torch_speed(run: Path, questions: list[str], new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.students.data import prompt_template, render_prompt

    torch.set_num_threads(1)
    path = run / "train" / "model"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    template = prompt_template(tok)
    tokens, t0 = 0, None
    for i, q in enumerate(questions):
        ids = tok(render_prompt(template, q), return_tensors="pt", add_special_tokens=False)
        if i == 1:
            tokens, t0 = 0, time.perf_counter()  # first prompt is warm-up
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    return {
        "tokens_per_second": tokens / (time.perf_counter() - t0),
        "peak_rss_mb": _rss(),
        "weight_bytes": weight_bytes,
    }


def ort_speed(folder: Path, file: str, questions: list[str], new_tokens: int) -> dict:
    from distill.export.runtime import OnnxGenerator

    gen = OnnxGenerator(folder, file, threads=1)
    gen.eos_ids = set()  # fixed-length decoding, as min_new_tokens does for torch
    t0 = None
    for i, q in enumerate(questions):
        if i == 1:
            gen.tokens_generated, t0 = 0, time.perf_counter()
        gen.generate([q], new_tokens, 1)
    return {"tokens_per_second": gen.tokens_generated / (time.perf_counter() - t0), "peak_rss_mb": _rss()}


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, *args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each model keeps its best")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, run, n, new = args.child[0], Path(args.child[1]), int(args.child[2]), int(args.child[3])
        qs = _questions(run, n)
        res = torch_speed(run, qs, new) if kind == "torch" else ort_speed(run / "export" / "variants", kind, qs, new)
        print(json.dumps(res))
        return
    run = args.run
    m = json.loads((run / "export" / "metrics.json").read_text())
    kinds = ["torch"] + [v["file"] for v in m["variants"] if not v["error"]]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            r = _child(kind, run, args.prompts, args.new_tokens)
            if kind not in best or r["tokens_per_second"] > best[kind]["tokens_per_second"]:
                best[kind] = {**r, "peak_rss_mb": max(r["peak_rss_mb"], best.get(kind, r)["peak_rss_mb"])}
    base = best["torch"]
    print(
        f"{'model':<18}{'tok/s':>8}{'vs torch':>10}{'byte cap':>9}{'size':>10}{'size/fp32':>11}{'GB/s':>7}"
        f"{'peak RSS':>10}{'accuracy':>10}"
    )
    print(
        f"{'torch fp32':<18}{base['tokens_per_second']:>8.1f}{1.0:>10.2f}{1.0:>9.2f}{base['weight_bytes'] / 1e6:>8.1f}MB{'':>11}"
        f"{_gbs(base['tokens_per_second'], base['weight_bytes']):>7.1f}{base['peak_rss_mb']:>8.0f}MB"
    )
    for v in m["variants"]:
        if v["error"]:
            print(f"{v['preset']:<18} failed: {v['error']}")
            continue
        r = best[v["file"]]
        acc = f"{v['accuracy']:.1%}" if v["accuracy"] is not None else "—"
        print(
            f"{'onnx ' + v['preset']:<18}{r['tokens_per_second']:>8.1f}{r['tokens_per_second'] / base['tokens_per_second']:>10.2f}"
            f"{base['weight_bytes'] / v['bytes']:>9.2f}{v['bytes'] / 1e6:>8.1f}MB{v['bytes'] / m['fp32_bytes']:>11.3f}"
            f"{_gbs(r['tokens_per_second'], v['bytes']):>7.1f}{r['peak_rss_mb']:>8.0f}MB{acc:>10}"
        )
    print(
        "byte cap: torch fp32 weight bytes / the model's (the ratio's limit at equal bandwidth); GB/s: tok/s x "
        "weight bytes (each weight is read once per decoded token at batch 1; tok/s includes the prompt pass)"
    )


def _gbs(tokens_per_second: float, weight_bytes: int) -> float:
    return tokens_per_second * weight_bytes / 1e9


if __name__ == "__main__":
    main()
