"""Torch-free runtime for exported students: onnxruntime + tokenizers + numpy only.

``OnnxGenerator(bundle_dir)`` loads the bundle's default model (or a named variant), the tokenizer
and ``distill_generation.json``, and runs batched KV-cache decoding: greedy or sampled
(temperature, top-p, seeded), with stop strings; a batch is padded on the side the bundle's
``padding_side`` names (right for fused-attention exports). Export bundles carry a copy of this file, so
``python distill_runtime.py <bundle> "question"`` works in an environment holding only
onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

GENERATION_FILE = "distill_generation.json"
# Layout version of the bundle (``major.minor``), written into GENERATION_FILE. A minor bump stays
# readable by older runtimes; a runtime refuses a major it does not know. Bundles written before
# versioning have no field and the 1.x layout. 2.0 added ``padding_side``: fused-attention models
# (export.gqa) take right-padded batches, which a 1.x runtime would left-pad.
FORMAT_VERSION = "2.0"
READS_MAJORS = ("1", "2")


class BundleFormatError(ValueError):
    """The bundle was written for another major format than this runtime reads."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} — {fix}")


def check_format(meta: dict, bundle_dir: Path | str) -> None:
    """Raise ``BundleFormatError`` unless this runtime reads the bundle's major format."""
    found = str(meta.get("format_version", "1.0"))
    if found.split(".")[0] not in READS_MAJORS:
        raise BundleFormatError(
            f"{bundle_dir} has bundle format {found} but this runtime reads formats "
            + " and ".join(f"{m}.x" for m in READS_MAJORS),
            f"run it with a distill runtime for format {found.split('.')[0]}.x, or re-export the student with this "
            "distill version",
        )


def make_session(model_path: Path | str, threads: int = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One token per row: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for i, row in enumerate(p):
        order = np.argsort(-row)
        keep = np.cumsum(row[order]) - row[order] < top_p  # smallest prefix with mass >= top_p
        probs = row[order][keep]
        out[i] = order[keep][rng.choice(len(probs), p=probs / probs.sum())]
    return out


class OnnxGenerator:
    """KV-cache generation over an exported decoder; no torch anywhere."""

    def __init__(self, bundle_dir: Path | str, model_file: str | None = None, threads: int = 1):
        from tokenizers import Tokenizer

        bundle_dir = Path(bundle_dir)
        self.meta = json.loads((bundle_dir / GENERATION_FILE).read_text())
        check_format(self.meta, bundle_dir)
        self.session = make_session(bundle_dir / (model_file or self.meta["model_file"]), threads)
        self.tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
        self.eos_ids = set(self.meta["eos_token_ids"])
        self.right_pad = self.meta.get("padding_side", "left") == "right"
        self.pad_id = self.meta["pad_token_id"]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.kv_heads, self.head_dim = self.meta["num_kv_heads"], self.meta["head_dim"]
        first = self.session.get_inputs()[3] if len(self.session.get_inputs()) > 3 else None
        self.kv_dtype = np.float16 if first is not None and "float16" in first.type else np.float32
        self.tokens_generated = 0

    def render(self, question: str) -> str:
        """The prompt string the student was trained on, for one question."""
        return self.meta["prompt_template"].replace(self.meta["placeholder"], question)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past):
        """One forward pass; returns (logits as numpy, present key/values as OrtValues).

        Past/present stay OrtValues bound through IOBinding, so the cache is never copied into
        numpy and back between steps; ``past`` may be numpy arrays or OrtValues.
        """
        import onnxruntime as ort

        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            io.bind_ortvalue_input(name, value)
        for out in self.output_names:
            io.bind_output(out)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), outs[1:]

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: tuple[str, ...] = (),
    ) -> list[list[int]]:
        """Decode a batch of token-id prompts, padded together on the side the model takes (left, or
        right for fused-attention models); returns the new token ids of each."""
        n = len(prompts)
        rng = np.random.default_rng(seed)
        lengths = np.array([len(p) for p in prompts])
        width = int(lengths.max())
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            cols = slice(0, len(p)) if self.right_pad else slice(width - len(p), width)
            ids[i, cols] = p
            mask[i, cols] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        # each row's last prompt token: the end of the row when left-padded, its length - 1 when right-padded
        last = lengths - 1 if self.right_pad else np.full(n, width - 1)
        past = [np.zeros((n, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype) for _ in self.past_names]
        out: list[list[int]] = [[] for _ in range(n)]
        done = np.zeros(n, dtype=bool)
        for _ in range(max_new_tokens):
            logits, past = self.step(ids, mask, positions, past)
            nxt = _sample(logits[np.arange(n), last, :], temperature, top_p, rng)
            last = np.zeros(n, dtype=np.int64)  # from now on one new position per row
            for i in np.flatnonzero(~done):
                tok = int(nxt[i])
                if tok in self.eos_ids:
                    done[i] = True
                    continue
                out[i].append(tok)
                self.tokens_generated += 1
                if stop and any(s in self.tokenizer.decode(out[i][-16:]) for s in stop):
                    done[i] = True
            if done.all():
                break
            ids = np.where(done, self.pad_id, nxt)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((n, 1), dtype=np.int64)], axis=1)
            positions = mask.sum(axis=1, keepdims=True) - 1
        return out

    def generate(
        self,
        questions: list[str],
        max_new_tokens: int = 256,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: tuple[str, ...] = (),
    ) -> list[str]:
        """Completions for ``questions`` rendered with the training prompt template (cut at stop strings)."""
        texts: list[str] = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            prompts = [self.tokenizer.encode(self.render(q), add_special_tokens=False).ids for q in chunk]
            for ids in self.generate_ids(prompts, max_new_tokens, temperature, top_p, seed + start, stop):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0] if s in text else text
                texts.append(text)
        return texts


def main(argv: list[str] | None = None) -> int:
    """``python distill_runtime.py BUNDLE QUESTION [--model FILE] [--max-new-tokens N] [--temperature T]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Answer a question with a distill export bundle (onnxruntime only).")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("question")
    ap.add_argument("--model", default=None, help="ONNX file inside the bundle (default: the bundle's choice)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.bundle / GENERATION_FILE).is_file():
        print(f"error: {args.bundle} is not an export bundle (no {GENERATION_FILE})", file=sys.stderr)
        return 2
    try:
        gen = OnnxGenerator(args.bundle, args.model)
    except BundleFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(gen.generate([args.question], args.max_new_tokens, 1, args.temperature, args.top_p, args.seed)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
