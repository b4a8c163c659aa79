"""Training examples for students: prompt (the question in the student's chat format) → target.

Formats: ``rationale`` (Fine-tune-CoT: reasoning, then "Therefore, the answer is X."), ``label``
(answer only — the baseline) and ``multitask`` (Distilling step-by-step: each question twice, with a
``[label]`` prefix → the answer and an ``[explain]`` prefix → the rationale; the student answers with
the ``[label]`` prefix). Loss is on the target tokens only. Format ``kd`` adds the teacher's top-k
log-probabilities: on the teacher's own tokens (``kd_example``) or, across tokenizers, on the
student's tokens of the same text aligned by index (``uld_example``).
"""

from __future__ import annotations

import random

from distill.core.answers import Task
from distill.core.code import without_solution

PLACEHOLDER = "<<<DISTILL_QUESTION>>>"


LABEL_PREFIX, EXPLAIN_PREFIX = "[label] ", "[explain] "


def prompt_template(tokenizer, fmt: str = "rationale") -> str:
    """The student's prompt with ``PLACEHOLDER`` where the question goes (stored in export bundles).

    A multitask student is asked with the ``[label]`` prefix, the task it answers with.
    """
    content = (LABEL_PREFIX if fmt == "multitask" else "") + PLACEHOLDER
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    return f"Question: {content}\nAnswer: "


def render_prompt(template: str, question: str) -> str:
    return template.replace(PLACEHOLDER, question)


def target_text(row: dict, fmt: str, task: Task, trigger: str = "Let's think step by step.") -> str:
    """The completion a student learns for one dataset row."""
    answer = row["pred"] if row.get("pred") is not None else row["gold"]
    if fmt == "label":
        return task.answer_sentence(answer)
    return f"{trigger} {_rationale(row, task, answer)}\n{task.answer_sentence(answer)}"


def rationale_text(row: dict, task: Task) -> str:
    """The rationale a student trains on for ``row`` (between the trigger and the answer sentence)."""
    return _rationale(row, task, row["pred"] if row.get("pred") is not None else row["gold"])


def _rationale(row: dict, task: Task, answer: str) -> str:
    """The row's rationale, stripped; for code, without the solution block a teacher's output holds
    (the answer sentence states it: the student learns to write it once)."""
    rationale = row["rationale"].strip()
    return without_solution(rationale, answer) if task.answer_type == "code" else rationale


def build_examples(
    tokenizer,
    rows: list[dict],
    fmt: str,
    task: Task,
    max_length: int,
    trigger: str = "Let's think step by step.",
    kd_loss: str = "forward_kl",
) -> list[dict]:
    """Tokenized training examples for ``rows`` in format ``fmt``; each carries its loss ``task``.

    Format ``kd`` keeps the rows with teacher tokens: with ``kd_loss="uld"`` as ``uld_example`` (the
    student's own tokens), else as ``kd_example`` (the teacher's tokens).
    """
    template = prompt_template(tokenizer)  # the bare question; multitask adds its own prefixes
    out = []
    for r in rows:
        if fmt == "kd":
            if r.get("teacher_token_ids"):
                make = uld_example if kd_loss == "uld" else kd_example
                ex = make(tokenizer, render_prompt(template, r["question"]), r, task, max_length, trigger)
                out.append({**ex, "task": "kd", "question": r["question"]})
            continue
        if fmt == "multitask":
            for prefix, part, sub in ((LABEL_PREFIX, "label", "label"), (EXPLAIN_PREFIX, "rationale", "rationale")):
                ex = tokenize_example(
                    tokenizer, render_prompt(template, prefix + r["question"]), target_text(r, part, task), max_length
                )
                out.append({**ex, "task": sub, "question": r["question"]})
        else:
            ex = tokenize_example(
                tokenizer, render_prompt(template, r["question"]), target_text(r, fmt, task), max_length
            )
            out.append({**ex, "task": fmt, "question": r["question"]})
    return out


