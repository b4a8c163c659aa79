"""The generation worker: one teacher model per process, used by Ray actors or in-process."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from distill.core.answers import Task
from distill.teachers.methods import METHODS
from distill.teachers.replay import ReplayTeacher
from distill.teachers.rows import row_schema


def make_backend(cfg, model_path: str, limits_bucket: str | None = None, cache=None):
    """The backend a teacher config names: an OpenAI-compatible endpoint (live, or its Batch API) or a
    local model folder. ``limits_bucket``: the job's shared rate-limit bucket, for an endpoint called
    from Ray workers; ``cache``: the ``CompletionCache`` a batch teacher records its batches in."""
    if cfg.model.startswith("openai:") and cfg.api == "batch":
        from distill.teachers.backends.batch import BatchBackend

        return BatchBackend(
            cfg.model.removeprefix("openai:"),
            cfg.base_url,
            store=cache.path if cache is not None else None,
            keep=cache.put_many if cache is not None else None,
            api_key_env=cfg.api_key_env,
            max_retries=cfg.max_retries,
            timeout=cfg.request_timeout,
            retry_base=cfg.retry_base,
            poll_seconds=cfg.batch.poll_seconds,
            completion_window=cfg.batch.completion_window,
            max_requests=cfg.batch.max_requests,
            rounds=cfg.batch.rounds,
            concurrency=cfg.concurrency,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
            limits_bucket=limits_bucket,
            workers=cfg.workers,
        )
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
            limits_bucket=limits_bucket,
            workers=cfg.workers,
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


def judge_teacher(cfg, model_path: str, cache_path: str, cache_only: bool = False):
    """The ``CachedTeacher`` of teacher section ``cfg``'s judge (``cfg.judge``), on the same completion
    cache as the teacher: judge calls are cached, retried and counted as teacher calls are."""
    from distill.teachers.cache import CachedTeacher, CompletionCache

    cache = CompletionCache(cache_path)
    return CachedTeacher(make_backend(cfg.judge_section(), model_path, None, cache), cache, cache_only=cache_only)


class TeacherWorker:
    """Callable on a batch of problems (a pyarrow Table or list of dicts) → table of output rows; with
    ``teacher_cfg.judge`` each answered train row is judged in the batch, before it is committed."""

    def __init__(
        self,
        model_path: str,
        teacher_cfg,
        task: Task,
        cache_path: str,
        cache_only: bool = False,
        limits_bucket: str | None = None,
        judge_model_path: str = "",
    ):
        import torch

        from distill.teachers.cache import CachedTeacher, CompletionCache

        self.cfg = teacher_cfg  # the recipe's teacher section (or any object with its fields)
        self.task = task  # answer extraction and checking (``Task.from_config(recipe.task)``)
        judge = getattr(self.cfg, "judge", None)
        self.judge = judge_teacher(self.cfg, judge_model_path, cache_path, cache_only) if judge else None
        if self.cfg.model.startswith("replay:"):
            self.teacher = ReplayTeacher(self.cfg.model.removeprefix("replay:"))
            return
        torch.set_num_threads(1)
        cache = CompletionCache(cache_path)
        backend = make_backend(self.cfg, model_path, limits_bucket, cache)
        self.teacher = CachedTeacher(backend, cache, cache_only=cache_only)
        self.method = METHODS[self.cfg.method]

    def _counts(self) -> tuple[int, int]:
        """(requests answered, requests paid for) so far by the teacher and the judge together."""
        clients = [c for c in (self.teacher, self.judge) if hasattr(c, "requests")]
        return sum(c.requests for c in clients), sum(c.calls for c in clients)

    def __call__(self, batch) -> pa.Table:
        before = self._counts()
        table = self._rows(batch)
        after = self._counts()
        return with_calls(table, after[0] - before[0], after[1] - before[1])

    def _rows(self, batch) -> pa.Table:
        problems = batch.to_pylist() if isinstance(batch, pa.Table) else list(batch)
        if isinstance(self.teacher, ReplayTeacher):
            rows = self.teacher.rows(problems, self.task)
        else:
            rows = self.method(self.teacher, problems, self.cfg, self.task)
        by_id = {p["id"]: p for p in problems}
        name = getattr(self.cfg, "name", None) or self.teacher.model_id  # one of several teachers: its name
        for r in rows:
            r["teacher"] = name
            p = by_id[r["id"]]
            r.update(source=p.get("source"), source_row=p.get("source_row"), extra=p.get("extra"))
        if self.judge is not None:
            from distill.teachers.judge import judge_rows

            rows = judge_rows(
                self.judge,
                rows,
                self.cfg.judge,
                has_gold=lambda r: by_id[r["id"]].get("gold") is not None,  # not a vote standing in for one
                open_answer=self.task.answer_type == "open",
            )
        return pa.Table.from_pylist(rows, schema=row_schema(self.judge is not None))


CALLS_KEY, PAID_CALLS_KEY = b"distill.calls", b"distill.paid_calls"


def with_calls(table: pa.Table, calls: int, paid: int) -> pa.Table:
    """``table`` carrying how many teacher (and judge) requests its rows took, and how many of those were
    paid (not served by the cache), in its schema metadata: the driver counts them (``pop_calls``)."""
    meta = dict(table.schema.metadata or {})
    meta.update({CALLS_KEY: str(calls).encode(), PAID_CALLS_KEY: str(paid).encode()})
    return table.replace_schema_metadata(meta)


def pop_calls(table: pa.Table) -> tuple[pa.Table, int, int]:
    """(the table as the worker built it, its requests, its paid requests): the counts leave the schema
    before the rows are committed, so shards and datasets are what they were without them."""
    meta = dict(table.schema.metadata or {})
    calls, paid = int(meta.pop(CALLS_KEY, b"0")), int(meta.pop(PAID_CALLS_KEY, b"0"))
    return table.replace_schema_metadata(meta or None), calls, paid


def run_teacher(problems: list[dict], worker_kwargs: dict, cfg, on_batch) -> None:
    """Answer ``problems`` with ``TeacherWorker(**worker_kwargs)``, calling ``on_batch(table)`` per batch.

    Batches the completion cache fully covers are answered first, in this process (tokenizer only,
    no weights, no Ray); the rest go to ``cfg.workers`` Ray actors (``cfg.executor=ray``) or to one
    in-process worker (``local``)."""
    from distill.core.executor import map_actor_pool

    todo = _serve_from_cache(problems, worker_kwargs, cfg, on_batch)
    if not todo:
        return
    if cfg.executor == "ray":
        if cfg.model.startswith("openai:"):  # the endpoint's limits hold across all the actors
            from distill.teachers.limits import job_bucket

            worker_kwargs = {**worker_kwargs, "limits_bucket": job_bucket(cfg, worker_kwargs["cache_path"])}
        map_actor_pool(
            todo,
            TeacherWorker,
            worker_kwargs,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            num_cpus=0.25 if _remote_only(cfg) else 1,  # an HTTP client mostly waits
            on_batch=on_batch,
        )
        return
    worker = TeacherWorker(**worker_kwargs)
    for start in range(0, len(todo), cfg.batch_size):
        on_batch(worker(todo[start : start + cfg.batch_size]))


def _remote_only(cfg) -> bool:
    """Whether the teacher (and its judge, if any) are endpoints: no local weights in the actor."""
    judge = getattr(cfg, "judge", None)
    return cfg.model.startswith("openai:") and (judge is None or judge.model.startswith("openai:"))


def _serve_from_cache(problems: list[dict], worker_kwargs: dict, cfg, on_batch) -> list[dict]:
    """Answer every batch the completion cache fully covers; returns the problems that still need the teacher."""
    from distill.teachers.cache import CacheMiss

    if cfg.model.startswith("replay:") or not Path(worker_kwargs["cache_path"]).exists():
        return problems
    worker = TeacherWorker(**worker_kwargs, cache_only=True)
    rest: list[dict] = []
    for start in range(0, len(problems), cfg.batch_size):
        batch = problems[start : start + cfg.batch_size]
        try:
            on_batch(worker(batch))
        except CacheMiss:
            rest += batch
    return rest
