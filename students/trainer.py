"""Fine-tune a causal LM student on (prompt, target) examples; completion-only loss.

A plain loop: AdamW, warm-up + cosine/linear schedule, gradient accumulation with token-weighted
loss, length-grouped batches, deterministic for a seed, one CPU thread (CUDA when present).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
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
    dev: list[dict] = field(default_factory=list)  # one entry per dev evaluation (step 0 = before training)
    best_step: int | None = None  # the step whose weights the model holds at the end (with a dev set)
    stop_reason: str = ""

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


def forward_loss(model, batch, kd=None, parts: dict | None = None):
    """Completion-only loss; projects through the LM head only where a target token is predicted.

    With ``kd`` (a ``KDSettings``) and teacher top-k in the batch: ``(1 - w) * CE + w * KD`` (the KD
    term alone goes to ``parts["kd"]`` when ``parts`` is given).
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
            batch.get("kd_ids"),  # none for ULD
            batch["kd_logprobs"],
            batch["kd_mask"],
            kd.loss,
            kd.temperature,
            kd.beta,
            kd.weight,
            parts,
        )
    return selected_cross_entropy(hidden, head, batch["labels"])


def task_weight(cfg, task: str) -> float:
    """Loss weight of a task: multitask uses alpha for [label] and 1 - alpha for [explain]."""
    if getattr(cfg, "format", None) == "multitask" and task != "on_policy":
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


