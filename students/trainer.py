"""Fine-tune a causal LM student on (prompt, target) examples; completion-only loss.

A plain loop: AdamW, warm-up + cosine/linear schedule, gradient accumulation with token-weighted
loss, length-grouped batches, deterministic for a seed, one CPU thread (CUDA when present).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.progress import progress_bar
from distill.students.data import collate, length_grouped_batches, pack_examples
from distill.students.losses import completion_cross_entropy, selected_cross_entropy


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def use_bf16(precision: str, device) -> bool:
    """bf16 autocast: on CUDA, or on CPUs with native bf16 (AVX512-BF16/AMX), where it is ~1.6x faster."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def forward_loss(model, batch, kd=None):
    """Completion-only loss; projects through the LM head only where a target token is predicted.

    With ``kd`` (a ``KDSettings``) and teacher top-k in the batch: ``(1 - w) * CE + w * KD``.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # Packed rows carry position_ids and no attention mask (one causal block per example).
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    inputs["use_cache"] = False  # with a cache, transformers would ignore the packed position ids
    if decoder is None or head is None:
        return completion_cross_entropy(model(**inputs).logits, batch["labels"])
    hidden = decoder(**inputs).last_hidden_state
    if kd is not None and "kd_mask" in batch:
        from distill.students.kd import selected_kd_loss

        return selected_kd_loss(
            hidden,
            head,
            batch["labels"],
            batch["kd_ids"],
            batch["kd_logprobs"],
            batch["kd_mask"],
            kd.loss,
            kd.temperature,
            kd.beta,
            kd.weight,
        )
    return selected_cross_entropy(hidden, head, batch["labels"])


def task_weight(cfg, task: str) -> float:
    """Loss weight of a task: multitask uses alpha for [label] and 1 - alpha for [explain]."""
    if getattr(cfg, "format", None) == "multitask":
        return cfg.alpha if task == "label" else 1.0 - cfg.alpha
    return 1.0


def _to(value, device):
    return value.to(device) if hasattr(value, "to") else value


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after`` (tests simulate a crash with it); the last checkpoint survives."""


CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_RNG = "rng.json"


def save_checkpoint(folder: Path, model, opt, sched, position: dict) -> None:
    """Model, optimizer, scheduler, RNG and data position, written to a temp folder then renamed."""
    import json
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import save_model

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()},
        tmp / CHECKPOINT_STATE,
    )
    np_state = np.random.get_state()
    rng = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / CHECKPOINT_RNG).write_text(json.dumps({"rng": rng, "position": position}))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, opt, sched) -> dict:
    """Restore a checkpoint written by ``save_checkpoint``; returns the data position."""
    import json

    import numpy as np
    import torch
    from safetensors.torch import load_model

    load_model(model, str(folder / "model.safetensors"))
    state = torch.load(folder / CHECKPOINT_STATE, weights_only=True)  # tensors and plain containers only
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    meta = json.loads((folder / CHECKPOINT_RNG).read_text())
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = meta["rng"]["numpy"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
    return meta["position"]


def train(
    model,
    examples: list[dict],
    cfg,
    pad_id: int,
    checkpoint_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on tokenized ``examples`` per a ``StudentConfig``; returns the loss log.

    With ``checkpoint_dir``, a checkpoint is written every ``cfg.save_every`` steps and, if one is
    there already, training continues from it — to the same weights an uninterrupted run reaches.
    """
    import torch

    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    model.train()
    model.config.use_cache = False
    lengths = [len(e["input_ids"]) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(total * cfg.warmup_ratio)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",  # one kernel per step on GPU; the CPU path stays the reference
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup, cfg.schedule))
    bf16 = use_bf16(cfg.precision, device)
    kd = cfg.kd if getattr(cfg, "format", None) == "kd" else None
    pos = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "log": []}
    if checkpoint_dir is not None and (checkpoint_dir / CHECKPOINT_RNG).exists():
        pos = load_checkpoint(checkpoint_dir, model, opt, sched)
    log, tokens, step, epoch = pos["log"], pos["tokens"], pos["step"], pos["epoch"]
    skip = pos["batch"]
    t0 = time.time()
    with progress_bar("train", total) as advance:
        advance(step, "resumed" if step else "")
        while step < total:
            batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch, grouped=not cfg.packing)
            for bi, batch_idx in enumerate(batches):
                if bi < skip:
                    continue
                if step >= total:
                    break
                micro = [
                    batch_idx[i : i + cfg.micro_batch_size] for i in range(0, len(batch_idx), cfg.micro_batch_size)
                ]
                # Token-weighted mean per loss task, combined with the task weights (multitask: alpha).
                n_target: dict[str, int] = {}
                for i in batch_idx:
                    t = examples[i].get("task", "rationale")
                    n_target[t] = n_target.get(t, 0) + sum(1 for x in examples[i]["labels"][1:] if x != -100)
                step_loss = 0.0
                for mb in micro:
                    for t in sorted({examples[i].get("task", "rationale") for i in mb}):
                        group = [examples[i] for i in mb if examples[i].get("task", "rationale") == t]
                        if cfg.packing:
                            group = pack_examples(group, cfg.max_length)
                        batch = {k: _to(v, device) for k, v in collate(group, pad_id).items()}
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                            loss, n = forward_loss(model, batch, kd)
                        w = task_weight(cfg, t) * n / max(n_target[t], 1)
                        (loss * w).backward()
                        step_loss += loss.item() * float(w)
                        tokens += batch["n_tokens"] if "n_tokens" in batch else int(batch["attention_mask"].sum())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                log.append({"step": step, "epoch": epoch, "loss": step_loss, "lr": sched.get_last_lr()[0]})
                step += 1
                advance(1, f"loss {step_loss:.3f}, {tokens / (time.time() - t0):.0f} tok/s")
                if checkpoint_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < total:
                    position = {"step": step, "epoch": epoch, "batch": bi + 1, "tokens": tokens, "log": log}
                    save_checkpoint(checkpoint_dir, model, opt, sched, position)
                if stop_after is not None and step >= stop_after:
                    raise TrainingInterrupted(f"stopped after step {step}")
            epoch += 1
            skip = 0
    model.eval()
    model.config.use_cache = True
    return TrainResult(steps=step, tokens=tokens, seconds=time.time() - t0, losses=log)


def save_student(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` model and tokenizer (safetensors) into ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
