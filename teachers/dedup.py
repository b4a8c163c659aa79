"""De-duplication of synthesized texts: exact, then near (word 3-gram Jaccard at or above a threshold).

Below ``lsh_rows`` stored texts the near lookup is exact: an inverted shingle index gives every text
sharing a 3-gram, each compared by Jaccard. Past it (self-instruct pools grow to tens of thousands)
the index moves to MinHash LSH (``datasketch.MinHashLSH``, 128 permutations): the LSH proposes
candidates, each still checked by exact Jaccard against the same threshold, so a duplicate it reports
is always one the exact index reports too; it can only miss (rarely: the LSH is tuned below the
threshold for recall; ``tests/unit/test_synthesis_dedup.py`` measures it on planted near-duplicates).
"""

from __future__ import annotations

import re

NUM_PERM = 128
LSH_SLACK = 0.2  # the LSH's own threshold sits this far below the Jaccard one: candidates for recall
LSH_ROWS = 10_000


def normalize_question(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: the form exact duplicates are found in."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """The word ``n``-grams of ``text`` after ``normalize_question`` (one short tuple for a shorter text)."""
    words = normalize_question(text).split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _minhash(s: set[tuple[str, ...]]):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM)
    m.update_batch([" ".join(t).encode() for t in s])
    return m


class NearDuplicateIndex:
    """Exact and near-duplicate lookup (Jaccard over word 3-grams): an inverted shingle index up to
    ``lsh_rows`` texts, MinHash LSH past it (``method`` says which is in use)."""

    def __init__(self, threshold: float = 0.7, lsh_rows: int = LSH_ROWS):
        self.threshold = threshold
        self.lsh_rows = lsh_rows
        self.exact: set[str] = set()
        self.sets: list[set] = []
        self.index: dict[tuple, list[int]] = {}
        self.lsh = None

    @property
    def method(self) -> str:
        """``jaccard`` (exact, inverted index) or ``minhash_lsh``."""
        return "jaccard" if self.lsh is None else "minhash_lsh"

    def __len__(self) -> int:
        return len(self.sets)

    def find(self, text: str) -> str | None:
        """Why ``text`` is a duplicate ("exact" or "near"), or None when it is new."""
        if normalize_question(text) in self.exact:
            return "exact"
        s = shingles(text)
        if self.lsh is not None:
            candidates = self.lsh.query(_minhash(s))
        else:
            candidates = {i for sh in s for i in self.index.get(sh, ())}
        if any(jaccard(s, self.sets[i]) >= self.threshold for i in candidates):
            return "near"
        return None

    def add(self, text: str) -> None:
        """Store ``text``; the index moves to MinHash LSH when it passes ``lsh_rows`` texts."""
        self.exact.add(normalize_question(text))
        s = shingles(text)
        self.sets.append(s)
        k = len(self.sets) - 1
        if self.lsh is not None:
            self.lsh.insert(k, _minhash(s))
            return
        for sh in s:
            self.index.setdefault(sh, []).append(k)
        if len(self.sets) > self.lsh_rows:
            self._to_lsh()

    def _to_lsh(self) -> None:
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=max(0.05, self.threshold - LSH_SLACK), num_perm=NUM_PERM)
        with self.lsh.insertion_session() as session:
            for k, s in enumerate(self.sets):
                session.insert(k, _minhash(s))
        self.index = {}
