"""Task-data synthesis (self-instruct style): the teacher writes new problems from seed examples.

Each request shows a few seed problems (a seeded random choice per request) and asks for one new
problem of the same kind. Candidates are normalised and dropped when they duplicate — exactly or
nearly (word 3-gram Jaccard similarity at or above a threshold) — a seed, an evaluation problem (so
the student never trains on its test) or an earlier candidate. The survivors are then solved by the
configured method (self-consistency: the vote is the label, the agreement its confidence).
"""

from __future__ import annotations

import random
import re

from distill.teachers.backends.base import Decoding, GenerationRequest

INSTRUCTION = (
    "Here are example problems:\n\n{examples}\n\nWrite one new problem of the same kind and difficulty, with "
    "different numbers, names and wording. Reply with the problem only, without its solution."
)


def normalize_question(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: the form exact duplicates are found in."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = normalize_question(text).split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class NearDuplicateIndex:
    """Exact and near-duplicate lookup (Jaccard over word 3-grams), via an inverted shingle index."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[set] = []
        self.index: dict[tuple, list[int]] = {}

    def find(self, text: str) -> str | None:
        """Why ``text`` is a duplicate ("exact" or "near"), or None when it is new."""
        if normalize_question(text) in self.exact:
            return "exact"
        s = shingles(text)
        candidates = {i for sh in s for i in self.index.get(sh, ())}
        for i in candidates:
            other = self.sets[i]
            if len(s & other) / len(s | other) >= self.threshold:
                return "near"
        return None

    def add(self, text: str) -> None:
        self.exact.add(normalize_question(text))
        s = shingles(text)
        self.sets.append(s)
        for sh in s:
            self.index.setdefault(sh, []).append(len(self.sets) - 1)


def parse_problem(text: str) -> str | None:
    """The problem statement in a completion: leading label dropped, solution cut off."""
    text = re.sub(r"^\s*(?:new\s+)?problem\s*\d*\s*[:.]\s*", "", text.strip(), flags=re.I)
    text = re.split(r"\n\s*(?:solution|answer|step 1|let's)\b", text, maxsplit=1, flags=re.I)[0]
    text = text.strip().strip('"').strip()
    return text if 5 <= len(text.split()) <= 200 else None


def synthesize(
    teacher,
    seeds: list[str],
    n: int,
    avoid: list[str],
    seed: int = 0,
    shots: int = 3,
    temperature: float = 0.9,
    max_new_tokens: int = 160,
    threshold: float = 0.7,
    max_rounds: int = 8,
) -> tuple[list[str], dict]:
    """Up to ``n`` new problems and counts of what was dropped and why.

    Deterministic for a seed (and free on a re-run: every request goes through the teacher's
    completion cache under its sample index).
    """
    index = NearDuplicateIndex(threshold)
    for q in [*seeds, *avoid]:
        index.add(q)
    avoid_index = NearDuplicateIndex(threshold)
    for q in avoid:
        avoid_index.add(q)
    accepted: list[str] = []
    stats = {"requested": 0, "unparsable": 0, "exact_duplicates": 0, "near_duplicates": 0, "eval_overlap": 0}
    sample = 0
    for _ in range(max_rounds):
        need = n - len(accepted)
        if need <= 0:
            break
        requests = []
        for _ in range(need + need // 2 + 1):
            rng = random.Random(seed * 1_000_003 + sample)
            shown = rng.sample(seeds, min(shots, len(seeds)))
            examples = "\n\n".join(f"Problem {i + 1}: {q}" for i, q in enumerate(shown))
            prompt = teacher.chat_prompt(
                [{"role": "user", "content": INSTRUCTION.format(examples=examples)}], assistant_prefix="Problem:"
            )
            requests.append(
                GenerationRequest(prompt, Decoding(max_new_tokens=max_new_tokens, temperature=temperature), sample)
            )
            sample += 1
        stats["requested"] += len(requests)
        for c in teacher.generate(requests):
            q = parse_problem(c.text) if c.error is None else None
            if q is None:
                stats["unparsable"] += 1
                continue
            if avoid_index.find(q):
                stats["eval_overlap"] += 1
                continue
            dup = index.find(q)
            if dup:
                stats[f"{dup}_duplicates"] += 1
                continue
            index.add(q)
            accepted.append(q)
            if len(accepted) == n:
                break
    stats["accepted"] = len(accepted)
    return accepted, stats


def synthesize_problems(teacher, seeds: list[str], n: int, avoid: list[str], **settings) -> tuple[list[dict], dict]:
    """``synthesize`` as train problems (ids ``syn-000000``…, no gold: the teacher's vote labels them)
    and its counts; one clear error when the teacher wrote no usable problem at all."""
    from distill.core.errors import DistillError

    questions, stats = synthesize(teacher, seeds, n, avoid, **settings)
    if not questions:
        raise DistillError(
            f"the teacher wrote no usable new problem ({stats})", "check the seed file and the teacher model"
        )
    problems = [{"id": f"syn-{i:06d}", "split": "train", "question": q, "gold": None} for i, q in enumerate(questions)]
    return problems, stats
