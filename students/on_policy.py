"""On-policy distillation (generalized JSD / GKD, Agarwal et al. 2024; as Qwen3's small models were
trained): the student samples answers to training questions, the teacher scores every sampled token,
and the student minimises the divergence between its distribution and the teacher's on its own
samples — the mistakes it actually makes are the ones corrected.

``OnPolicy`` turns a batch of training questions into KD examples of the student's own samples:
with a shared tokenizer (``loss="jsd"``) the sample is trained on as the teacher tokenized it, with
the teacher's top-k ids and log-probabilities at each token (``kd_example``'s layout); across
tokenizers (``loss="uld"``) on the student's own tokens, the teacher's j-th token distribution
aligned to the student's j-th token (``uld_example``'s layout). Only sampled tokens carry loss: the
divergence alone (no cross-entropy on a sample that may be wrong). The stop decision is not scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from distill.students.data import render_prompt


@dataclass
class KDTerm:
    """The loss settings ``forward_loss`` reads for on-policy batches: divergence only (weight 1)."""

    loss: str
    beta: float
    temperature: float = 1.0
    weight: float = 1.0


@dataclass
class OnPolicy:
    """Student samples for a training batch, scored by the teacher, as KD examples.

    ``scorer.score(list[ScoreRequest])`` is the (cached) teacher; ``teacher_prompt(question)`` its own
    prompt for a question; ``template`` the student's prompt; ``cost(tokens_in)`` the estimated spend
    of scoring calls. ``state`` (steps, samples, scored tokens, cache hits, fresh teacher tokens,
    cost) travels with the training checkpoint, so a budget holds across resumes.
    """

    scorer: object
    teacher_prompt: object
    tokenizer: object
    template: str
    settings: object  # config.OnPolicySettings
    loss: str  # "jsd" | "uld", resolved
    max_new_tokens: int
    max_length: int
    seed: int
    cost: object = None
    state: dict = field(
        default_factory=lambda: {
            "steps": 0,
            "samples": 0,
            "sampled_tokens": 0,
            "scored": 0,
            "cached": 0,
            "teacher_tokens": 0,
            "cost": 0.0,
        }
    )

    @property
    def kd(self) -> KDTerm:
        return KDTerm("jsd" if self.loss == "jsd" else "uld", self.settings.beta)

    def use(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the student's own samples (λ of the steps, by seed)."""
        lmbda = self.settings.lmbda
        return lmbda >= 1 or (lmbda > 0 and random.Random(self.seed * 1_000_003 + step).random() < lmbda)

    def sample(self, model, questions: list[str], step: int) -> list[list[int]]:
        """One sampled completion (token ids, EOS and padding cut) per question; seeded by step, so a
        resumed run samples the same completions from the same weights (and finds their scores cached)."""
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompts = [render_prompt(self.template, q) for q in questions]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        was_training, use_cache = model.training, model.config.use_cache
        model.eval()
        model.config.use_cache = True
        try:
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(self.seed * 1_000_003 + step)
                # only these decoding settings: plain sampling from the student's distribution
                # (no top-k/top-p/repetition penalty from the model's generation_config)
                config = GenerationConfig(
                    do_sample=True,
                    temperature=self.settings.temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=sorted(self._eos(model)),
                )
                out = model.generate(**enc, generation_config=config)
        finally:
            model.config.use_cache = use_cache
            if was_training:
                model.train()
        eos = self._eos(model) | {pad}
        samples = []
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            n = next((j for j, t in enumerate(row) if t in eos), len(row))
            samples.append(row[:n])
        return samples

    def _eos(self, model) -> set[int]:
        ids = getattr(model.generation_config, "eos_token_id", None)
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in [*ids, self.tokenizer.eos_token_id] if i is not None}

    def examples(self, model, questions: list[str], step: int) -> list[dict]:
        """KD examples of the student's samples for ``questions`` (deduplicated), scored by the teacher."""
        from distill.teachers.backends.base import ScoreRequest

        questions = list(dict.fromkeys(questions))
        samples = self.sample(model, questions, step)
        texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in samples]
        keep = [i for i, t in enumerate(texts) if t.strip()]
        requests = [ScoreRequest(self.teacher_prompt(questions[i]), texts[i], self.settings.topk) for i in keep]
        scores = self.scorer.score(requests)
        s = self.state
        s["steps"] += 1
        s["samples"] += len(questions)
        s["sampled_tokens"] += sum(len(x) for x in samples)
        out = []
        for i, c in zip(keep, scores):
            if c.error or not c.topk_logprobs:
                continue
            s["scored"] += 1
            if c.cached:
                s["cached"] += 1
            else:
                s["teacher_tokens"] += c.tokens_in
                s["cost"] += self.cost(c.tokens_in) if self.cost else 0.0
            prompt = self.tokenizer(render_prompt(self.template, questions[i]), add_special_tokens=False).input_ids
            ex = self._example(prompt, c)
            if ex is not None:
                out.append({**ex, "task": "on_policy", "question": questions[i]})
        return out

    def _example(self, prompt: list[int], c) -> dict | None:
        if self.loss == "jsd":
            if c.token_ids is None or c.topk_ids is None:
                return None
            body, ids, lps = list(c.token_ids), c.topk_ids, c.topk_logprobs
        else:
            body = self.tokenizer(c.text, add_special_tokens=False).input_ids
            ids, lps = None, c.topk_logprobs
        n = min(len(body), len(lps), self.max_length - len(prompt))
        # kd_pos marks each scored token's own position; its kd row is the distribution that predicted it
        if n <= 0 or any(len(row) == 0 for row in lps[:n]):
            return None
        start = len(prompt)
        example = {
            "input_ids": prompt + body[:n],
            "labels": [-100] * start + body[:n],
            "kd_pos": [start + j for j in range(n)],
            "kd_logprobs": [list(x) for x in lps[:n]],
        }
        if ids is not None:
            example["kd_ids"] = [list(x) for x in ids[:n]]
        return example

    def over_budget(self) -> str | None:
        """Why scoring must stop (None while within ``max_tokens`` / ``max_cost``)."""
        cfg, s = self.settings, self.state
        if cfg.max_tokens and s["teacher_tokens"] >= cfg.max_tokens:
            return f"the teacher has read {s['teacher_tokens']:,} tokens for on-policy scoring (max_tokens {cfg.max_tokens:,})"
        if cfg.max_cost and s["cost"] >= cfg.max_cost:
            return f"on-policy scoring has cost an estimated {s['cost']:.2f} (max_cost {cfg.max_cost:g})"
        return None
