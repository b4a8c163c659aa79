"""Prompting methods: turn problems into teacher requests and completions into rationale rows.

Zero-shot CoT (Kojima et al. 2022): stage 1 appends the reasoning trigger ("Let's think step by
step.") and lets the teacher reason; stage 2 appends the answer trigger ("Therefore, the answer
(arabic numerals) is") to the reasoning and reads the answer. With ``answer_extraction="fallback"``
stage 2 is only paid for when stage 1 states no final answer itself.
"""

from __future__ import annotations

from distill.tasks import Task
from teachers.backends.base import Decoding, GenerationRequest


def zero_shot_cot(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """Answer ``problems`` with two-stage zero-shot CoT; returns one output row per problem."""
    messages = []
    for p in problems:
        m = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append(m + [{"role": "user", "content": p["question"]}])
    stage1 = [teacher.chat_prompt(m, assistant_prefix=cfg.trigger) for m in messages]
    dec1 = Decoding(max_new_tokens=cfg.max_new_tokens)
    first = teacher.generate([GenerationRequest(p, dec1) for p in stage1])

    rows = []
    need_stage2 = []
    for p, prompt, c in zip(problems, stage1, first):
        rationale = c.text.strip()
        ex = task.extract(rationale, fallback_last=False)
        row = {
            "id": p["id"],
            "split": p["split"],
            "question": p["question"],
            "gold": task.normalize_gold(p["gold"]),
            "prompt": prompt,
            "rationale": rationale,
            "answer_raw": "",
            "pred": ex.answer if ex.explicit else None,
            "finish_reason": c.finish_reason,
            "tokens_in": c.tokens_in,
            "tokens_out": c.tokens_out,
            "cached": c.cached,
        }
        if cfg.answer_extraction == "always" or not ex.explicit:
            need_stage2.append(len(rows))
        rows.append(row)

    if need_stage2:
        dec2 = Decoding(max_new_tokens=24, stop=("\n",))
        prompts2 = [f"{stage1[i]} {rows[i]['rationale']}\n{cfg.answer_trigger}" for i in need_stage2]
        second = teacher.generate([GenerationRequest(p, dec2) for p in prompts2])
        for i, c in zip(need_stage2, second):
            row = rows[i]
            row["answer_raw"] = c.text
            row["tokens_in"] += c.tokens_in
            row["tokens_out"] += c.tokens_out
            row["cached"] = row["cached"] and c.cached
            ex = task.extract(c.text)
            row["pred"] = ex.answer if ex.answer is not None else row["pred"]

    for row in rows:
        row["correct"] = task.is_correct(row["pred"], row["gold"])
        row["parse_error"] = None if row["pred"] is not None else "no answer found in rationale or answer prompt"
    return rows


METHODS = {"zero_shot_cot": zero_shot_cot}
