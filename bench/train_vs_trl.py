"""Training throughput of distill's student loop vs TRL ``SFTTrainer``, same model, data, batch, length.

Both train SmolLM2-135M-Instruct (full fine-tuning, AdamW, lr 1e-4 linear with 5% warm-up, bf16
autocast where the CPU has it, no gradient checkpointing, 1 thread) on the same pre-tokenized
examples (the recorded InstructGPT-175B coin-flip rationales, completion-only labels) for the same
number of optimizer steps. Each run is its own process (peak RSS is per process); the two are
alternated ``--rounds`` times so a shared machine's load falls on both. Tokens/s counts non-pad tokens
of the training loop only (model loading excluded).

Run:  .venv/bin/python bench/train_vs_trl.py [--steps 6 --rounds 2 --batch 8 --max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT.parent / "shared/data/zero_shot_cot/teacher_logs/coin_flip_zero_shot_cot.log"
STUDENT = "embedded:smollm2-135m-instruct"


def examples(tokenizer, n: int, max_length: int) -> list[dict]:
    """The first ``n`` correct coin-flip rationales as (input_ids, labels), prompt masked."""
    from distill.core.answers import Task
    from distill.core.readers import parse_kojima_log
    from distill.students.data import build_examples

    task = Task("text")
    rows = [
        {**r, "pred": task.extract(r["answer"]).answer}
        for r in parse_kojima_log(LOG)
        if task.is_correct(task.extract(r["answer"]).answer, r["gold"])
    ]
    return build_examples(tokenizer, rows[:n], "rationale", task, max_length)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args) -> dict:
    from distill.config import StudentConfig
    from distill.students.models import load_student
    from distill.students.trainer import train

    model, tok = load_student(STUDENT)
    data = examples(tok, args.steps * args.batch, args.max_length)
    cfg = StudentConfig(
        model=STUDENT,
        epochs=1,
        lr=1e-4,
        schedule="linear",
        warmup_ratio=0.05,
        batch_size=args.batch,
        micro_batch_size=args.batch,
        max_length=args.max_length,
        save_every=0,
    )
    loaded = rss_mb()
    result = train(model, data, cfg, tok.pad_token_id)
    return {"tokens": result.tokens, "seconds": result.seconds, "steps": result.steps, "rss_loaded_mb": loaded}


def run_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distill.students.models import load_student
    from distill.students.trainer import use_bf16

    model, tok = load_student(STUDENT)
    data = examples(tok, args.steps * args.batch, args.max_length)
    tokens = sum(len(e["input_ids"]) for e in data)
    times: dict[str, float] = {}

    class Clock(TrainerCallback):  # the training loop only, as for ours
        def on_train_begin(self, *a, **k):
            times["start"] = time.time()

        def on_train_end(self, *a, **k):
            times["end"] = time.time()

    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        train_sampling_strategy="group_by_length" if args.impl == "trl_grouped" else "random",
        bf16=use_bf16("auto", torch.device("cpu")),
        gradient_checkpointing=False,
        max_length=args.max_length,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data]),
        processing_class=tok,
        callbacks=[Clock()],
    )
    loaded = rss_mb()
    out = trainer.train()
    return {
        "tokens": tokens,
        "seconds": times["end"] - times["start"],
        "steps": out.global_step,
        "rss_loaded_mb": loaded,
    }


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    result = (run_ours if args.impl == "ours" else run_trl)(args)
    result["peak_rss_mb"] = rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--impl", choices=["ours", "trl", "trl_grouped"], help=argparse.SUPPRESS)
    p.add_argument("--no-grouped", action="store_true", help="skip TRL with its length-grouped sampler")
    args = p.parse_args()
    if args.impl:
        return child(args)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    impls = ("ours", "trl") if args.no_grouped else ("ours", "trl", "trl_grouped")
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(args.rounds):
        for impl in impls:
            cmd = [sys.executable, __file__, "--impl", impl, "--steps", str(args.steps), "--batch", str(args.batch)]
            cmd += ["--max-length", str(args.max_length)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[7:])
            runs[impl].append(res)
            print(
                f"round {r + 1} {impl:>11}: {res['tokens'] / res['seconds']:.1f} tok/s, peak RSS {res['peak_rss_mb']:.0f} MB"
            )
    summary = {}
    for impl, rs in runs.items():
        tokens, seconds = sum(x["tokens"] for x in rs), sum(x["seconds"] for x in rs)
        summary[impl] = {
            "tokens_per_second": tokens / seconds,
            "tokens": tokens,
            "seconds": seconds,
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "rss_after_load_mb": max(x["rss_loaded_mb"] for x in rs),
        }
    ratio = {
        k: summary["ours"]["tokens_per_second"] / s["tokens_per_second"] for k, s in summary.items() if k != "ours"
    }
    names = {"ours": "distill", "trl": "TRL SFTTrainer", "trl_grouped": "TRL SFTTrainer, group_by_length sampler"}
    print("| loop | tokens/s | distill / this | peak RSS | RSS after model load |\n|---|---|---|---|---|")
    for impl, s in summary.items():
        r = f"{ratio[impl]:.2f}x" if impl in ratio else "1.00x"
        print(
            f"| {names[impl]} | {s['tokens_per_second']:.1f} | {r} | {s['peak_rss_mb']:.0f} MB "
            f"| {s['rss_after_load_mb']:.0f} MB |"
        )
    print(json.dumps({"args": vars(args), "summary": summary, "ratio": ratio, "runs": runs}))


if __name__ == "__main__":
    main()