def tokenize_example(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """input_ids + labels (-100 on the prompt), EOS appended, truncated to ``max_length``."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (p + t)[:max_length]
    labels = ([-100] * len(p) + t)[:max_length]
    return {"input_ids": ids, "labels": labels}


def kd_example(tokenizer, prompt: str, row: dict, task: Task, max_length: int, trigger: str) -> dict:
    """A logit-KD example: the teacher's own rationale tokens (not re-tokenized text) after the trigger,
    then the answer sentence; ``kd_pos`` are the positions of teacher tokens, with the teacher's top-k
    ids and log-probabilities at each."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    head = tokenizer(trigger, add_special_tokens=False).input_ids
    teacher = list(row["teacher_token_ids"])
    answer = row["pred"] if row.get("pred") is not None else row["gold"]
    tail = tokenizer("\n" + task.answer_sentence(answer), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = p + head + teacher + tail
    labels = [-100] * len(p) + head + teacher + tail
    start = len(p) + len(head)
    pos = [start + j for j in range(len(teacher)) if start + j < max_length]
    return {
        "input_ids": ids[:max_length],
        "labels": labels[:max_length],
        "kd_pos": pos,
        "kd_ids": [list(x) for x in row["teacher_topk_ids"][: len(pos)]],
        "kd_logprobs": [list(x) for x in row["teacher_topk_logprobs"][: len(pos)]],
    }


def uld_example(tokenizer, prompt: str, row: dict, task: Task, max_length: int, trigger: str) -> dict:
    """A cross-tokenizer KD example: the ``rationale`` format's example (the student's own tokens),
    with the teacher's top-k log-probabilities of its j-th rationale token on the student's j-th
    rationale token, for j below the shorter of the two (ULD aligns response tokens by index).

    The student's rationale tokens are those after the trigger and before the answer sentence; their
    span is counted by tokenizing the target up to each boundary. No ``kd_ids``: ULD compares sorted
    probabilities, never token ids.
    """
    answer = row["pred"] if row.get("pred") is not None else row["gold"]
    rationale = _rationale(row, task, answer)
    ex = tokenize_example(tokenizer, prompt, target_text(row, "rationale", task, trigger), max_length)
    p = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    start = p + len(tokenizer(trigger, add_special_tokens=False).input_ids)
    end = p + len(tokenizer(f"{trigger} {rationale}", add_special_tokens=False).input_ids)
    n = min(end - start, len(row["teacher_topk_logprobs"]))
    pos = [start + j for j in range(n) if start + j < len(ex["input_ids"])]
    return {**ex, "kd_pos": pos, "kd_logprobs": [list(x) for x in row["teacher_topk_logprobs"][: len(pos)]]}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, grouped: bool = True) -> list[list[int]]:
    """Shuffled batches of indices with similar lengths (less padding), deterministic for a seed.

    ``grouped=False`` keeps the shuffled order (packing mixes lengths on purpose).
    """
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 8
    batches = []
    for start in range(0, len(idx), chunk):
        group = idx[start : start + chunk]
        if grouped:
            group = sorted(group, key=lambda i: lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Examples packed into as few rows of at most ``max_length`` tokens as first-fit-decreasing finds.

    Each row carries ``position_ids`` restarting at 0 for every example: the model then attends only
    within an example (transformers builds a block-diagonal causal mask from them). The first label of
    every example is masked: in an unpacked row position 0 predicts nothing either, so the loss is
    the same as without packing.
    """
    rows: list[list[dict]] = []
    used: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        slot = next((i for i, u in enumerate(used) if u + n <= max_length), None)
        if slot is None:
            rows.append([])
            used.append(0)
            slot = len(rows) - 1
        rows[slot].append(e)
        used[slot] += n
    packed = []
    for row in rows:
        out: dict = {"input_ids": [], "labels": [], "position_ids": []}
        kd = [key for key in ("kd_ids", "kd_logprobs") if any(e.get("kd_pos") and key in e for e in row)]
        if kd:
            out.update({key: [] for key in ("kd_pos", *kd)})
        for e in row:
            start = len(out["input_ids"])
            out["input_ids"] += e["input_ids"]
            out["labels"] += [-100] + e["labels"][1:]
            out["position_ids"] += list(range(len(e["input_ids"])))
            if kd and e.get("kd_pos"):
                out["kd_pos"] += [start + p for p in e["kd_pos"]]
                for key in kd:  # ULD examples carry no kd_ids
                    out[key] += e[key]
        packed.append(out)
    return packed


def collate(examples: list[dict], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (and teacher top-k for logit KD).

    Packed rows (with ``position_ids``) get no attention mask: their position ids separate the
    examples, and the padding after the last one restarts at 0 so nothing attends to it.
    """
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = "position_ids" in examples[0]
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e["position_ids"])
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        batch = {"input_ids": ids, "position_ids": positions, "labels": labels, "n_tokens": int(mask.sum())}
    if any(e.get("kd_pos") for e in examples):  # logit KD: teacher top-k at the aligned positions
        first = next(e for e in examples if e.get("kd_pos"))
        k = len(first["kd_logprobs"][0])
        with_ids = "kd_ids" in first  # ULD examples carry log-probabilities only
        if with_ids:
            batch["kd_ids"] = torch.zeros((len(examples), width, k), dtype=torch.long)
        batch["kd_logprobs"] = torch.zeros((len(examples), width, k), dtype=torch.float32)
        batch["kd_mask"] = torch.zeros((len(examples), width), dtype=torch.bool)
        for i, e in enumerate(examples):
            if e.get("kd_pos"):
                pos = torch.tensor(e["kd_pos"])
                if with_ids:
                    batch["kd_ids"][i, pos] = torch.tensor(e["kd_ids"])
                batch["kd_logprobs"][i, pos] = torch.tensor(e["kd_logprobs"], dtype=torch.float32)
                batch["kd_mask"][i, pos] = True
    return batch
