"""Prompting methods: turn problems into teacher requests and completions into rationale rows.

- ``zero_shot_cot`` (Kojima et al. 2022): stage 1 appends the reasoning trigger ("Let's think step
  by step.") and lets the teacher reason; stage 2 appends the answer trigger ("Therefore, the
  answer (arabic numerals) is") and reads the answer. With ``answer_extraction="fallback"`` stage 2
  is only paid for when stage 1 states no final answer itself.
- ``few_shot_cot`` (Wei et al. 2022): the same, after worked demonstrations from the recipe.
- ``self_consistency`` (Wang et al. 2023): ``samples`` sampled reasoning paths per problem, majority
  vote over their answers; the agreement ratio is kept as ``confidence`` and the kept rationale is
  the first one that reached the voted answer.
- ``least_to_most`` (Zhou et al. 2023): decompose into sub-questions, then solve them in order.
- ``self_ask`` (Press et al. 2023): follow-up questions and intermediate answers, then the answer.
"""

from __future__ import annotations

import json
from collections import Counter

from distill.core.answers import Task
from distill.teachers.backends.base import Decoding, GenerationRequest
from distill.teachers.prompts import render


def _system(cfg, p: dict | None = None) -> list[dict]:
    """The system turn: the recipe's ``teacher.system_prompt`` and the problem's own (a conversation's
    system turn is kept), joined into one message (chat templates take one)."""
    parts = [t for t in (cfg.system_prompt, (p or {}).get("system")) if t]
    return [{"role": "system", "content": "\n\n".join(parts)}] if parts else []


def _history(p: dict | None) -> list[dict]:
    """The turns of a conversation before the last user turn, which the teacher answers."""
    raw = (p or {}).get("history")
    return json.loads(raw) if raw else []


def reasoning_steps(rationale: str) -> int:
    """A chain's number of reasoning steps, as complexity-based prompting counts them: its non-empty lines."""
    return sum(1 for line in rationale.splitlines() if line.strip())


def demonstrations(cfg) -> list:
    """The worked examples a few-shot prompt shows: every ``teacher.demos`` entry, or (``demo_selection:
    complex``) the ``num_demos`` with the most reasoning steps, in pool order (ties: earlier first)."""
    if cfg.method not in ("few_shot_cot", "self_consistency"):
        return []
    demos = list(cfg.demos)
    if cfg.demo_selection == "complex":
        ranked = sorted(range(len(demos)), key=lambda i: (-reasoning_steps(demos[i].rationale), i))
        demos = [demos[i] for i in sorted(ranked[: cfg.num_demos])]
    return demos


def _messages(question: str, cfg, task: Task, p: dict | None = None) -> list[dict]:
    """System prompt, worked demonstrations (few-shot), the problem's earlier turns, then the question."""
    m = _system(cfg, p)
    for d in demonstrations(cfg):
        m += [
            {"role": "user", "content": render(cfg.prompt_template, question=d.question)},
            {"role": "assistant", "content": f"{cfg.trigger} {d.rationale.strip()}\n{task.answer_sentence(d.answer)}"},
        ]
    return m + _history(p) + [{"role": "user", "content": render(cfg.prompt_template, question=question)}]


def scoring_prompt(teacher, question: str, cfg, task: Task) -> str:
    """The teacher's own prompt for ``question`` (system prompt, demonstrations, template), with no
    assistant prefix: on-policy distillation scores a student's whole answer after it."""
    return teacher.chat_prompt(_messages(question, cfg, task))


