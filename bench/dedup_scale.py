"""Synthesis de-duplication at scale: the exact Jaccard index vs MinHash LSH on ``--rows`` texts.

    nice -n 10 .venv/bin/python bench/dedup_scale.py --rows 50000

Texts are instruction-like (a few shared templates, so common 3-grams are shared by many texts, as
self-instruct pools are) with a planted near-duplicate (one word changed) for every ``--dup-every``-th
text. Each index is fed the same stream: a text is looked up, then stored; the script prints both
times, their ratio, and how many planted duplicates each found (the LSH checks its candidates by exact
Jaccard, so it finds a subset of what the exact index finds).
"""

from __future__ import annotations

import argparse
import random
import time

from distill.teachers.dedup import NearDuplicateIndex

TEMPLATES = [
    "Write a short {a} about {b} for a {c} audience and keep it under {n} words.",
    "Explain how {a} relates to {b} in the context of {c}, giving {n} examples.",
    "Classify the following {a} as {b} or {c} and say why in {n} sentences.",
    "Write a function that takes a list of {a} and returns the {b} {c} among them, in {n} lines.",
    "Summarize the main points of the {a} on {b} for someone who knows {c}, in {n} bullet points.",
]


def corpus(rows: int, dup_every: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """``rows`` texts and the (original, copy) index pairs of the planted near-duplicates."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    texts, planted = [], []
    while len(texts) < rows:
        t = rng.choice(TEMPLATES)
        fill = {k: " ".join(rng.choices(words, k=rng.randint(2, 5))) for k in "abc"}
        text = t.format(n=rng.randint(2, 9), **fill) + " " + " ".join(rng.choices(words, k=rng.randint(8, 20)))
        texts.append(text)
        if len(texts) % dup_every == 0 and len(texts) < rows:
            tokens = text.split()
            tokens[rng.randrange(len(tokens) // 2, len(tokens))] = rng.choice(words)  # one word changed
            planted.append((len(texts) - 1, len(texts)))
            texts.append(" ".join(tokens))
    return texts, planted


def run(texts: list[str], planted: list[tuple[int, int]], threshold: float, lsh_rows: int) -> tuple[float, int, str]:
    """(seconds, planted copies found as duplicates, the index's method at the end)."""
    index = NearDuplicateIndex(threshold, lsh_rows=lsh_rows)
    copies = {b for _, b in planted}
    found = 0
    start = time.perf_counter()
    for i, t in enumerate(texts):
        dup = index.find(t)
        found += bool(dup) and i in copies
        index.add(t)
    return time.perf_counter() - start, found, index.method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dup-every", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args()
    texts, planted = corpus(args.rows, args.dup_every)
    exact_s, exact_found, _ = run(texts, planted, args.threshold, lsh_rows=len(texts) + 1)
    # lsh_rows=0: LSH from the first row, the way an index past task.dedup_lsh_rows runs
    lsh_s, lsh_found, method = run(texts, planted, args.threshold, lsh_rows=0)
    print(f"{len(texts)} texts, {len(planted)} planted near-duplicates, threshold {args.threshold}")
    print(f"exact Jaccard (inverted index): {exact_s:.1f}s, found {exact_found}/{len(planted)} planted")
    print(f"MinHash LSH ({method}):        {lsh_s:.1f}s, found {lsh_found}/{len(planted)} planted")
    print(f"speed-up: {exact_s / lsh_s:.1f}x")


if __name__ == "__main__":
    main()
