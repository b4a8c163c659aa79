"""Torch-free runtime for exported students: onnxruntime + tokenizers + numpy only.

``OnnxGenerator(bundle_dir)`` loads the bundle's default model (or a named variant), the tokenizer and
``distill_generation.json`` and runs batched greedy decoding with the KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GENERATION_FILE = "distill_generation.json"


def make_session(model_path: Path | str, threads: int = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


class OnnxGenerator:
    """Greedy KV-cache generation over an exported decoder; no torch anywhere."""

    def __init__(self, bundle_dir: Path | str, model_file: str | None = None, threads: int = 1):
        from tokenizers import Tokenizer

        bundle_dir = Path(bundle_dir)
        self.meta = json.loads((bundle_dir / GENERATION_FILE).read_text())
        self.session = make_session(bundle_dir / (model_file or self.meta["model_file"]), threads)
        self.tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
        self.eos_ids = set(self.meta["eos_token_ids"])
        self.pad_id = self.meta["pad_token_id"]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.kv_heads, self.head_dim = self.meta["num_kv_heads"], self.meta["head_dim"]
        first = self.session.get_inputs()[3] if len(self.session.get_inputs()) > 3 else None
        self.kv_dtype = np.float16 if first is not None and "float16" in first.type else np.float32

    def render(self, question: str) -> str:
        """The prompt string the student was trained on, for one question."""
        return self.meta["prompt_template"].replace(self.meta["placeholder"], question)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past):
        """One forward pass; returns (logits, present list)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        outs = self.session.run(None, feed)
        return outs[0], outs[1:]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding of a batch of token-id prompts (left-padded); returns new token ids each."""
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = [np.zeros((n, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype) for _ in self.past_names]
        out: list[list[int]] = [[] for _ in range(n)]
        done = np.zeros(n, dtype=bool)
        for _ in range(max_new_tokens):
            logits, past = self.step(ids, mask, positions, past)
            nxt = logits[:, -1, :].argmax(-1)
            for i in np.flatnonzero(~done):
                tok = int(nxt[i])
                if tok in self.eos_ids:
                    done[i] = True
                else:
                    out[i].append(tok)
            if done.all():
                break
            ids = np.where(done, self.pad_id, nxt)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((n, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return out

    def generate(self, questions: list[str], max_new_tokens: int = 256, batch_size: int = 8) -> list[str]:
        """Greedy completions for ``questions`` rendered with the training prompt template."""
        texts: list[str] = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            prompts = [self.tokenizer.encode(self.render(q), add_special_tokens=False).ids for q in chunk]
            for ids in self.generate_ids(prompts, max_new_tokens):
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return texts
