"""Teacher generation throughput, every figure against a baseline in the same run.

    .venv/bin/python bench/teacher_throughput.py [--model embedded:smollm2-135m-instruct] [--prompts 64]

1. naive per-example ``generate`` loop vs the transformers backend (batched, length-bucketed), 1 thread;
2. the generate stage with 1 Ray actor vs 2 (2 cores);
3. re-running a finished generate stage: teacher calls and wall time vs the first run;
4. self-consistency sampling (few-shot CoT prompts, N samples each): ``generate(num_return_sequences=N,
   do_sample=True)`` vs the backend (one prefill per prompt, rows leave as they end), 1 thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()

for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(k, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (teacher.batch_size)")
    ap.add_argument("--only", type=int, choices=[1, 2, 3, 4], help="run one measurement (3 needs 2)")
    ap.add_argument("--samples", type=int, default=5, help="self-consistency samples per prompt (measurement 4)")
    args = ap.parse_args()

    import torch

    from distill.config import Recipe
    from distill.core.problems import load_problems
    from distill.core.sources import resolve_model
    from distill.teachers.backends.base import Decoding
    from distill.teachers.backends.transformers import TransformersBackend

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    task = {
        "name": "chain_sum",
        "params": {"min_terms": 3, "max_terms": 4, "max_digits": 1},
        "train_size": args.prompts,
        "eval_size": 8,
    }
    recipe = Recipe.model_validate({"task": task})
    train, evals = load_problems(recipe.task)
    backend = TransformersBackend(path, dtype="float32", batch_size=args.batch_size)
    prompts = [
        backend.chat_prompt([{"role": "user", "content": p["question"]}], "Let's think step by step.")
        for p in train[:32]  # the naive loop is slow: 32 prompts are enough for a stable ratio
    ]
    dec = Decoding(max_new_tokens=args.new_tokens)

    if args.only in (None, 1):
        naive_vs_batched(backend, prompts, dec, args.new_tokens)
    if args.only in (None, 4):
        self_consistency(backend, train, args.samples)
    if args.only in (None, 2, 3):
        ray_actors(path, task, args)


def naive_vs_batched(backend, prompts, dec, new_tokens) -> None:
    """1. naive loop vs batched backend (same prompts, same greedy decoding, same process)."""
    import torch

    from distill.teachers.backends.base import GenerationRequest

    tok, model = backend.tokenizer, backend.model
    t0 = time.perf_counter()
    naive_tokens = 0
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        naive_tokens += int((out[0, ids["input_ids"].shape[1] :] != tok.pad_token_id).sum())
    naive = naive_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    comps = backend.generate([GenerationRequest(p, dec) for p in prompts])
    batched = sum(c.tokens_out for c in comps) / (time.perf_counter() - t0)
    print(
        f"1. naive generate loop {naive:.1f} tok/s; batched backend {batched:.1f} tok/s; ratio {batched / naive:.2f}x"
    )


def _chain_rationale(question: str) -> tuple[str, int]:
    """A left-to-right worked solution of a chain_sum question (for few-shot demonstrations)."""
    terms = question.rsplit(":", 1)[-1].strip().rstrip("=").split()
    total, steps = int(terms[0]), []
    for op, t in zip(terms[1::2], terms[2::2]):
        new = total + int(t) if op == "+" else total - int(t)
        steps.append(f"{total} {op} {t} = {new}.")
        total = new
    return " ".join(steps), total


def self_consistency(backend, problems, samples: int, n_prompts: int = 9, new_tokens: int = 48) -> None:
    """4. N sampled paths per few-shot CoT prompt: HF generate(num_return_sequences) vs the backend.
    The prompts are the ones ``teacher.method: self_consistency`` sends, with 4 worked demonstrations."""
    import torch

    from distill.config import Demo, TeacherConfig
    from distill.core.answers import Task
    from distill.teachers.backends.base import Decoding, GenerationRequest
    from distill.teachers.methods import _messages

    demos = []
    for p in problems[-4:]:
        rationale, answer = _chain_rationale(p["question"])
        demos.append(Demo(question=p["question"], rationale=rationale, answer=str(answer)))
    cfg = TeacherConfig(method="self_consistency", samples=samples, demos=demos)
    prompts = [
        backend.chat_prompt(_messages(p["question"], cfg, Task("number")), assistant_prefix=cfg.trigger)
        for p in problems[:n_prompts]
    ]
    tok, model = backend.tokenizer, backend.model
    per_batch = max(1, backend.batch_size // samples)  # prompts per call, so both decode the same rows per batch
    dec = Decoding(max_new_tokens=new_tokens, temperature=0.7, top_p=0.95)
    t0 = time.perf_counter()
    hf_tokens = 0
    torch.manual_seed(0)
    for i in range(0, len(prompts), per_batch):
        batch = tok.pad(
            {"input_ids": [tok(p, add_special_tokens=False).input_ids for p in prompts[i : i + per_batch]]},
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                do_sample=True,
                temperature=dec.temperature,
                top_p=dec.top_p,
                top_k=None,
                num_return_sequences=samples,
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            hf_tokens += next((k + 1 for k, t in enumerate(row) if t in backend.eos_ids), len(row))
    hf = hf_tokens / (time.perf_counter() - t0)
    backend.batch_size = per_batch * samples
    t0 = time.perf_counter()
    comps = backend.generate([GenerationRequest(p, dec, s) for p in prompts for s in range(samples)])
    ours = sum(c.tokens_out + (c.finish_reason == "stop") for c in comps) / (time.perf_counter() - t0)
    plen = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) / len(prompts)
    print(
        f"4. self-consistency, {len(prompts)} few-shot prompts (~{plen:.0f} tokens) x {samples} samples, "
        f"{backend.batch_size} rows per batch: generate(num_return_sequences) {hf:.1f} tok/s; "
        f"backend {ours:.1f} tok/s; ratio {ours / hf:.2f}x"
    )


def ray_actors(path, task, args) -> None:
    """2. the generate stage through Ray, 1 actor vs 2 (fresh caches, same problems); 3. its re-run."""
    from distill.config import Recipe
    from distill.core.executor import init_ray
    from distill.pipeline import run_stage

    init_ray(num_cpus=2)  # cluster start-up is not part of either measurement
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            r = Recipe.model_validate(
                {
                    "name": f"w{workers}",
                    "output_dir": f"{tmp}/runs",
                    "cache": f"{tmp}/cache{workers}.sqlite",
                    "task": task,
                    "teacher": {
                        "model": f"hf:{path}",
                        "dtype": "float32",
                        "workers": workers,
                        "batch_size": 8,
                        "max_new_tokens": args.new_tokens,
                        "keep": "all",
                        "shard_rows": 8,
                    },
                }
            )
            marks: list[tuple[float, int]] = []  # (time, tokens out) at every committed batch

            def mark(stats, marks=marks):
                marks.append((time.perf_counter(), stats["tokens_out"]))

            t0 = time.perf_counter()
            m = run_stage(r, "generate", force=True, on_progress=mark).metrics
            wall = time.perf_counter() - t0
            # steady state: from the first committed batch to the last (actor start and weight load excluded)
            steady = (marks[-1][1] - marks[0][1]) / max(marks[-1][0] - marks[0][0], 1e-9)
            rates[workers] = (m["tokens_out"] / wall, wall, r, steady)
        print(
            f"2. Ray actors, whole stage: 1 → {rates[1][0]:.1f} tok/s ({rates[1][1]:.0f}s), 2 → {rates[2][0]:.1f} "
            f"tok/s ({rates[2][1]:.0f}s); ratio {rates[2][0] / rates[1][0]:.2f}x. Steady state (first to last "
            f"batch): {rates[1][3]:.1f} vs {rates[2][3]:.1f} tok/s; ratio {rates[2][3] / rates[1][3]:.2f}x"
        )

        # 3. re-run the finished 2-actor job: every row from the cache
        r = rates[2][2]
        t0 = time.perf_counter()
        m = run_stage(r, "generate", force=True).metrics
        again = time.perf_counter() - t0
        print(
            f"3. re-run: {m['problems'] - m['cached_rows']} teacher calls, {again:.1f}s = "
            f"{again / rates[2][1]:.1%} of the first run's {rates[2][1]:.0f}s"
        )


if __name__ == "__main__":
    main()
