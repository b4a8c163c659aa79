"""Local transformers teacher: batched generation with length bucketing, 1 thread per process."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from teachers.backends.base import Completion, GenerationRequest, render_chat

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

    def greedy(self, input_ids, attention_mask, max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding of a left-padded batch that drops each row as soon as it ends.

        ``generate()`` keeps finished rows in the batch until the longest one ends, paying a full
        forward pass per finished row per step; here the KV cache and the batch shrink instead, so
        the cost follows the tokens actually written. Same tokens as ``generate(do_sample=False)``.
        """
        import torch
        from transformers import DynamicCache

        model = self.model
        rows = list(range(input_ids.shape[0]))  # original row of each live batch position
        out: list[list[int]] = [[] for _ in rows]
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
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            keep = []
            for pos, tok in enumerate(nxt.tolist()):
                out[rows[pos]].append(tok)
                if tok not in self.eos_ids:
                    keep.append(pos)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=nxt.device)
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
        return out

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
        order = sorted((i for i in range(len(requests)) if results[i] is None), key=lambda i: len(encoded[i]))
        i = 0
        while i < len(order):
            # A batch shares one decoding setting so generate() can run it in one call.
            dec = requests[order[i]].decoding
            idx = [order[i]]
            j = i + 1
            while j < len(order) and len(idx) < self.batch_size and requests[order[j]].decoding == dec:
                idx.append(order[j])
                j += 1
            i = j
            batch = self.tokenizer.pad({"input_ids": [encoded[k] for k in idx]}, return_tensors="pt").to(self.device)
            gen_kwargs = dict(max_new_tokens=dec.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
            if dec.temperature > 0:
                gen_kwargs.update(do_sample=True, temperature=dec.temperature, top_p=dec.top_p)
                torch.manual_seed(int(requests[idx[0]].key(self.model_id)[:8], 16) + requests[idx[0]].sample)
            else:
                gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            recorder = _topk_recorder(dec.logprobs) if dec.logprobs else None
            if recorder is not None:
                gen_kwargs["logits_processor"] = [recorder]
            with torch.inference_mode():
                if dec.temperature > 0 or recorder is not None:
                    out = self.model.generate(**batch, **gen_kwargs)
                    new = out[:, batch["input_ids"].shape[1] :].tolist()
                else:  # plain greedy: the row-dropping loop (same tokens, less compute)
                    new = self.greedy(batch["input_ids"], batch["attention_mask"], dec.max_new_tokens)
            topk = recorder.result() if recorder is not None else None
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
                    results[k].topk_ids = topk[0][row, :n].tolist()
                    results[k].topk_logprobs = topk[1][row, :n].tolist()
        return results  # type: ignore[return-value]


def _topk_recorder(k: int):
    """A logits processor that records the top-k log-probabilities of every decoding step unchanged."""
    import torch
    from transformers import LogitsProcessor

    class TopKRecorder(LogitsProcessor):
        def __init__(self):
            self.ids, self.logprobs = [], []

        def __call__(self, input_ids, scores):
            values, ids = torch.log_softmax(scores.float(), dim=-1).topk(k, dim=-1)
            self.ids.append(ids.cpu())
            self.logprobs.append(values.cpu())
            return scores

        def result(self):
            """([batch, steps, k] token ids, [batch, steps, k] log-probabilities)."""
            return torch.stack(self.ids, 1), torch.stack(self.logprobs, 1)

    return TopKRecorder()
