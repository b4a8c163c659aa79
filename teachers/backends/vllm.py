"""vLLM in-process teacher (optional extra ``distill[vllm]``, CUDA): the same contract as the
transformers backend, with vLLM's continuous batching and paged KV cache doing the scheduling.

Every request carries its own ``SamplingParams`` (with a per-request seed derived from the cache
key and sample index), so a sampled completion does not depend on which batch it ran in.
"""

from __future__ import annotations

from pathlib import Path

from distill.core.errors import DistillError
from distill.teachers.backends.base import Completion, GenerationRequest, render_chat
from distill.teachers.backends.transformers import model_identity


class VLLMBackend:
    def __init__(self, path: Path | str, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85):
        try:
            import vllm
        except ImportError:
            raise DistillError(
                "teacher.engine=vllm needs the vllm package (and a CUDA GPU)",
                "pip install 'distill[vllm]' on a GPU machine, or use teacher.engine=transformers",
            ) from None
        from transformers import AutoTokenizer

        self.path, self.dtype = path, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Same identity as the transformers backend: identical weights answer from the same cache.
        self.model_id = model_identity(path, dtype)
        self.llm = vllm.LLM(
            model=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True
        )
        self._params = vllm.SamplingParams

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str:
        return render_chat(self.tokenizer, messages, assistant_prefix)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        params = []
        for r in requests:
            d = r.decoding
            params.append(
                self._params(
                    max_tokens=d.max_new_tokens,
                    temperature=d.temperature,
                    top_p=d.top_p if d.temperature > 0 else 1.0,
                    stop=list(d.stop) or None,
                    seed=int(r.key(self.model_id)[:8], 16) + r.sample if d.temperature > 0 else None,
                )
            )
        outs = self.llm.generate([{"prompt": r.prompt} for r in requests], params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(Completion(c.text, len(o.prompt_token_ids), len(c.token_ids), c.finish_reason or "stop"))
        return results