def _reason(
    teacher, prompts: list[str], cfg, task: Task, samples: int, decoding: Decoding, questions: list[str]
) -> list[list[dict]]:
    """``samples`` reasoning paths per prompt (stage 1), answers read or asked for (stage 2); each
    prompt's ``questions`` entry lets a choice answer name an option by its text."""
    reqs = [GenerationRequest(p, decoding, sample=s) for p in prompts for s in range(samples)]
    first = teacher.generate(reqs)
    paths = []
    for k, (r, c) in enumerate(zip(reqs, first)):
        rationale = c.text.strip()
        ex = task.extract(rationale, fallback_last=False, question=questions[k // samples])
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
                "reason": ex.reason,
                "error": c.error,
                "token_ids": c.token_ids,
                "topk_ids": c.topk_ids,
                "topk_logprobs": c.topk_logprobs,
            }
        )
    todo = [
        i
        for i, p in enumerate(paths)
        if p["error"] is None and (cfg.answer_extraction == "always" or not p["explicit"])
    ]
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
            p["error"] = c.error
            ex = task.extract(c.text, question=questions[i // samples])
            p["pred"] = ex.answer if ex.answer is not None else p["pred"]
            p["reason"] = ex.reason if p["pred"] is None else None
    return [paths[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def voters(paths: list[dict], vote: str = "majority", k: int = 0) -> list[dict]:
    """The answered paths whose answers are counted: all of them, or (``complexity``) the ``k`` with the
    most reasoning steps (0: the top half, at least one), ties broken by sample order."""
    answered = [x for x in paths if x["pred"] is not None]
    if vote != "complexity" or not answered:
        return answered
    keep = k or max(1, (len(answered) + 1) // 2)
    ranked = sorted(range(len(answered)), key=lambda i: (-reasoning_steps(answered[i]["rationale"]), i))
    return [answered[i] for i in sorted(ranked[:keep])]


def voted(preds: list[str]) -> str | None:
    """The most frequent answer of ``preds`` (ties: the one reached first), None when there is none."""
    votes = Counter(preds)
    return max(votes, key=lambda a: (votes[a], -preds.index(a))) if votes else None


def _rows(problems: list[dict], groups: list[list[dict]], task: Task, cfg=None) -> list[dict]:
    """One row per problem: the voted answer over its paths (``teacher.vote``), the first path reaching
    it, the agreement among the paths that voted."""
    vote, k = (cfg.vote, cfg.complex_k) if cfg is not None else ("majority", 0)
    rows = []
    for p, paths in zip(problems, groups):
        # A path whose teacher call failed for good fails the row (recorded, retried on resume):
        # a vote over fewer samples would differ from an uninterrupted run.
        error = next((x["error"] for x in paths if x.get("error")), None)
        counted = voters(paths, vote, k) if error is None else []
        preds = [x["pred"] for x in counted]
        pred = voted(preds)
        chosen = next((x for x in paths if x["pred"] == pred), paths[0])
        # No gold (synthesized problems): the vote is the label, its agreement the confidence.
        gold = task.normalize_gold(p["gold"], p["question"]) if p.get("gold") is not None else pred
        correct, why = task.check(pred, gold, p["question"]) if pred is not None else (False, None)
        if error:
            parse_error = f"teacher call failed: {error}"
        elif pred is None:
            reason = next((x.get("reason") for x in paths if x.get("reason")), None)
            parse_error = "no answer found in rationale or answer prompt" + (f" ({reason})" if reason else "")
        else:
            parse_error = why  # a wrong answer's reason worth keeping (a checker that raised)
        # Distinct other rationales reaching the same answer (Fine-tune-CoT "diverse reasoning").
        alternatives, seen = [], {" ".join(chosen["rationale"].split())}
        for x in paths:
            norm = " ".join(x["rationale"].split())
            if pred is not None and x["pred"] == pred and norm not in seen:
                seen.add(norm)
                alternatives.append(x["rationale"])
        rows.append(
            {
                "id": p["id"],
                "split": p["split"],
                "question": p["question"],
                "gold": gold,
                "prompt": chosen["prompt"],
                "rationale": chosen["rationale"],
                "answer_raw": chosen["answer_raw"],
                "pred": pred,
                "confidence": preds.count(pred) / (len(counted) if vote == "complexity" else len(paths))
                if pred is not None
                else 0.0,
                "correct": correct,
                "alternatives": alternatives,
                "parse_error": parse_error,
                "error": error,
                "finish_reason": chosen["finish_reason"],
                "tokens_in": sum(x["tokens_in"] for x in paths),
                "tokens_out": sum(x["tokens_out"] for x in paths),
                "cached": all(x["cached"] for x in paths),
                # Logit KD: the kept rationale's own tokens and the teacher's top-k at each of them.
                "teacher_token_ids": chosen.get("token_ids"),
                "teacher_topk_ids": chosen.get("topk_ids"),
                "teacher_topk_logprobs": chosen.get("topk_logprobs"),
            }
        )
    return rows


def chain_of_thought(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """Zero-shot CoT, few-shot CoT or self-consistency per ``cfg.method``; one row per problem."""
    prompts = [
        teacher.chat_prompt(_messages(p["question"], cfg, task, p), assistant_prefix=cfg.trigger) for p in problems
    ]
    if cfg.method == "self_consistency":
        samples = cfg.samples
        decoding = Decoding(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, logprobs=cfg.topk_logprobs
        )
    else:
        samples, decoding = 1, Decoding(max_new_tokens=cfg.max_new_tokens, logprobs=cfg.topk_logprobs)
    questions = [p["question"] for p in problems]
    return _rows(problems, _reason(teacher, prompts, cfg, task, samples, decoding, questions), task, cfg)


def zero_shot_cot(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """Two-stage zero-shot CoT (kept as a name for callers; ``chain_of_thought`` does the work)."""
    return chain_of_thought(teacher, problems, cfg, task)


METHODS = {"zero_shot_cot": chain_of_thought, "few_shot_cot": chain_of_thought, "self_consistency": chain_of_thought}


# --- Least-to-most (Zhou et al. 2023): decompose, then solve the sub-questions in order. ---

DECOMPOSE = (
    "{question}\n\nDo not solve it yet. List the simpler sub-questions that lead to the answer, one per line, "
    "and end with the original question."
)


def _subquestions(text: str, question: str, limit: int) -> list[str]:
    """Sub-questions from a decomposition (numbered or bulleted lines), the original question last."""
    import re

    lines = [re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", ln).strip() for ln in text.splitlines()]
    subs = [ln for ln in lines if ln.endswith("?") and ln.strip() != question.strip()]
    return subs[:limit] + [question]


def least_to_most(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """Decompose each problem, then answer its sub-questions one after another (batched across
    problems at each step), each answer feeding the next; the last answer is the prediction."""
    system = [_system(cfg, p) for p in problems]
    question = [render(cfg.prompt_template, question=p["question"]) for p in problems]
    dec_prompts = [
        teacher.chat_prompt(s + [{"role": "user", "content": DECOMPOSE.format(question=q)}])
        for s, q in zip(system, question)
    ]
    decomp = teacher.generate([GenerationRequest(p, Decoding(max_new_tokens=cfg.max_new_tokens)) for p in dec_prompts])
    plans = [_subquestions(c.text, q, cfg.max_subquestions) for c, q in zip(decomp, question)]
    transcripts = ["" for _ in problems]
    usage = [[c.tokens_in, c.tokens_out, c.cached] for c in decomp]
    errors = [c.error for c in decomp]
    plans = [plan if err is None else [] for plan, err in zip(plans, errors)]
    finish = ["stop"] * len(problems)
    last_answer = [""] * len(problems)
    for step in range(max(len(p) for p in plans)):  # (0 steps when every decomposition failed)
        active = [i for i, plan in enumerate(plans) if step < len(plan)]
        prompts = [
            teacher.chat_prompt(
                system[i]
                + [
                    {
                        "role": "user",
                        "content": f"{question[i]}\n\nSolve it step by step.{transcripts[i]}\n\nQ: {plans[i][step]}",
                    }
                ],
                assistant_prefix="A:",
            )
            for i in active
        ]
        outs = teacher.generate([GenerationRequest(p, Decoding(max_new_tokens=cfg.max_new_tokens)) for p in prompts])
        for i, c in zip(active, outs):
            answer = c.text.strip()
            transcripts[i] += f"\n\nQ: {plans[i][step]}\nA: {answer}"
            last_answer[i] = answer
            usage[i][0] += c.tokens_in
            usage[i][1] += c.tokens_out
            usage[i][2] = usage[i][2] and c.cached
            finish[i] = c.finish_reason
            if c.error:
                errors[i], plans[i] = c.error, plans[i][: step + 1]  # stop this problem here
    paths = []
    for i in range(len(problems)):
        ex = task.extract(last_answer[i], question=problems[i]["question"])
        paths.append(
            [
                {
                    "prompt": dec_prompts[i],
                    "rationale": transcripts[i].strip(),
                    "answer_raw": last_answer[i],
                    "pred": ex.answer,
                    "finish_reason": finish[i],
                    "tokens_in": usage[i][0],
                    "tokens_out": usage[i][1],
                    "cached": usage[i][2],
                    "error": errors[i],
                }
            ]
        )
    return _rows(problems, paths, task)


# --- Self-ask (Press et al. 2023): the teacher asks and answers its own follow-up questions. ---

SELF_ASK_DEMO = (
    "A shop sells pens at 3 dollars each. Ann buys 4 pens and pays with a 20-dollar bill. How much change does she get?",
    "Follow up: How much do 4 pens cost?\n"
    "Intermediate answer: 4 x 3 = 12 dollars.\n"
    "Follow up: What is 20 minus 12?\n"
    "Intermediate answer: 8 dollars.",
    "8",
)
SELF_ASK_LEAD = "Are follow up questions needed here:"


def self_ask(teacher, problems: list[dict], cfg, task: Task) -> list[dict]:
    """One generation per problem in the self-ask scaffold (a worked demo as a previous chat turn,
    then the question); the follow-up chain is the rationale and "So the final answer is" the
    answer (stage 2 when it is missing)."""
    demo = (cfg.demos[0].question, cfg.demos[0].rationale.strip(), cfg.demos[0].answer) if cfg.demos else SELF_ASK_DEMO
    shot = [
        {"role": "user", "content": render(cfg.prompt_template, question=demo[0])},
        {"role": "assistant", "content": f"{SELF_ASK_LEAD} Yes.\n{demo[1]}\nSo the final answer is: {demo[2]}"},
    ]
    prompts = [
        teacher.chat_prompt(
            _system(cfg, p)
            + shot
            + _history(p)
            + [{"role": "user", "content": render(cfg.prompt_template, question=p["question"])}],
            assistant_prefix=SELF_ASK_LEAD,
        )
        for p in problems
    ]
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens)
    questions = [p["question"] for p in problems]
    return _rows(problems, _reason(teacher, prompts, cfg, task, 1, decoding, questions), task)


METHODS.update({"least_to_most": least_to_most, "self_ask": self_ask})
