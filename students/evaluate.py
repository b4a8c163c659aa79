"""Greedy evaluation of a torch causal LM on task problems, with per-example outputs."""

from __future__ import annotations

import math

from distill.core.answers import Task
from distill.core.calculator import number_token_ids
from distill.core.progress import progress_bar
from distill.students.data import render_prompt


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def score(outputs: list[str], problems: list[dict], task: Task) -> tuple[dict, list[dict]]:
    """Accuracy (+ 95% CI) of ``outputs`` against ``problems``; returns (summary, per-example rows)."""
    rows = []
    for out, p in zip(outputs, problems):
        q = p["question"]
        ex = task.extract(out, question=q)
        correct, why = task.check(ex.answer, p["gold"], q) if ex.answer is not None else (False, ex.reason)
        rows.append(
            {
                "id": p["id"],
                "question": q,
                "gold": task.normalize_gold(p["gold"], q),
                "output": out,
                "pred": ex.answer,
                "correct": correct,
                "reason": why,
            }
        )
    return summarize(rows), rows


def summarize(rows: list[dict]) -> dict:
    """Accuracy, counts and 95% Wilson interval of per-example rows carrying ``correct``.

    A row with an ``error`` got no answer at all (a teacher call whose retries ran out): it is no
    wrong answer, so it is left out of the accuracy, its interval and ``n``, and counted in ``failed``."""
    scored = [r for r in rows if not r.get("error")]
    correct = sum(bool(r["correct"]) for r in scored)
    lo, hi = wilson_interval(correct, len(scored))
    summary = {"accuracy": correct / max(len(scored), 1), "correct": correct, "n": len(scored), "ci95": [lo, hi]}
    if len(scored) < len(rows):
        summary["failed"] = len(rows) - len(scored)
    return summary


def generate_torch(
    model,
    tokenizer,
    template: str,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int,
    label: str,
    show_progress: bool = True,
    calculator: bool = False,
):
    """Greedy completions from a torch model for ``questions`` rendered with ``template``; with
    ``calculator``, the result of each arithmetic expression the model ends with ``=`` is written for it
    (``distill.core.calculator``)."""
    import contextlib

    import torch

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    model.eval()
    bar = progress_bar(f"eval {label}", len(questions)) if show_progress else contextlib.nullcontext(lambda n: None)
    number_tokens = number_token_ids(tokenizer.get_vocab()) if calculator else []
    with bar as advance:
        for start in range(0, len(questions), batch_size):
            chunk = [render_prompt(template, q) for q in questions[start : start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            processors = (
                [calculator_processor(tokenizer, enc["input_ids"].shape[1], len(chunk), number_tokens)]
                if calculator
                else None
            )
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    logits_processor=processors,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            advance(len(chunk))
    return outs


def calculator_processor(tokenizer, prompt_length: int, rows: int, number_tokens: list[int]):
    """A transformers logits processor that makes ``generate`` write the calculator's tokens: after a
    row's generated text ends in ``<expression> =``, its next tokens are forced to the value's and the
    step after bans ``number_tokens`` (``calculator.number_token_ids``)."""
    import torch
    from transformers import LogitsProcessor

    from distill.core.calculator import WINDOW_TOKENS, CalculatorState

    class CalculatorProcessor(LogitsProcessor):
        def __init__(self):
            self.state = CalculatorState(
                rows, lambda text: tokenizer.encode(text, add_special_tokens=False), number_tokens
            )

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            new = input_ids[:, prompt_length:]
            if new.shape[1] == 0:
                return scores
            for row in range(new.shape[0]):
                text = tokenizer.decode(new[row, -WINDOW_TOKENS:], skip_special_tokens=True)
                forced = self.state.next_forced(row, text)
                if forced is not None:
                    scores[row] = torch.finfo(scores.dtype).min
                    scores[row, forced] = 0.0
                elif self.state.blocks_digits(row):
                    scores[row, self.state.number_tokens] = torch.finfo(scores.dtype).min
            return scores

    return CalculatorProcessor()
