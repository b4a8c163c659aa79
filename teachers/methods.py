"""Prompting methods: turn problems into teacher requests and completions into rationale rows.

- ``zero_shot_cot`` (Kojima et al. 2022): stage 1 appends the reasoning trigger ("Let's think step
  by step.") and lets the teacher reason; stage 2 appends the answer trigger ("Therefore, the
  answer (arabic numerals) is") and reads the answer. With ``answer_extraction="fallback"`` stage 2
  is only paid for when stage 1 states no final answer itself.
- ``few_shot_cot`` (Wei et al. 2022): the same, after worked demonstrations from the recipe.
- ``self_consistency`` (Wang et al. 2023): ``samples`` sampled reasoning paths per problem, majority
  vote over their answers; the agreement ratio is kept as ``confidence`` and the kept rationale is
  the first one that reached the voted answer.
"""

from __future__ import annotations

from collections import Counter

from distill.tasks import Task
from teachers.backends.base import Decoding, GenerationRequest
from teachers.prompts import render


def _messages(question: str, cfg, task: Task) -> list[dict]:
    """System prompt, worked demonstrations (few-shot), then the question."""
    m = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for d in cfg.demos if cfg.method != "zero_shot_cot" else []:
        m += [
            {"role": "user", "content": render(cfg.prompt_template, question=d.question)},
            {"role": "assistant", "content": f"{cfg.trigger} {d.rationale.strip()}\n{task.answer_sentence(d.answer)}"},
        ]
    return m + [{"role": "user", "content": render(cfg.prompt_template, question=question)}]


def _reason(teacher, prompts: list[str], cfg, task: Task, samples: int, decoding: Decoding) -> list[list[dict]]:
    """``samples`` reasoning paths per prompt (stage 1), answers read or asked for (stage 2)."""
    reqs = [GenerationRequest(p, decoding, sample=s) for p in prompts for s in range(samples)]
    first = teacher.generate(reqs)
    paths = []
    for r, c in zip(reqs, first):
        rationale = c.text.strip()
        ex = task.extract(rationale, fallback_last=False)
        paths.append(
            {
                "prompt": r.prompt,
                "rationale": rationale,
                "answer_raw": "",
                "pred": ex.answer if ex.explicit else None,
                "finish_reason": c.finish_reason,
                "tokens_in": c.tokens_in,
                "tokens_out": c.tokens_out,
                "cached": c.cached,
                "explicit": ex.explicit,
            }
        )
    todo = [i for i, p in enumerate(paths) if cfg.answer_extraction == "always" or not p["explicit"]]
    if todo:
        dec2 = Decoding(max_new_tokens=24, stop=("\n",))
        second = teacher.generate(
            [
                GenerationRequest(f"{paths[i]['prompt']} {paths[i]['rationale']}\n{cfg.answer_trigger}", dec2)
                for i in todo
            ]
        )
        for i, c in zip(todo, second):
            p = paths[i]
            p["answer_raw"] = c.text
            p["tokens_in"] += c.tokens_in
            p["tokens_out"] += c.tokens_out
            p["cached"] = p["cached"] and c.cached
            ex = task.extract(c.text)
            p["pred"] = ex.answer if ex.answer is not None else p["pred"]
    return [paths[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def _rows(problems: list[dict], groups: list[list[dict]], task: Task) -> list[dict]:
    """One row per problem: majority answer over its paths, the first path reaching it, agreement."""
    rows = []
    for p, paths in zip(problems, groups):
        votes = Counter(x["pred"] for x in paths if x["pred"] is not None)
        pred = max(votes, key=lambda a: (votes[a], -[x["pred"] for x in paths].index(a))) if votes else None
        chosen = next((x for x in paths if x["pred"] == pred), paths[0])
        rows.append(
            {
                "id": p["id"],
                "split": p["split"],
                "question": p["question"],
                "gold": task.normalize_gold(p["gold"]),
                "prompt": chosen["prompt"],
                "rationale": chosen["rationale"],
                "answer_raw": chosen["answer_raw"],
                "pred": pred,
                "confidence": votes[pred] / len(paths) if pred is not None else 0.0,
                "correct": task.is_correct(pred, p["gold"]),
                "parse_error": None if pred is not None else "no answer found in rationale or answer prompt",
                "finish_reason": chosen["finish_reason"],
                "tokens_in": sum(x["tokens_in"] for x in paths),
                "tokens_out": sum(x["tokens_out"] for x in paths),
                "cached": all(x["cached"] for x in paths),
            }
        )
    return rows


def chain_of_thought(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """Zero-shot CoT, few-shot CoT or self-consistency per ``cfg.method``; one row per problem."""
    prompts = [teacher.chat_prompt(_messages(p["question"], cfg, task), assistant_prefix=cfg.trigger) for p in problems]
    if cfg.method == "self_consistency":
        samples = cfg.samples
        decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        samples, decoding = 1, Decoding(max_new_tokens=cfg.max_new_tokens)
    return _rows(problems, _reason(teacher, prompts, cfg, task, samples, decoding), task)


def zero_shot_cot(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """Two-stage zero-shot CoT (kept as a name for callers; ``chain_of_thought`` does the work)."""
    return chain_of_thought(teacher, problems, cfg, task)


METHODS = {"zero_shot_cot": chain_of_thought, "few_shot_cot": chain_of_thought, "self_consistency": chain_of_thought}
