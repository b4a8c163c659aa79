"""The generation worker: one teacher model per process, used by Ray actors or in-process."""

from __future__ import annotations

import pyarrow as pa

from distill.core.answers import Task
from distill.teachers.methods import METHODS
from distill.teachers.replay import ReplayTeacher

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("question", pa.string()),
        ("gold", pa.string()),
        ("prompt", pa.string()),
        ("rationale", pa.string()),
        ("answer_raw", pa.string()),
        ("pred", pa.string()),
        ("confidence", pa.float64()),
        ("correct", pa.bool_()),
        ("parse_error", pa.string()),
        ("finish_reason", pa.string()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("cached", pa.bool_()),
        ("teacher", pa.string()),
        ("error", pa.string()),
        ("alternatives", pa.list_(pa.string())),
        # Logit KD (teacher.topk_logprobs > 0): rationale token ids, top-k ids and log-probs per token.
        ("teacher_token_ids", pa.list_(pa.int32())),
        ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ]
)


def make_backend(cfg, model_path: str):
    """The backend a teacher config names: an OpenAI-compatible endpoint or a local model folder."""
    if cfg.model.startswith("openai:"):
        from distill.teachers.backends.openai import OpenAIBackend

        return OpenAIBackend(
            cfg.model.removeprefix("openai:"),
            cfg.base_url,
            api=cfg.api,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
            max_retries=cfg.max_retries,
            timeout=cfg.request_timeout,
            retry_base=cfg.retry_base,
        )
    if cfg.engine == "vllm":
        from distill.teachers.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, dtype=cfg.dtype)
    from distill.teachers.backends.transformers import TransformersBackend

    return TransformersBackend(
        model_path,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        long_prompts=cfg.long_prompts,
        trust_remote_code=cfg.trust_remote_code,
    )


class TeacherWorker:
    """Callable on a batch of problems (a pyarrow Table or list of dicts) → table of output rows."""

    def __init__(self, model_path: str, teacher_cfg: dict, answer_type: str, cache_path: str, cache_only: bool = False):
        import torch

        from distill.config import TeacherConfig
        from distill.teachers.cache import CachedTeacher, CompletionCache

        self.cfg = TeacherConfig.model_validate(teacher_cfg)
        self.task = Task(answer_type)
        if self.cfg.model.startswith("replay:"):
            self.teacher = ReplayTeacher(self.cfg.model.removeprefix("replay:"))
            return
        torch.set_num_threads(1)
        backend = make_backend(self.cfg, model_path)
        self.teacher = CachedTeacher(backend, CompletionCache(cache_path), cache_only=cache_only)
        self.method = METHODS[self.cfg.method]

    def __call__(self, batch) -> pa.Table:
        problems = batch.to_pylist() if isinstance(batch, pa.Table) else list(batch)
        if isinstance(self.teacher, ReplayTeacher):
            rows = self.teacher.rows(problems, self.task)
        else:
            rows = self.method(self.teacher, problems, self.cfg, self.task)
        for r in rows:
            r["teacher"] = self.teacher.model_id
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
