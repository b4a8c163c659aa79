"""Logit distillation from the teacher's stored top-k log-probabilities (shared tokenizer only)."""

from __future__ import annotations


def tokenizer_mismatch(teacher_source: str, student_source: str) -> str | None:
    """Why the teacher's token ids cannot be read as the student's (None when both tokenizers agree)."""
    from transformers import AutoTokenizer

    from distill.sources import resolve_model

    t = AutoTokenizer.from_pretrained(resolve_model(teacher_source))
    s = AutoTokenizer.from_pretrained(resolve_model(student_source))
    if t.get_vocab() != s.get_vocab():
        return f"teacher and student tokenizers differ ({len(t)} vs {len(s)} tokens)"
    return None
