"""Calibration inputs for quantization, taken from the distilled dataset itself.

Each example is a training row (prompt + target rationale) rendered through the student's chat
template exactly as the trainer sees it, fed to the exported KV-cache graph on its prefill path
(empty past). The linear layers see the same activation distribution on the prefill path as when
decoding with a cache, so ranges calibrated here hold for every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def calibration_ids(
    tokenizer, train_parquet: Path, fmt: str, task, n: int = 32, max_length: int = 256, kd_loss: str = "forward_kl"
) -> list:
    """Token ids of the first ``n`` training examples (prompt + target through the chat template), in the
    student's own tokens (``kd_loss="uld"``: its tokenization of the rationale, not the teacher's ids)."""
    import pyarrow.parquet as pq

    from distill.students.data import build_examples

    rows = pq.read_table(train_parquet).to_pylist()[:n]
    return [ex["input_ids"] for ex in build_examples(tokenizer, rows, fmt, task, max_length, kd_loss=kd_loss)][:n]


def prefill_feed(ids: list[int], past_names: list[str], kv_heads: int, head_dim: int, kv_dtype=np.float32) -> dict:
    """Inputs of one no-past forward pass over ``ids`` (batch 1)."""
    n = len(ids)
    feed = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for name in past_names:
        feed[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=kv_dtype)
    return feed


def crop_feeds(feeds: list[dict]) -> list[dict]:
    """Every feed cut to the shortest one's length (histogram calibrators stack activations, so all
    feeds need one shape); the empty past is left as is."""
    n = min(f["input_ids"].shape[1] for f in feeds)
    keys = ("input_ids", "attention_mask", "position_ids")
    return [{k: (v[:, :n] if k in keys else v) for k, v in f.items()} for f in feeds]


def feeds_for(model_path: Path, id_lists: list, kv_heads: int, head_dim: int) -> list[dict]:
    """Prefill feeds for every id list, named after ``model_path``'s past inputs."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    past = [i.name for i in m.graph.input if i.name.startswith("past_key_values")]
    return [prefill_feed(ids, past, kv_heads, head_dim) for ids in id_lists]


class FeedReader:
    """An onnxruntime ``CalibrationDataReader`` over a list of feeds (rewindable)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.feeds)
