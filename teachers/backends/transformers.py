"""Local transformers teacher: batched generation with length bucketing, 1 thread per process."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from distill.teachers.backends.base import Completion, Decoding, GenerationRequest, ScoreRequest, render_chat

log = logging.getLogger("distill.teacher")


def model_identity(path: Path | str, dtype: str) -> str:
    """Stable id of local weights: config + weight file names, sizes and head/tail bytes, plus dtype."""
    path = Path(path)
    h = hashlib.sha256(dtype.encode())
    if not path.exists():
        return f"hub:{path}:{dtype}"
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".jinja", ".model", ".txt"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if f.stat().st_size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return f"{path.name}@{h.hexdigest()[:16]}"


class TransformersBackend:
    """A causal LM from a local folder, generating on CPU (or CUDA when present).

    Weights load on the first real generation: a run answered entirely from the completion cache
    needs only the tokenizer.
    """

    def __init__(
        self,
        path: Path | str,
        dtype: str = "float32",
        batch_size: int = 16,
        threads: int = 1,
        long_prompts: str = "reject",
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        torch.set_num_threads(threads)
        self.path, self.dtype = path, dtype
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.trust = trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._model = None
        self.batch_size = batch_size
        self.long_prompts = long_prompts
        self.context = (
            getattr(
                AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "max_position_embeddings", None
            )
            or 1 << 30
        )
        self.model_id = model_identity(path, dtype)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in eos if e is not None} | {self.tokenizer.eos_token_id}

    @property
    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._model = (
                # safetensors only: a pickle checkpoint can run code on load
                AutoModelForCausalLM.from_pretrained(
                    self.path, dtype=getattr(torch, self.dtype), use_safetensors=True, trust_remote_code=self.trust
                )
                .to(self.device)
                .eval()
            )
        return self._model

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str:
        """Render messages with the model's chat template (plain text when it has none)."""
        return render_chat(self.tokenizer, messages, assistant_prefix)

    def decode(self, input_ids, attention_mask, dec: Decoding, expand=None, seeds=None):
        """Decode a left-padded batch of prompts; rows leave the batch and KV cache as they end.

        ``expand[r]`` is the prompt row that output row ``r`` continues (default: one row per
        prompt). Rows that share a prompt — self-consistency samples — share its prefill: the
        prompt runs through the model once and its KV cache is copied, as ``num_return_sequences``
        would, but for any mix of prompts and sample counts. Sampling (``dec.temperature > 0``,
        nucleus ``dec.top_p``) draws each row from its own generator seeded with ``seeds[r]``, so a
        request's sample does not depend on which batch it landed in. Only the decoding parameters
        given are applied (no temperature/top-k/repetition penalty from the model's
        generation_config), so they mean the same on every engine. ``generate()`` keeps finished
        rows in the batch until the longest ends; here the cost follows the tokens written.

        Returns the new tokens of every row (ending with EOS when one was written) and, with
        ``dec.logprobs = k``, per row ``(ids, logprobs)`` of the top-k at temperature 1 per step.
        """
        import torch
        from transformers import DynamicCache

        model = self.model
        device = input_ids.device
        n_rows = len(expand) if expand is not None else input_ids.shape[0]
        rows = list(range(n_rows))  # original row of each live batch position
        out: list[list[int]] = [[] for _ in rows]
        top: list[tuple[list, list]] | None = [([], []) for _ in rows] if dec.logprobs else None
        gens = None
        if dec.temperature > 0:
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        cache = DynamicCache(config=model.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if expand is not None and list(expand) != list(range(input_ids.shape[0])):
            index = torch.tensor(expand, device=device)
            cache.batch_select_indices(index)  # repeated indices copy a prompt's cache to each sample
            logits, attention_mask = logits[index], attention_mask[index]
        max_new_tokens = dec.max_new_tokens
        for step in range(max_new_tokens):
            scores = logits.float()
            if top is not None:
                values, ids = torch.log_softmax(scores, -1).topk(dec.logprobs, -1)
                for pos, (i, v) in enumerate(zip(ids.tolist(), values.tolist())):
                    top[rows[pos]][0].append(i)
                    top[rows[pos]][1].append(v)
            nxt = (
                scores.argmax(-1)
                if gens is None
                else _sample(scores, dec.temperature, dec.top_p, [gens[r] for r in rows])
            )
            keep = []
            for pos, tok in enumerate(nxt.tolist()):
                out[rows[pos]].append(tok)
                if tok not in self.eos_ids:
                    keep.append(pos)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention_mask, nxt = attention_mask[index], nxt[index]
                rows = [rows[k] for k in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            positions = attention_mask.sum(-1, keepdim=True) - 1
            logits = model(
                input_ids=nxt[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
        return out, top

    def greedy(self, input_ids, attention_mask, max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens of a left-padded batch (``decode`` at temperature 0)."""
        return self.decode(input_ids, attention_mask, Decoding(max_new_tokens=max_new_tokens))[0]

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Complete every request; prompts are sorted by length so each batch pads little."""
        import torch

        encoded = [self.tokenizer(r.prompt, add_special_tokens=False).input_ids for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            limit = self.context - r.decoding.max_new_tokens
            if len(encoded[i]) <= limit:
                continue
            if self.long_prompts == "truncate" and limit > 16:
                n, head = len(encoded[i]), limit // 2  # keep the start (instructions) and the end (question, turn)
                encoded[i] = encoded[i][:head] + encoded[i][n - (limit - head) :]
                log.warning("prompt of %d tokens cut to %d to fit the teacher's context of %d", n, limit, self.context)
            else:
                results[i] = Completion(
                    "",
                    len(encoded[i]),
                    0,
                    "error",
                    error=f"prompt has {len(encoded[i])} tokens but the teacher's context leaves {limit} "
                    f"after {r.decoding.max_new_tokens} new tokens (set teacher.long_prompts=truncate to cut it)",
                )
        # Sorted by length, identical prompts (self-consistency samples) next to each other.
        order = sorted(
            (i for i in range(len(requests)) if results[i] is None), key=lambda i: (len(encoded[i]), requests[i].prompt)
        )
        i = 0
        while i < len(order):
            # A batch shares one decoding setting so one decoding loop runs it.
            dec = requests[order[i]].decoding
            idx = [order[i]]
            j = i + 1
            while j < len(order) and len(idx) < self.batch_size and requests[order[j]].decoding == dec:
                idx.append(order[j])
                j += 1
            i = j
            unique: dict[str, int] = {}  # each distinct prompt is prefilled once
            prompt_ids: list[list[int]] = []
            expand = []
            for k in idx:
                if requests[k].prompt not in unique:
                    unique[requests[k].prompt] = len(prompt_ids)
                    prompt_ids.append(encoded[k])
                expand.append(unique[requests[k].prompt])
            batch = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(self.device)
            seeds = [int(requests[k].key(self.model_id)[:15], 16) for k in idx]
            with torch.inference_mode():
                new, topk = self.decode(batch["input_ids"], batch["attention_mask"], dec, expand, seeds)
            for row, (k, toks) in enumerate(zip(idx, new)):
                n, finish = len(toks), "length"
                for t, tok in enumerate(toks):
                    if tok in self.eos_ids:
                        n, finish = t, "stop"
                        break
                text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
                cut = False
                for s in dec.stop:
                    if s in text:
                        text, finish, cut = text[: text.index(s)], "stop", True
                results[k] = Completion(text, len(encoded[k]), n, finish)
                if topk is not None and not cut:  # token ids only when they are exactly the text
                    results[k].token_ids = toks[:n]
                    results[k].topk_ids = topk[row][0][:n]
                    results[k].topk_logprobs = topk[row][1][:n]
        return results  # type: ignore[return-value]

    def score(self, requests: list[ScoreRequest]) -> list[Completion]:
        """The teacher's top-k log-probabilities before every completion token of each request.

        Prompt and completion are tokenized apart, so the completion's tokens are exactly the ones a
        student with this tokenizer trains on."""
        results: list[Completion | None] = [None] * len(requests)
        pairs = {}
        for i, r in enumerate(requests):
            p = self.tokenizer(r.prompt, add_special_tokens=False).input_ids
            c = self.tokenizer(r.completion, add_special_tokens=False).input_ids
            if len(p) + len(c) > self.context:
                error = (
                    f"prompt and completion have {len(p) + len(c)} tokens, over the teacher's context of {self.context}"
                )
                results[i] = Completion(r.completion, len(p) + len(c), 0, "error", error=error)
            else:
                pairs[i] = (p, c)
        by_k: dict[int, list[int]] = {}
        for i in pairs:
            by_k.setdefault(requests[i].logprobs, []).append(i)
        for k, idx in by_k.items():
            for i, (ids, lps) in zip(idx, self.score_tokens([pairs[i] for i in idx], k)):
                p, c = pairs[i]
                results[i] = Completion(
                    requests[i].completion, len(p) + len(c), 0, "stop", token_ids=c, topk_ids=ids, topk_logprobs=lps
                )
        return results  # type: ignore[return-value]

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], k: int) -> list[tuple[list, list]]:
        """Per ``(prompt ids, completion ids)``: the top-``k`` (ids, log-probabilities) before each
        completion token. Run together, right-padded, sorted by length; position ``len(prompt) - 1 + j``
        predicts completion token ``j`` (an empty prompt leaves the first token unscored: ``[]`` there)."""
        import torch

        out: list[tuple[list, list] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(1, max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx))
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = pairs[i][0] + pairs[i][1]
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(idx):
                p, c = pairs[i]
                first = max(len(p) - 1, 0)
                at = logits[row, first : len(p) - 1 + len(c)].float()
                values, top = torch.log_softmax(at, -1).topk(min(k, at.shape[-1]), -1)
                lead = ([[]], [[]]) if not p and c else ([], [])
                out[i] = (lead[0] + top.tolist(), lead[1] + values.tolist())
        return out  # type: ignore[return-value]


def _sample(scores, temperature: float, top_p: float, generators):
    """One token per row of ``scores`` [rows, vocab]: temperature, then nucleus (top-p) filtering
    as transformers' ``TopPLogitsWarper`` does it, then a draw from each row's own generator."""
    import torch

    scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
