"""Torch-free runtime for exported students: onnxruntime + tokenizers + numpy only.

``OnnxGenerator(bundle_dir)`` loads the bundle's default model (or a named variant), the tokenizer
and ``distill_generation.json``, and runs batched KV-cache decoding: greedy or sampled
(temperature, top-p, seeded), with stop strings; a batch is padded on the side the bundle's
``padding_side`` names (right for fused-attention exports). A request is checked before any decoding:
an empty question, or a prompt whose tokens plus ``max_new_tokens`` exceed the model's context, raises
``RequestError`` (or, with ``truncate``, the prompt keeps its last tokens that fit). Export bundles
carry a copy of this file, so ``python distill_runtime.py <bundle> "question"`` works in an
environment holding only onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

try:  # inside the project; a bundle carries the same file as distill_calculator.py beside this one
    from distill.core.calculator import WINDOW_TOKENS, CalculatorState, number_token_ids
except ImportError:  # a bundle's copy, run where distill is not installed
    import importlib.util as _util

    _spec = _util.spec_from_file_location("distill_calculator", Path(__file__).with_name("distill_calculator.py"))
    _calculator = _util.module_from_spec(_spec)
    sys.modules["distill_calculator"] = _calculator
    _spec.loader.exec_module(_calculator)
    CalculatorState, number_token_ids = _calculator.CalculatorState, _calculator.number_token_ids
    WINDOW_TOKENS = _calculator.WINDOW_TOKENS

GENERATION_FILE = "distill_generation.json"
GENAI_FILE = "genai_config.json"
# Layout version of the bundle (``major.minor``), written into GENERATION_FILE. A minor bump stays
# readable by older runtimes; a runtime refuses a major it does not know. Bundles written before
# versioning have no field and the 1.x layout. 2.0 added ``padding_side``: fused-attention models
# (export.gqa) take right-padded batches, which a 1.x runtime would left-pad. 2.1 added
# ``context_length`` (before it, only genai_config.json stated the context). 2.2 added ``calculator``
# (decode with the calculator; a 2.1 runtime ignores it and decodes plainly).
FORMAT_VERSION = "2.2"
READS_MAJORS = ("1", "2")
# max_new_tokens of bundles that do not state one
DEFAULT_MAX_NEW_TOKENS = 256


class BundleFormatError(ValueError):
    """The bundle was written for another major format than this runtime reads."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} — {fix}")