def planned_steps(n_examples: int, cfg) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch): ``cfg.epochs`` passes, or ``validation.max_epochs`` for auto."""
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    val = getattr(cfg, "validation", None)
    epochs = val.max_epochs if cfg.epochs == "auto" else cfg.epochs
    return max(1, math.ceil(steps_per_epoch * epochs)), steps_per_epoch


def evaluation_interval(every: int, steps_per_epoch: int) -> int:
    """Optimizer steps between dev evaluations: ``every``, or twice per epoch and at least every 50 steps."""
    return every or max(1, min(50, math.ceil(steps_per_epoch / 2)))


def improves(entry: dict, best: dict | None, metric: str) -> bool:
    """Whether a dev evaluation beats the best so far: higher accuracy (lower loss breaks a tie), or lower loss."""
    if best is None:
        return True
    if metric == "loss":
        return entry["dev_loss"] < best["dev_loss"]
    return (entry["dev_accuracy"], -entry["dev_loss"]) > (best["dev_accuracy"], -best["dev_loss"])


def target_counts(chosen: list[dict]) -> dict[str, int]:
    """Target tokens per loss task in a global batch: the denominators of its token-weighted mean."""
    n_target: dict[str, int] = {}
    for e in chosen:
        t = e.get("task", "rationale")
        n_target[t] = n_target.get(t, 0) + sum(1 for x in e["labels"][1:] if x != -100)
    return n_target


def accumulate_gradients(model, chosen: list[dict], n_target: dict[str, int], cfg, pad_id: int, kd, bf16: bool):
    """Backward of ``chosen``'s share of a global batch's loss, micro-batch by micro-batch; returns
    ``(loss, kd term or None, tokens)`` of that share.

    Token-weighted mean per loss task over the global batch (``n_target``), combined with the task
    weights (multitask: alpha): shares of one batch add up to the whole batch's loss and gradient.
    """
    import torch

    device = next(model.parameters()).device
    micro = [chosen[i : i + cfg.micro_batch_size] for i in range(0, len(chosen), cfg.micro_batch_size)]
    step_loss, step_kd, tokens = 0.0, None, 0
    for mb in micro:
        for t in sorted({e.get("task", "rationale") for e in mb}):
            group = [e for e in mb if e.get("task", "rationale") == t]
            if cfg.packing:
                group = pack_examples(group, cfg.max_length)
            batch = {k: _to(v, device) for k, v in collate(group, pad_id).items()}
            parts: dict = {}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, n = forward_loss(model, batch, kd, parts)
            w = task_weight(cfg, t) * n / max(n_target[t], 1)
            (loss * w).backward()
            step_loss += loss.item() * float(w)
            if "kd" in parts:  # the KD term alone, weighted as the loss is
                step_kd = (step_kd or 0.0) + parts["kd"].item() * float(w)
            tokens += batch["n_tokens"] if "n_tokens" in batch else int(batch["attention_mask"].sum())
    return step_loss, step_kd, tokens


def optimizer_step(model, opt, sched) -> None:
    """Clip the gradient norm at 1, step the optimizer and the schedule, clear the gradients."""
    import torch

    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class Replica:
    """One copy of a data-parallel run of ``train`` (``students.distributed`` builds them): copy ``rank``
    of ``world_size`` trains on its shard of every global batch; the hooks keep the copies one model.

    ``reduce_gradients(model)`` sums the gradients over the copies; ``sum_step(loss, kd, tokens)``
    returns the step's totals over the copies; ``share(obj)`` returns rank 0's ``obj`` on every copy;
    ``checkpointed(folder)`` is called by every copy after each checkpoint (rank 0's folder, else None).
    """

    rank: int
    world_size: int
    reduce_gradients: Callable
    sum_step: Callable
    share: Callable
    checkpointed: Callable

    @property
    def writes(self) -> bool:
        """Whether this copy writes the checkpoints and best weights (rank 0 only)."""
        return self.rank == 0

    def shard(self, chosen: list[dict]) -> list[dict]:
        """This copy's disjoint contiguous part of a global batch (the last ones may be shorter or empty)."""
        size = math.ceil(len(chosen) / self.world_size)
        return chosen[self.rank * size : (self.rank + 1) * size]


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after`` (tests simulate a crash with it); the last checkpoint survives."""


CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_RNG = "rng.json"
CHECKPOINT_BEST = "best.safetensors"  # the best dev checkpoint's weights, beside the resumable one


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
    best = folder / CHECKPOINT_BEST
    if best.exists():  # the best dev weights travel with the checkpoint (a hard link: no copy, no gap)
        try:
            os.link(best, tmp / CHECKPOINT_BEST)
        except OSError:
            shutil.copy2(best, tmp / CHECKPOINT_BEST)
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
    dev=None,
    on_log=None,
    on_policy=None,
    kd=None,
    replica: Replica | None = None,
) -> TrainResult:
    """Train ``model`` in place on tokenized ``examples`` per a ``StudentConfig``; returns the loss log.

    With ``checkpoint_dir``, a checkpoint is written every ``cfg.save_every`` steps and, if one is
    there already, training continues from it — to the same weights an uninterrupted run reaches.

    With ``dev`` (a callable ``model -> {"dev_loss", "dev_accuracy", ...}``, e.g. ``students.validation.DevSet``)
    and ``cfg.validation``: the dev split is scored before training and every ``validation.every`` steps;
    training stops when ``validation.metric`` has not improved for ``patience`` evaluations (or at the
    epoch, time or token cap), and the model ends holding the best evaluation's weights.

    ``on_log(step, metrics)`` (e.g. ``students.trackers.Trackers.log``) gets ``train/loss`` and
    ``train/lr`` after every optimizer step and ``dev/loss``, ``dev/accuracy`` after every dev evaluation.

    With ``on_policy`` (a ``students.on_policy.OnPolicy``), the steps it picks train on the student's
    own samples of that batch's questions, scored by the teacher (its divergence loss); its spend
    counters travel with the checkpoint and its budget stops training with ``BudgetExceeded``.

    ``kd`` (a ``KDSettings``): the logit-distillation loss of batches that carry top-k targets
    (default: ``cfg.kd`` when ``cfg.format`` is ``kd``, else none).

    ``replica`` (a ``Replica``): this call is one copy of a data-parallel run — it trains on its shard
    of each global batch, the copies' gradients are summed before each step (so every copy holds the
    weights one process would), dev scores and stop decisions come from rank 0, and only rank 0 writes
    to ``checkpoint_dir`` (every copy resumes from its own copy of it).
    """
    import torch

    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    model.train()
    model.config.use_cache = False
    lengths = [len(e["input_ids"]) for e in examples]
    total, steps_per_epoch = planned_steps(len(examples), cfg)
    val = getattr(cfg, "validation", None) if dev is not None else None
    every = evaluation_interval(val.every, steps_per_epoch) if val else 0
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
    if kd is None:
        kd = cfg.kd if getattr(cfg, "format", None) == "kd" else None
    pos = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "tokens": 0,
        "log": [],
        "dev": [],
        "best": None,
        "stale": 0,
        "seconds": 0.0,
        "on_policy": None,
    }
    best_state = None
    writes = replica is None or replica.writes
    if checkpoint_dir is not None and (checkpoint_dir / CHECKPOINT_RNG).exists():
        pos = {**pos, **load_checkpoint(checkpoint_dir, model, opt, sched)}
        if (checkpoint_dir / CHECKPOINT_BEST).exists():
            from safetensors.torch import load_file

            best_state = load_file(str(checkpoint_dir / CHECKPOINT_BEST))
    if on_policy is not None and pos["on_policy"]:
        on_policy.state.update(pos["on_policy"])
    log, tokens, step, epoch = pos["log"], pos["tokens"], pos["step"], pos["epoch"]
    dev_log, skip = pos["dev"], pos["batch"]
    t0 = time.time() - pos["seconds"]  # wall time of earlier attempts counts against max_minutes
    stop_reason = ""

    def evaluate_dev() -> None:
        nonlocal best_state
        scores = dev(model) if writes else None
        if replica is not None:  # rank 0 scores, every copy takes the same decisions from its scores
            scores = replica.share(scores)
        entry = {"step": step, "epoch": round(step / steps_per_epoch, 3), **scores, "seconds": time.time() - t0}
        dev_log.append(entry)
        if on_log:
            on_log(step, {"dev/loss": entry["dev_loss"], "dev/accuracy": entry["dev_accuracy"]})
        if improves(entry, pos["best"], val.metric):
            pos["best"], pos["stale"] = entry, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if checkpoint_dir is not None and writes:
                from safetensors.torch import save_file

                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                save_file(_untied(best_state), str(checkpoint_dir / CHECKPOINT_BEST))
        else:
            pos["stale"] += 1

    with progress_bar("train", total) as advance:
        advance(step, "resumed" if step else "")
        if val and not dev_log:
            evaluate_dev()  # the untrained student: where the curve starts
        while step < total and not stop_reason:
            batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch, grouped=not cfg.packing)
            for bi, batch_idx in enumerate(batches):
                if bi < skip:
                    continue
                if step >= total:
                    break
                chosen, step_kd_cfg = [examples[i] for i in batch_idx], kd
                if on_policy is not None and on_policy.use(step):
                    spent = on_policy.over_budget()
                    if spent:
                        from distill.teachers.budget import BudgetExceeded

                        raise BudgetExceeded(
                            f"on-policy scoring stopped at step {step}: {spent}",
                            "raise student.on_policy.max_tokens / max_cost and run again: training resumes from "
                            "its last checkpoint and scores already paid for come from the cache",
                        )
                    sampled = on_policy.examples(model, [e["question"] for e in chosen], step)
                    if sampled:  # no usable sample (all empty or unscorable): the teacher-written batch
                        chosen, step_kd_cfg = sampled, on_policy.kd
                n_target = target_counts(chosen)
                mine = chosen if replica is None else replica.shard(chosen)
                step_loss, step_kd, step_tokens = accumulate_gradients(
                    model, mine, n_target, cfg, pad_id, step_kd_cfg, bf16
                )
                if replica is not None:  # every copy's share of the global batch's gradient and loss, summed
                    replica.reduce_gradients(model)
                    step_loss, step_kd, step_tokens = replica.sum_step(step_loss, step_kd, step_tokens)
                tokens += step_tokens
                optimizer_step(model, opt, sched)
                log.append({"step": step, "epoch": epoch, "loss": step_loss, "lr": sched.get_last_lr()[0]})
                if step_kd is not None:
                    log[-1]["kd"] = step_kd
                if step_kd_cfg is not kd:
                    log[-1]["on_policy"] = True
                step += 1
                if on_log:
                    on_log(step, {"train/loss": step_loss, "train/lr": sched.get_last_lr()[0]})
                status = f"loss {step_loss:.3f}, {tokens / max(time.time() - t0, 1e-9):.0f} tok/s"
                if val and step % every == 0:
                    evaluate_dev()
                    last = dev_log[-1]
                    status += f", dev {last['dev_accuracy']:.0%} / loss {last['dev_loss']:.3f}"
                    if pos["stale"] >= val.patience:
                        best = pos["best"]
                        stop_reason = (
                            f"dev {val.metric} did not improve for {val.patience} evaluations "
                            f"(best {best['dev_accuracy']:.1%}, loss {best['dev_loss']:.3f} at step {best['step']})"
                        )
                if val and val.max_minutes and time.time() - t0 >= 60 * val.max_minutes and not stop_reason:
                    stop_reason = f"time budget of {val.max_minutes:g} minutes reached"
                if replica is not None and val and val.max_minutes:  # clocks differ: rank 0's decides
                    stop_reason = replica.share(stop_reason)
                if val and val.max_tokens and tokens >= val.max_tokens and not stop_reason:
                    stop_reason = f"token budget of {val.max_tokens} tokens reached"
                advance(1, status)
                if checkpoint_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < total:
                    position = {
                        "step": step,
                        "epoch": epoch,
                        "batch": bi + 1,
                        "tokens": tokens,
                        "log": log,
                        "dev": dev_log,
                        "best": pos["best"],
                        "stale": pos["stale"],
                        "seconds": time.time() - t0,
                        "on_policy": on_policy.state if on_policy is not None else None,
                    }
                    if writes:
                        save_checkpoint(checkpoint_dir, model, opt, sched, position)
                    if replica is not None:
                        replica.checkpointed(checkpoint_dir if writes else None)
                if stop_after is not None and step >= stop_after:
                    raise TrainingInterrupted(f"stopped after step {step}")
                if stop_reason:
                    break
            else:
                epoch += 1
                skip = 0
    if not stop_reason:
        epochs = f"{total / steps_per_epoch:g} epochs"
        stop_reason = f"{epochs} done (validation.max_epochs)" if cfg.epochs == "auto" else f"{epochs} done"
    best_step = None
    if val:
        if dev_log[-1]["step"] != step:
            evaluate_dev()  # the final weights get their evaluation too
        best_step = pos["best"]["step"]
        if best_step != step:
            model.load_state_dict({k: v.to(device) for k, v in best_state.items()})
    model.eval()
    model.config.use_cache = True
    return TrainResult(
        steps=step,
        tokens=tokens,
        seconds=time.time() - t0,
        losses=log,
        dev=dev_log,
        best_step=best_step,
        stop_reason=stop_reason,
    )


def _untied(state: dict) -> dict:
    """A state dict safetensors can store: tensors that share memory (tied embeddings) are copied."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def sweep_learning_rates(build_model, examples: list[dict], cfg, pad_id: int, dev) -> list[dict]:
    """``lr: auto``: a fresh ``build_model()`` trained for ``cfg.lr_sweep.steps`` steps (0 = one epoch,
    at most 40) at each candidate peak learning rate, same schedule shape and seed; returns one
    ``{"lr", "steps", "dev_loss", "train_loss"}`` per candidate, in candidate order (lowest dev loss wins)."""
    _, steps_per_epoch = planned_steps(len(examples), cfg)
    steps = cfg.lr_sweep.steps or min(steps_per_epoch, 40)
    out = []
    for lr in cfg.lr_sweep.candidates:
        model = build_model()
        short = cfg.model_copy(
            update={"lr": lr, "epochs": steps / steps_per_epoch, "validation": None, "save_every": 0}
        )
        result = train(model, examples, short, pad_id)
        out.append(
            {"lr": lr, "steps": result.steps, "dev_loss": dev.loss(model), "train_loss": result.losses[-1]["loss"]}
        )
        del model
    return out


def best_learning_rate(sweep: list[dict]) -> float:
    """The swept learning rate with the lowest dev loss (the smaller one on a tie)."""
    return min(sweep, key=lambda r: (r["dev_loss"], r["lr"]))["lr"]


def save_student(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` model and tokenizer (safetensors) into ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
