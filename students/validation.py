"""The dev split and what is measured on it while a student trains: dev loss and dev task accuracy.

The dev split is carved from the training rows by question (every row of a question goes to the
same side), chosen by a hash of the question text and the seed: the same rows for the same data,
whatever their order. The eval split is never touched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from distill.core.answers import Task


def split_dev(rows: list[dict], dev_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, dev rows): ``dev_size`` questions (all their rows) held out, at most half of them."""
    questions = sorted({r["question"] for r in rows})
    n = min(dev_size, len(questions) // 2)
    if n == 0:
        return rows, []

    def rank(q: str) -> str:
        return hashlib.sha256(f"{seed}\0{q}".encode()).hexdigest()

    dev_questions = set(sorted(questions, key=rank)[:n])
    return [r for r in rows if r["question"] not in dev_questions], [r for r in rows if r["question"] in dev_questions]


@dataclass
class DevSet:
    """Scores a student on the dev split: token-weighted completion loss over ``examples`` and greedy
    accuracy on one question per dev problem (the student's own prompt format, batched)."""

    examples: list[dict]  # tokenized like the training examples
    problems: list[dict]  # one per dev question: question, gold
    tokenizer: object
    template: str  # the student's prompt (students.data.prompt_template)
    task: Task
    max_new_tokens: int
    batch_size: int
    pad_id: int
    calculator: bool = False  # decode as the exported student will (student.calculator)

    def loss(self, model) -> float:
        """Token-weighted completion loss of ``model`` on the dev examples (no generation)."""
        import torch

        from distill.students.data import collate
        from distill.students.trainer import forward_loss

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(self.examples), self.batch_size):
                batch = collate(self.examples[start : start + self.batch_size], self.pad_id)
                batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
                loss, n = forward_loss(model, batch)
                total += float(loss) * int(n)
                count += int(n)
        if was_training:
            model.train()
        return total / max(count, 1)

    def __call__(self, model) -> dict:
        """``{"dev_loss", "dev_accuracy", "dev_correct", "dev_n"}`` of ``model`` now; leaves it in the mode it had."""
        from distill.students.evaluate import generate_torch, score

        was_training = model.training
        dev_loss = self.loss(model)
        use_cache = model.config.use_cache
        model.config.use_cache = True  # generation with a KV cache; training runs without one
        try:
            outs = generate_torch(
                model,
                self.tokenizer,
                self.template,
                [p["question"] for p in self.problems],
                self.max_new_tokens,
                self.batch_size,
                "dev",
                show_progress=False,  # inside the training bar: one live display at a time
                calculator=self.calculator,
            )
        finally:
            model.config.use_cache = use_cache
        summary, _ = score(outs, self.problems, self.task)
        if was_training:
            model.train()
        return {
            "dev_loss": dev_loss,
            "dev_accuracy": summary["accuracy"],
            "dev_correct": summary["correct"],
            "dev_n": summary["n"],
        }


def dev_problems(rows: list[dict]) -> list[dict]:
    """One problem per dev question (its first row), with the answer it is scored against: the gold,
    or the teacher's kept answer when the task has no gold (synthetic problems)."""
    seen: dict[str, dict] = {}
    for r in rows:
        if r["question"] not in seen:
            gold = r.get("gold") if r.get("gold") not in (None, "") else r.get("pred")
            seen[r["question"]] = {"id": r.get("id", ""), "question": r["question"], "gold": gold}
    return [p for p in seen.values() if p["gold"] is not None]