class RequestError(ValueError):
    """A generation request the model cannot serve as asked (empty question, prompt past the context,
    bad sampling setting); ``problem`` and ``fix`` read as one line for a person."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} — {fix}")


def context_length(meta: dict, bundle_dir: Path | str) -> int | None:
    """Tokens the model attends over (prompt + generated), as the bundle states it: ``context_length``
    of GENERATION_FILE (format 2.1+), else ``model.context_length`` of genai_config.json (older
    bundles); None when the bundle states neither (then no length check is possible)."""
    if meta.get("context_length"):
        return int(meta["context_length"])
    genai = Path(bundle_dir) / GENAI_FILE
    if genai.is_file():
        found = json.loads(genai.read_text()).get("model", {}).get("context_length")
        return int(found) if found else None
    return None


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ``RequestError`` for settings decoding cannot use (they would fail mid-batch, or never stop)."""
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens is {max_new_tokens}", "ask for at least 1 new token")
    if not temperature >= 0:
        raise RequestError(f"temperature is {temperature}", "use 0 for greedy decoding or a positive temperature")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p is {top_p}", "use a top_p above 0 and at most 1 (1 keeps every token)")


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
        self.context_length = context_length(self.meta, bundle_dir)
        self.max_new_tokens = int(self.meta.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        self.calculator = bool(self.meta.get("calculator", False))
        self.calculator_writes = 0  # values the calculator wrote, over this generator's life
        self.tokens_generated = 0
        self._number_tokens: list[int] | None = None

    def number_tokens(self) -> list[int]:
        """Vocabulary ids that would extend a number (banned right after a calculator value)."""
        if self._number_tokens is None:
            self._number_tokens = number_token_ids(self.tokenizer.get_vocab())
        return self._number_tokens

    def render(self, question: str) -> str:
        """The prompt string the student was trained on, for one question."""
        return self.meta["prompt_template"].replace(self.meta["placeholder"], question)

    def encode(self, question: str, max_new_tokens: int | None = None, truncate: bool = False) -> list[int]:
        """Token ids of ``question``'s rendered prompt, checked so that decoding can finish in context.

        Raises ``RequestError`` for an empty (or whitespace-only) question, and for a prompt whose tokens
        plus ``max_new_tokens`` (default: the bundle's) exceed the context, unless ``truncate``: then the
        prompt keeps its last tokens that fit (the end holds the question's tail and the answer cue).
        Checked before decoding because a prompt past the context decodes slowly into garbage."""
        if not question.strip():
            raise RequestError("the question is empty", "pass the text of a question")
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids = self.tokenizer.encode(self.render(question), add_special_tokens=False).ids
        limit = self.context_length
        if limit is None or len(ids) + new <= limit:
            return ids
        if new >= limit:
            raise RequestError(
                f"max_new_tokens {new} leaves no room for a prompt in the model's {limit}-token context",
                f"lower --max-new-tokens (max_new_tokens) below {limit}",
            )
        if truncate:
            return ids[len(ids) - (limit - new) :]
        raise RequestError(
            f"the prompt is {len(ids)} tokens and {new} new tokens are asked for: {len(ids) + new} tokens, "
            f"past the model's {limit}-token context",
            f"shorten the question, lower --max-new-tokens (max_new_tokens), or pass --truncate "
            f"(truncate=True) to keep the prompt's last {limit - new} tokens",
        )

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
        calculator: bool | None = None,
    ) -> list[list[int]]:
        """Decode a batch of token-id prompts, padded together on the side the model takes (left, or
        right for fused-attention models); returns the new token ids of each. ``calculator`` (default:
        the bundle's setting) writes the value of each arithmetic expression a row ends with ``=``."""
        n = len(prompts)
        calc = None
        if self.calculator if calculator is None else calculator:
            calc = CalculatorState(
                n, lambda text: self.tokenizer.encode(text, add_special_tokens=False).ids, self.number_tokens()
            )
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
            logits = logits[np.arange(n), last, :]
            forced: dict[int, int] = {}
            if calc is not None:
                for i in np.flatnonzero(~done):
                    tok = calc.next_forced(i, self.tokenizer.decode(out[i][-WINDOW_TOKENS:])) if out[i] else None
                    if tok is not None:
                        forced[i] = tok
                    elif calc.blocks_digits(i):
                        logits[i, calc.number_tokens] = -np.inf
            nxt = _sample(logits, temperature, top_p, rng)
            for i, tok in forced.items():
                nxt[i] = tok
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
        if calc is not None:
            self.calculator_writes += calc.calls
        return out

    def generate(
        self,
        questions: list[str],
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: tuple[str, ...] = (),
        truncate: bool = False,
        calculator: bool | None = None,
    ) -> list[str]:
        """Completions for ``questions`` rendered with the training prompt template (cut at stop strings).

        ``max_new_tokens`` None means the bundle's. Every question is checked (``encode``) before any
        is decoded, so a bad one fails the call at once; ``RequestError`` names it by its position."""
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_sampling(new, temperature, top_p)
        encoded = []
        for i, q in enumerate(questions):
            try:
                encoded.append(self.encode(q, new, truncate))
            except RequestError as e:
                if len(questions) == 1:
                    raise
                raise RequestError(f"question {i + 1} of {len(questions)}: {e.problem}", e.fix) from None
        texts: list[str] = []
        for start in range(0, len(questions), batch_size):
            prompts = encoded[start : start + batch_size]
            for ids in self.generate_ids(prompts, new, temperature, top_p, seed + start, stop, calculator):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0] if s in text else text
                texts.append(text)
        return texts


def main(argv: list[str] | None = None) -> int:
    """``python distill_runtime.py BUNDLE QUESTION [--model FILE] [--max-new-tokens N] [--temperature T]
    [--top-p P] [--seed S] [--truncate]``; problems print as one ``error:`` line, exit code 2."""
    import argparse

    ap = argparse.ArgumentParser(description="Answer a question with a distill export bundle (onnxruntime only).")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("question")
    ap.add_argument("--model", default=None, help="ONNX file inside the bundle (default: the bundle's choice)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's max_new_tokens")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truncate", action="store_true", help="keep the prompt's end when it is past the context")
    ap.add_argument(
        "--calculator",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the value of each arithmetic expression ending in '=' (default: the bundle's setting)",
    )
    args = ap.parse_args(argv)
    if not (args.bundle / GENERATION_FILE).is_file():
        print(f"error: {args.bundle} is not an export bundle (no {GENERATION_FILE})", file=sys.stderr)
        return 2
    try:
        gen = OnnxGenerator(args.bundle, args.model)
        settings = (args.max_new_tokens, 1, args.temperature, args.top_p, args.seed)
        print(gen.generate([args.question], *settings, truncate=args.truncate, calculator=args.calculator)[0])
    except (BundleFormatError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
