"""Recipe: the typed, validated description of one distillation run.

Loaded from YAML with ``key=value`` overrides (``student.epochs=2``). Unknown keys are rejected with
the closest valid key suggested; every field documents itself.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

from distill.core.errors import DistillError
from distill.core.readers import read_input


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AnswerConfig(Strict):
    """How answers of each ``task.answer_type`` are read and compared (every key has a working default)."""

    tolerance: float = Field(
        0.0, ge=0, description="number: a prediction within this relative tolerance of the gold is correct (0 = equal)"
    )
    normalize: list[Literal["case", "punctuation", "articles", "whitespace"]] = Field(
        default_factory=lambda: ["case", "punctuation", "articles", "whitespace"],
        description="text: what is normalised away before comparing (lowercase, punctuation, a/an/the, spacing)",
    )
    match: Literal["exact", "contains", "f1"] = Field(
        "exact", description="text: equal after normalisation, gold contained in the prediction, or token F1"
    )
    f1_threshold: float = Field(0.8, gt=0, le=1, description="text with match=f1: the token F1 that counts as correct")
    json_schema: dict[str, Any] | None = Field(
        None, description="json: a JSON Schema the answer must validate against (the gold is compared field by field)"
    )
    pattern: str | None = Field(None, description="regex: the answer is the first group of this pattern's last match")
    checker: str | None = Field(
        None,
        description="custom: a Python entry point 'module:function' called as function(answer, gold) -> bool "
        "(see the README); an exception marks the row wrong with the exception as its reason",
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="code: wall-time limit of one sandboxed test run (s)")
    memory_mb: int = Field(512, ge=64, description="code: address-space limit of the sandboxed run (MiB)")
    max_processes: int = Field(
        16, ge=1, description="code: processes the sandboxed run may have at once, itself included"
    )
    max_output_kb: int = Field(64, ge=1, description="code: stdout + stderr of the run (KiB) past which it is killed")


class TaskConfig(Strict):
    """Where problems come from and how answers are checked."""

    source: Literal["reasoning_gym", "file", "synthetic", "hf"] = Field(
        "reasoning_gym",
        description="reasoning_gym generator; a file (.jsonl/.json/.csv/.parquet rows, zero-shot-CoT .log); hf: "
        "anything datasets reads (a hub id in the local cache, a save_to_disk folder, data files or a glob); or "
        "synthetic: the teacher writes train_size new problems from the file's seed rows (the last eval_size "
        "rows are the evaluation split), solved with self-consistency",
    )
    name: str = Field(
        "chain_sum",
        description="reasoning_gym dataset name; the file path (source=file); the dataset id, folder or "
        "data files (source=hf)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="generator config (reasoning_gym kwargs)")
    config: str | None = Field(None, description="hf: the dataset's configuration (subset) name")
    revision: str | None = Field(None, description="hf: the dataset revision (a branch, tag or commit)")
    train_split: str | None = Field(
        None, description="hf: the split problems are drawn from (default: train, else the only split)"
    )
    eval_split: str | None = Field(
        None,
        description="hf: the held-out split evaluated on and never trained on (default: test, else validation; "
        "without one, eval_size rows are held out of the train split as task.split says)",
    )
    columns: dict[Literal["question", "answer", "messages"], str] | None = Field(
        None,
        description="which field of a row is the question / answer / messages: a column name, or a sandboxed Jinja "
        "template over the row ('{{ Body }} {{ Question }}'); default question/answer (or problem/solution, "
        "messages)",
    )
    keep_columns: list[str] = Field(
        default_factory=list, description="columns of the source rows carried into the generated rows (as extra)"
    )
    answer_type: Literal["number", "yes_no", "choice", "text", "json", "regex", "custom", "code", "open"] = Field(
        "number",
        description="how answers are extracted and compared: number, yes/no, choice letter A-J, short text, JSON, "
        "a regex group, a custom checker, code (a Python solution the gold's tests run against in a sandbox; "
        "task.answer holds each one's settings), or open: the whole response is the answer, never checked "
        "against the gold (summaries, instructions: keep them with teacher.keep=judged)",
    )
    answer: AnswerConfig = Field(default_factory=AnswerConfig, description="settings of the answer types")
    train_size: int = Field(128, ge=1, description="problems the teacher answers to build the training set")
    eval_size: int = Field(40, ge=1, description="held-out problems every model is evaluated on")
    seed: int = Field(0, description="generator seed; train and eval use disjoint seeds")
    split: Literal["order", "shuffle"] = Field(
        "order",
        description="file tasks: hold out the last eval_size rows (order, as published splits do) or a seeded "
        "random eval_size of them (shuffle: for files sorted by type, whose tail is one kind of problem)",
    )
    dedup_threshold: float = Field(
        0.7, gt=0, le=1, description="synthetic: word 3-gram Jaccard at which a new problem counts as a near-duplicate"
    )
    seed_shots: int = Field(3, ge=1, le=16, description="synthetic: seed problems shown per request")
    synthesis: Literal["problems", "instructions", "code"] = Field(
        "problems",
        description="synthetic: what the teacher writes — problems (labelled by the self-consistency vote), "
        "instructions (self-instruct: an instruction and its input from instruction/input/output seed rows, "
        "answered free-form: answer_type=open) or code (a problem with its assert tests, kept only when the "
        "teacher's solution passes them: answer_type=code)",
    )
    dedup_lsh_rows: int = Field(
        10000,
        ge=0,
        description="synthetic: past this many texts (seeds, eval and candidates) near-duplicates are found by "
        "MinHash LSH, each candidate still checked by Jaccard at dedup_threshold (below it: exact Jaccard)",
    )

    @model_validator(mode="after")
    def _answer_settings(self):
        a = self.answer
        if self.answer_type == "regex" and not a.pattern:
            raise ValueError(
                "task.answer_type=regex needs task.answer.pattern (a regex whose first group is the answer)"
            )
        if self.answer_type == "custom" and not a.checker:
            raise ValueError("task.answer_type=custom needs task.answer.checker ('module:function')")
        if a.pattern is not None:
            try:
                if re.compile(a.pattern).groups < 1:
                    raise ValueError(f"task.answer.pattern {a.pattern!r} has no group: wrap the answer in ( )")
            except re.error as e:
                raise ValueError(f"task.answer.pattern {a.pattern!r} is not a valid regex ({e})") from None
        if a.json_schema is not None:
            from jsonschema import SchemaError, validators

            try:
                validators.validator_for(a.json_schema).check_schema(a.json_schema)
            except SchemaError as e:
                where = "/".join(str(k) for k in e.absolute_path) or "its top level"
                raise ValueError(
                    f"task.answer.json_schema is not a valid JSON Schema at {where}: {e.message}"
                ) from None
        if a.checker is not None and not re.fullmatch(r"[\w.]+:[\w.]+", a.checker):
            raise ValueError(f"task.answer.checker {a.checker!r} is not 'module:function' (e.g. mypkg.checks:grade)")
        return self


class Demo(Strict):
    """A worked example shown to the teacher (few-shot CoT)."""

    question: str
    rationale: str
    answer: str


class BatchSettings(Strict):
    """teacher.api=batch: the chat requests go through the endpoint's Batch API (``/v1/files`` +
    ``/v1/batches``), billed at half price by providers and answered within the completion window."""

    poll_seconds: float = Field(30.0, gt=0, le=3600, description="seconds between two status polls of a batch")
    completion_window: str = Field(
        "24h", pattern=r"^[1-9][0-9]*h$", description="how long the endpoint has to finish a batch (OpenAI: 24h)"
    )
    max_requests: int = Field(
        50000, ge=1, le=50000, description="requests per batch file (OpenAI's cap); more go in several batches"
    )
    rounds: int = Field(
        3,
        ge=1,
        le=20,
        description="batches a request may go through: one missing from an expired batch's results or failing "
        "retryably goes in the next; after the last the row fails with the reason (a resumed job retries it)",
    )


DEFAULT_RUBRIC = (
    "Judge whether the answer is correct, complete and faithful to the question, and whether its reasoning "
    "supports it. Penalise errors, unsupported claims and missing parts; do not reward length or style."
)


class JudgeSettings(Strict):
    """teacher.judge: a model (any teacher model string) scores each answered train row against a rubric;
    its score and reasoning are stored, and ``teacher.keep: judged`` keeps rows at or above the threshold.
    The judge runs with its teacher section's settings (dtype, batch size, retries, limits) and its own
    model, endpoint and prices; its calls share the completion cache and the budget."""

    model: str = Field(
        "embedded:qwen2.5-coder-0.5b-instruct",
        description="the judge's model source (hf:/gguf:/embedded:, or openai:<served name> with base_url)",
    )
    base_url: str | None = Field(None, description="openai: the judge's endpoint (default: the teacher's)")
    api: Literal["chat", "completions"] = Field("chat", description="openai: /chat/completions or /completions")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the judge endpoint's API key"
    )
    rubric: str = Field(DEFAULT_RUBRIC, min_length=1, description="what the judge checks, shown in every prompt")
    scale: Literal["1-7", "pass_fail"] = Field(
        "1-7", description="a score from 1 (worst) to 7 (best), or PASS / FAIL (stored as 1 / 0)"
    )
    threshold: float | None = Field(
        None, description="keep: judged keeps rows scored at least this (default 6 on 1-7, pass on pass_fail)"
    )
    reference: Literal["auto", "always", "never"] = Field(
        "auto",
        description="show the task's gold answer to the judge: auto (when the row has one), always (a row "
        "without one is not judged, with the reason), never",
    )
    debias: Literal["both_orders", "none"] = Field(
        "both_orders",
        description="teachers_pick=judged compares candidates pairwise: both_orders asks A-vs-B and B-vs-A and "
        "counts a win only when both agree (position bias cancels), none asks one order",
    )
    max_new_tokens: int = Field(128, ge=1, le=4096, description="the judge's reasoning and score token cap")
    price_per_1k_input: float = Field(0.0, ge=0, description="the judge's cost per 1k prompt tokens (reported apart)")
    price_per_1k_output: float = Field(0.0, ge=0, description="the judge's cost per 1k generated tokens")

    @model_validator(mode="after")
    def _threshold_on_scale(self):
        lo, hi = (1, 7) if self.scale == "1-7" else (0, 1)
        if self.threshold is not None and not lo <= self.threshold <= hi:
            raise ValueError(f"teacher.judge.threshold={self.threshold:g} is off the {self.scale} scale ({lo}..{hi})")
        return self

    @property
    def pass_score(self) -> float:
        """The score ``keep: judged`` keeps from: ``threshold``, else 6 on 1-7 and 1 (pass) on pass_fail."""
        return self.threshold if self.threshold is not None else 6.0 if self.scale == "1-7" else 1.0


class TeacherConfig(Strict):
    """The large model that writes chain-of-thought rationales."""

    model: str = Field(
        "embedded:qwen2.5-coder-0.5b-instruct",
        description="model source (hf:/gguf:/embedded:), or replay:<file> to use recorded outputs (no model call)",
    )
    method: Literal["zero_shot_cot", "few_shot_cot", "self_consistency", "least_to_most", "self_ask"] = Field(
        "zero_shot_cot", description="prompting method (self_consistency also uses demos when given)"
    )
    max_subquestions: int = Field(4, ge=1, le=16, description="least_to_most: sub-questions kept per problem")
    demos: list[Demo] = Field(default_factory=list, description="worked examples for few_shot_cot")
    samples: int = Field(5, ge=1, le=64, description="reasoning paths per problem for self_consistency")
    temperature: float = Field(0.7, gt=0, le=2, description="sampling temperature for self_consistency")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass for self_consistency")
    system_prompt: str | None = Field(None, description="optional system message for chat models")
    prompt_template: str = Field(
        "{{ question }}", description="Jinja template of the user message (sandboxed; variables: question)"
    )
    trigger: str = Field("Let's think step by step.", description="zero-shot CoT reasoning trigger")
    answer_trigger: str = Field(
        "Therefore, the answer (arabic numerals) is", description="stage-2 answer extraction prompt (Kojima et al.)"
    )
    answer_extraction: Literal["always", "fallback"] = Field(
        "fallback", description="run the stage-2 answer prompt always, or only when stage 1 states no final answer"
    )
    max_new_tokens: int = Field(256, ge=1, le=8192, description="rationale token cap")
    topk_logprobs: int = Field(
        0, ge=0, le=100, description="store the top-k log-probabilities of every rationale token (logit KD); 0 = off"
    )
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="weights dtype for generation on CPU")
    batch_size: int = Field(16, ge=1, description="prompts per generate call (does not change results or cache keys)")
    workers: int = Field(2, ge=1, description="Ray actors, one CPU each (does not change results)")
    executor: Literal["ray", "local"] = Field("ray", description="ray actor pool, or in-process for debugging")
    keep: Literal["correct", "all", "judged"] = Field(
        "correct",
        description="keep only rationales whose answer is correct (the vote when there is no gold), all, or "
        "judged: those teacher.judge scores at least its threshold",
    )
    judge: JudgeSettings | None = Field(
        None, description="a judge model scoring each answered train row (null = none); see teacher.keep=judged"
    )
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="keep rows whose self-consistency agreement is at least this (0 = any)"
    )
    min_rationale_words: int = Field(0, ge=0, description="drop rationales shorter than this many words")
    max_rationale_words: int = Field(0, ge=0, description="drop rationales longer than this many words (0 = no cap)")
    rationales_per_question: int = Field(
        1,
        ge=1,
        le=64,
        description="keep up to K distinct rationales reaching the kept answer (diverse reasoning; "
        "needs self_consistency samples >= K)",
    )
    vote: Literal["majority", "complexity"] = Field(
        "majority",
        description="self_consistency: majority vote over every path, or complexity (Fu et al. 2023): the vote "
        "among the complex_k paths with the most reasoning steps (lines)",
    )
    complex_k: int = Field(
        0, ge=0, le=64, description="vote=complexity: how many of the most complex paths vote (0 = the top half)"
    )
    demo_selection: Literal["all", "complex"] = Field(
        "all",
        description="few-shot prompts: every teacher.demos entry, or the num_demos with the most reasoning steps "
        "from that pool (complex demonstrations, Fu et al. 2023)",
    )
    num_demos: int = Field(4, ge=1, le=32, description="demo_selection=complex: demonstrations picked from the pool")
    rationale_choice: Literal["first", "shortest", "mixed"] = Field(
        "first",
        description="which of a question's correct sampled paths train the student: first (sample order), "
        "shortest (small students learn better from short chains), or mixed (shortest, longest, next shortest, "
        "...: with rationales_per_question >= 2 the student sees short and long chains)",
    )
    shard_rows: int = Field(64, ge=1, description="rows per committed Parquet shard (a kill loses at most this many)")
    price_per_1k_input: float = Field(0.0, ge=0, description="cost estimate per 1k prompt tokens")
    price_per_1k_output: float = Field(0.0, ge=0, description="cost estimate per 1k generated tokens")
    max_tokens: int = Field(0, ge=0, description="stop cleanly (resumable) after this many tokens in+out; 0 = no cap")
    max_cost: float = Field(0.0, ge=0, description="stop cleanly (resumable) at this estimated cost; 0 = no cap")
    trust_remote_code: bool = Field(False, description="allow a model folder's own Python code (auto_map) to run")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="local generation engine: transformers (CPU/CUDA) or vllm (extra `vllm`, CUDA)"
    )
    long_prompts: Literal["reject", "truncate"] = Field(
        "reject",
        description="a prompt longer than the teacher's context: reject the row (recorded with the reason) or "
        "truncate the middle of the prompt with a warning",
    )
    # OpenAI-compatible HTTP teachers (model: openai:<served model name>)
    base_url: str | None = Field(None, description="openai: endpoint, e.g. http://127.0.0.1:8000/v1")
    api: Literal["chat", "completions", "batch"] = Field(
        "chat",
        description="openai: /chat/completions, /completions, or batch: the chat requests through the endpoint's "
        "Batch API (teacher.batch)",
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, description="openai with api=batch: the Batch API")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: environment variable holding the API key (keys never go in recipes)"
    )
    concurrency: int = Field(8, ge=1, le=1024, description="openai: requests in flight across all the job's workers")
    requests_per_minute: float = Field(
        0, ge=0, description="openai: request rate cap across all the job's workers (0 = none)"
    )
    tokens_per_minute: float = Field(
        0, ge=0, description="openai: token rate cap across all the job's workers (0 = none)"
    )
    max_retries: int = Field(6, ge=0, le=50, description="openai: retries on 429/5xx/timeouts/dropped connections")
    request_timeout: float = Field(120.0, gt=0, description="openai: seconds before a request is retried")
    retry_base: float = Field(0.5, ge=0, description="openai: first backoff in seconds (doubles, full jitter)")

    @model_validator(mode="before")
    @classmethod
    def _no_keys_in_recipes(cls, data):
        if isinstance(data, dict) and any(k in data for k in ("api_key", "token", "password")):
            raise ValueError(
                "API keys are never read from recipes (they end up in logs and reports): export the key in an "
                "environment variable and name it in teacher.api_key_env"
            )
        return data

    @field_validator("prompt_template")
    @classmethod
    def _template_renders(cls, v: str) -> str:
        from distill.teachers.prompts import render

        render(v, question="1 + 1 =")  # a broken or unsafe template fails here, before any job starts
        return v

    @model_validator(mode="after")
    def _endpoint_for_openai(self):
        if self.model.startswith("openai:") and not self.base_url:
            raise ValueError("an openai: teacher needs teacher.base_url (e.g. http://127.0.0.1:8000/v1)")
        return self

    @model_validator(mode="after")
    def _batch_for_openai(self):
        if self.api == "batch" and not self.model.startswith("openai:"):
            raise ValueError(
                "teacher.api=batch sends the requests through an OpenAI-compatible endpoint's Batch API: "
                "set teacher.model=openai:<served model name> and teacher.base_url"
            )
        return self

    @model_validator(mode="after")
    def _logprobs_for_cot(self):
        if self.topk_logprobs and self.method in ("least_to_most", "self_ask"):
            raise ValueError("teacher.topk_logprobs is recorded by zero_shot_cot, few_shot_cot and self_consistency")
        return self

    @model_validator(mode="after")
    def _judge_for_judged(self):
        if self.keep == "judged" and self.judge is None:
            raise ValueError(
                "teacher.keep=judged needs teacher.judge (e.g. teacher.judge.model=embedded:qwen2.5-coder-0.5b-instruct)"
            )
        j = self.judge
        if j is not None and j.model.startswith("openai:") and not (j.base_url or self.base_url):
            raise ValueError("an openai: judge needs teacher.judge.base_url (or the teacher's base_url)")
        return self

    def judge_section(self) -> TeacherConfig:
        """The teacher section the judge's backend is built from: this one's run settings (dtype, batch
        size, workers, retries, limits) with the judge's model, endpoint, API and prices; a plain
        zero-shot section (no judge of its own)."""
        j = self.judge
        return self.model_copy(
            update={
                "model": j.model,
                "base_url": j.base_url or self.base_url,
                "api": j.api,
                "api_key_env": j.api_key_env,
                "price_per_1k_input": j.price_per_1k_input,
                "price_per_1k_output": j.price_per_1k_output,
                "max_new_tokens": j.max_new_tokens,
                "method": "zero_shot_cot",
                "keep": "all",
                "judge": None,
                "topk_logprobs": 0,
            }
        )

    @model_validator(mode="after")
    def _demos_for_few_shot(self):
        if self.method == "few_shot_cot" and not self.demos:
            raise ValueError("few_shot_cot needs teacher.demos (a list of question, rationale, answer)")
        return self


class TeacherEntry(TeacherConfig):
    """One teacher of several (recipe key ``teachers``): a whole teacher section, plus the name its rows
    carry and when it is asked."""

    name: str | None = Field(
        None, description="what its rows' teacher column and the report call it (default: its model string)"
    )
    when: Literal["always", "unsolved"] = Field(
        "always",
        description="always: it answers every problem; unsolved: only the problems no earlier teacher in the list "
        "solved (a row their filters keep) — a cheap teacher first, an expensive one for the rest",
    )

    def section(self) -> TeacherConfig:
        """The plain teacher section of this entry (without name and when)."""
        return TeacherConfig.model_validate(self.model_dump(exclude={"name", "when"}))


class LoraSettings(Strict):
    """LoRA adapters (PEFT) trained instead of the full weights; merged into them before saving."""

    r: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="adapter scale numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear (not the LM head)"
    )


class KDSettings(Strict):
    """Logit distillation from the teacher's stored top-k log-probabilities (student.format=kd)."""

    loss: Literal["forward_kl", "jsd", "uld"] = Field(
        "forward_kl",
        description="KL(teacher||student), generalized JSD (both need a shared tokenizer), or uld (Universal Logit "
        "Distillation: sorted top-k probabilities on the student's own tokens, any tokenizer)",
    )
    temperature: float = Field(1.0, gt=0, le=10, description="softmax temperature of both distributions")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL")
    weight: float = Field(0.5, ge=0, le=1, description="loss = (1 - weight) * cross-entropy + weight * KD")
    teacher: str | None = Field(
        None,
        description="score the kept rationales with this model source (its top-k log-probabilities at every "
        "rationale token, cached like teacher calls) instead of reading them from the generate stage: for a "
        "teacher that returns text only (replay, most APIs); null = the generating teacher's teacher.topk_logprobs",
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="weights dtype of a local scoring kd.teacher (default: teacher.dtype)"
    )


def _number_or_auto(v, ok, message: str):
    """``auto`` as is, else ``v`` as a float that satisfies ``ok``; ``message`` names the key's rule."""
    if v == "auto":
        return v
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not ok(v):
        raise ValueError(message)
    return v


class OnPolicySettings(Strict):
    """On-policy distillation (generalized JSD / GKD, Agarwal et al. 2024): on a share ``lmbda`` of the
    optimizer steps the student samples completions for that batch's training questions, the teacher
    scores every sampled token (top-k log-probabilities, cached and budgeted like generation calls)
    and the student minimises the divergence on its own samples; the other steps train on the
    teacher-written rows as ``student.format`` says."""

    lmbda: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of optimizer steps on the student's own samples (λ; the rest teacher-written)",
    )
    beta: float = Field(
        0.5, ge=0, le=1, description="generalized JSD: 0 = forward KL(teacher||student), 1 = reverse KL"
    )
    loss: Literal["auto", "jsd", "uld"] = Field(
        "auto",
        description="jsd needs a shared tokenizer; uld (sorted probabilities) any pair; auto = jsd when the "
        "tokenizers agree, else uld",
    )
    temperature: float = Field(1.0, gt=0, le=2, description="the student's sampling temperature")
    max_new_tokens: int = Field(0, ge=0, description="tokens per sample (0 = student.eval_max_new_tokens)")
    topk: int = Field(20, ge=1, le=20, description="teacher log-probabilities kept per token (endpoints allow 20)")
    teacher: str | None = Field(
        None,
        description="the scoring teacher's model source (default: teacher.model; an openai: model uses the "
        "teacher section's endpoint settings)",
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="weights dtype of a local scoring teacher (default: teacher.dtype)"
    )
    max_cost: float = Field(
        0.0, ge=0, description="stop (resumable) when the scoring calls reach this estimated cost (teacher prices)"
    )
    max_tokens: int = Field(0, ge=0, description="stop (resumable) after the teacher has read this many tokens")


class ValidationSettings(Strict):
    """Training sized by validation: a dev split carved from the training rows (never the eval split),
    dev loss and dev task accuracy every few steps, early stopping, the best checkpoint kept."""

    dev_size: int = Field(
        24, ge=1, description="training questions held out as the dev split (all rows of a question go together)"
    )
    every: int = Field(
        0, ge=0, description="optimizer steps between dev evaluations (0 = twice per epoch, at least every 50 steps)"
    )
    metric: Literal["accuracy", "loss"] = Field(
        "accuracy", description="what picks the best checkpoint and stops training: dev task accuracy or dev loss"
    )
    patience: int = Field(3, ge=1, description="dev evaluations without improvement before training stops")
    max_epochs: float = Field(8.0, gt=0, description="epochs: auto trains at most this many passes")
    max_minutes: float = Field(
        0.0, ge=0, description="stop (keeping the best checkpoint) after this many minutes; 0 = no cap"
    )
    max_tokens: int = Field(0, ge=0, description="stop after this many training tokens; 0 = no cap")


class LRSweepSettings(Strict):
    """lr: auto — each candidate trains a fresh copy of the student for a few steps; the one with the
    lowest dev loss is the peak learning rate of the real run."""

    candidates: list[float] = Field(
        default_factory=lambda: [5e-5, 1e-4, 2e-4, 4e-4], min_length=2, description="peak learning rates tried"
    )
    steps: int = Field(0, ge=0, description="optimizer steps per candidate (0 = one epoch, at most 40)")

    @field_validator("candidates")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        if any(not 0 < x < 1 for x in v):
            raise ValueError("every learning-rate candidate must be between 0 and 1")
        return sorted(set(v))


class QATSettings(Strict):
    """Quantization-aware fine-tuning: a short last phase of training in which every projection and the
    tied embedding compute with their weights on the int4 export's grid (export.block_size,
    export.group_block_sizes, export.embed_block_size; round to nearest) and int8 activations, as
    ``MatMulNBits`` runs them; gradients pass the rounding straight through. The exported int4 file holds
    the weights that phase's loss was computed with."""

    steps: int = Field(24, ge=1, description="optimizer steps of the phase (after training, from its kept weights)")
    lr: float | None = Field(
        None, gt=0, lt=1, description="peak learning rate of the phase, cosine to zero (null = student.lr / 4)"
    )
    distill: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the forward KL to the full-precision student's own top-k in the phase's loss "
        "(self-distillation; 0 = cross-entropy on the targets only)",
    )
    activations: bool = Field(
        True, description="simulate the int8 activations of the int4 kernel (accuracy level 4) too"
    )


class FromTeacherSettings(Strict):
    """The student as a smaller copy of teacher.model (its weights and tokenizer, so student.format=kd
    applies directly): a subset of its decoder layers (DistilBERT init), optionally fewer attention heads
    and MLP neurons per layer, keeping those with the largest weight L2 norms (see students/shrink.py)."""

    layers: list[int] | None = Field(
        None, description="teacher decoder layers kept, in order (e.g. every other one: [0, 2, 4]); null = all"
    )
    num_heads: int | None = Field(
        None,
        ge=1,
        description="query heads kept per layer (GQA: whole KV groups, so a multiple of the teacher's query heads "
        "per KV head); null = all",
    )
    intermediate_size: int | None = Field(None, ge=1, description="MLP neurons kept per layer; null = all")

    @field_validator("layers")
    @classmethod
    def _layers_ordered(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or sorted(set(v)) != v):
            raise ValueError("layers must be a non-empty increasing list of layer indices, e.g. [0, 2, 4]")
        return v


class StudentConfig(Strict):
    """The small model being trained."""

    model: str = Field(
        "embedded:smollm2-135m-instruct",
        description="model source (hf:/gguf:/embedded:), or config:<config.json path or inline JSON> for a "
        "randomly initialised model (needs student.tokenizer unless the path is a folder with one)",
    )
    tokenizer: str | None = Field(None, description="tokenizer source for config: students (default: the model's)")
    layers: list[int] | None = Field(
        None, description="keep only these decoder layers of the model (DistilBERT-style init, e.g. [0, 2, 4])"
    )
    from_teacher: FromTeacherSettings | None = Field(
        None,
        description="build the student as a smaller copy of teacher.model (its weights and tokenizer; student.model "
        "and student.tokenizer are then not used): kept layers, heads and MLP neurons (null = off)",
    )
    lora: LoraSettings | None = Field(None, description="train LoRA adapters (merged before saving) instead")
    format: Literal["rationale", "label", "multitask", "kd"] = Field(
        "rationale",
        description="target: rationale + answer, answer only, [label]/[explain] multitask, or kd (the teacher's "
        "own tokens with its top-k log-probabilities; needs teacher.topk_logprobs and a shared tokenizer, except "
        "kd.loss=uld, which trains on the student's own tokens and works across tokenizers)",
    )
    kd: KDSettings = Field(default_factory=KDSettings, description="logit distillation settings (format=kd)")
    packing: bool = Field(
        False, description="pack several examples per row (no attention across examples) instead of padding"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="multitask: weight of the label loss (rationale gets 1 - alpha)")
    epochs: float | Literal["auto"] = Field(
        "auto",
        description="passes over the training set, or auto (the default): until the dev accuracy stops improving "
        "(student.validation, its defaults unless set; at most validation.max_epochs), the best dev checkpoint kept",
    )
    validation: ValidationSettings | None = Field(
        None,
        description="dev split, periodic dev loss/accuracy, early stopping and best checkpoint (null = off; "
        "on, at these defaults, whenever epochs or lr is auto)",
    )
    on_policy: OnPolicySettings | None = Field(
        None, description="on-policy distillation: the student's own samples scored by the teacher (null = off)"
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="stream train and dev metrics to these trackers (extra `trackers`): tensorboard event files "
        "in <run>/tensorboard, an MLflow run in $MLFLOW_TRACKING_URI or <run>/mlruns",
    )
    lr: float | Literal["auto"] = Field(
        1e-4,
        description="peak learning rate (AdamW), or auto: the candidate of student.lr_sweep with the lowest dev loss "
        "after a short run each (uses student.validation's dev split)",
    )
    lr_sweep: LRSweepSettings = Field(
        default_factory=lambda: LRSweepSettings(), description="the candidates and budget of lr: auto"
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step (after accumulation)")
    micro_batch_size: int = Field(8, ge=1, description="examples per forward pass")
    max_length: int = Field(384, ge=8, description="prompt + completion tokens; longer examples are truncated")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast on CUDA and on CPUs with native bf16; fp32 elsewhere"
    )
    seed: int = Field(0)
    save_every: int = Field(25, ge=0, description="optimizer steps between resumable checkpoints (0 = none)")
    workers: int = Field(
        1,
        ge=1,
        description="data-parallel training processes: above 1, Ray Train workers (gloo on CPU, NCCL on CUDA), "
        "each on a shard of every batch, the same model as one process; resumed from the last checkpoint when a "
        "worker or the run dies",
    )
    storage_path: str | None = Field(
        None,
        description="student.workers > 1: where Ray Train keeps the checkpoints, a folder every node of the cluster "
        "reaches (default: the run's train work folder)",
    )
    eval_max_new_tokens: int = Field(256, ge=1, description="generation cap when evaluating students")
    eval_batch_size: int = Field(8, ge=1)
    qat: QATSettings | None = Field(
        None,
        description="quantization-aware fine-tuning for the int4 export: a last phase of training through the "
        "int4 grid (null = off; needs int4 in export.variants and export.int4_algorithm=rtn)",
    )
    calculator: bool = Field(
        False,
        description="decode the student with a calculator: when its output ends in an arithmetic expression "
        "and '=' (\"8 + 2 =\"), the value is computed and written for it (GSM8K's calculator, Cobbe et al. "
        "2021; no annotation in the data needed). Applies to dev and held-out evaluation, the export gate and "
        "the bundle's runtime (distill infer, distill_runtime.py)",
    )

    @field_validator("epochs", mode="before")
    @classmethod
    def _positive_epochs(cls, v):
        return _number_or_auto(v, lambda x: x > 0, "epochs must be a positive number or auto")

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_range(cls, v):
        return _number_or_auto(v, lambda x: 0 < x < 1, "lr must be a number between 0 and 1, or auto")

    @model_validator(mode="after")
    def _auto_needs_validation(self):
        if (self.epochs == "auto" or self.lr == "auto") and self.validation is None:
            self.validation = ValidationSettings()  # auto is sized by the dev split: its defaults
        return self

    @model_validator(mode="after")
    def _on_policy_in_one_process(self):
        if self.workers > 1 and self.on_policy is not None:
            raise ValueError("student.on_policy samples and scores in one process: set student.workers=1")
        return self

    @model_validator(mode="after")
    def _micro_divides(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size")
        return self

    @field_validator("layers")
    @classmethod
    def _layers_ordered(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or sorted(set(v)) != v):
            raise ValueError("layers must be a non-empty increasing list of layer indices, e.g. [0, 2, 4]")
        return v

    @model_validator(mode="after")
    def _one_way_to_cut_the_teacher(self):
        if self.from_teacher is not None and self.layers is not None:
            raise ValueError("with student.from_teacher, choose the kept layers in student.from_teacher.layers")
        if self.from_teacher is not None and self.tokenizer is not None:
            raise ValueError("a student.from_teacher student uses the teacher's tokenizer: set student.tokenizer=null")
        return self


class ExportConfig(Strict):
    """ONNX export, quantized variants, the quality gate that picks one, and the bundle."""

    enabled: bool = True
    variants: list[Literal["int8", "int8_static", "int8_dynamic", "int4", "int4_mixed", "fp16"]] = Field(
        default_factory=lambda: ["int8", "int4"],
        description="variants tried besides fp32: int8 (blockwise MatMulNBits, int8 compute), int8_static "
        "(QDQ, calibrated on the distilled dataset), int8_dynamic (per-channel quantize_dynamic), int4 "
        "(MatMulNBits), int4_mixed (int4 with the most sensitive projection groups in int8), fp16",
    )
    attention: Literal["auto", "fused", "generic"] = Field(
        "auto",
        description="fused: one onnxruntime GroupQueryAttention (rotary inside) and SimplifiedLayerNormalization "
        "node per layer/norm, as onnxruntime-genai's builder emits (llama/qwen2/qwen3/mistral; batches right-padded); "
        "generic: attention as the exporter spells it out; auto: fused where the architecture allows",
    )
    gate: bool = Field(
        True,
        description="score every variant on the gate split and keep the smallest within tolerance of fp32 by "
        "export.gate_rule (each variant's accuracy gap with its paired 95% interval in the table)",
    )
    tolerance: float = Field(0.01, ge=0, le=1, description="accuracy a variant may lose vs fp32 (0.01 = 1 point)")
    gate_size: int | Literal["auto"] = Field(
        "auto",
        description="problems in the gate split, drawn from the task disjoint from training and evaluation; "
        "auto = at least 200, and enough to show an unchanged variant within the tolerance (381 for 1 point), "
        "or what the task has left; 0 = the eval split",
    )
    gate_rule: Literal["accuracy", "interval"] = Field(
        "interval",
        description="keep a variant when its accuracy is within tolerance of fp32's (accuracy), or when the "
        "paired 95% interval of the gap shows it (interval: non-inferiority, early rejection of clear losses)",
    )

    @field_validator("gate_size")
    @classmethod
    def _gate_size(cls, v):
        if v != "auto" and (not isinstance(v, int) or v < 0):
            raise ValueError("export.gate_size must be a number of problems (0 = the eval split) or auto")
        return v

    gate_workers: int = Field(
        0, ge=0, description="variants scored at once, one process and thread each (0 = one per core)"
    )
    smooth_alpha: float = Field(
        0.0, ge=0, le=1, description="SmoothQuant migration strength folded into weights before export (0 = off)"
    )
    block_size: int = Field(32, ge=16, description="quantization block size for int8/int4 (power of two)")
    int4_algorithm: Literal["rtn", "hqq", "kquant", "gptq"] = Field(
        "rtn",
        description="int4 weights: rtn (round to nearest), hqq (half-quadratic: each block's scale and zero point "
        "fitted to the weights), kquant (llama.cpp's k-quant scale search, with zero points), or gptq (column by "
        "column, the rounding error compensated through the layer inputs' Hessian on calibration_examples rows of "
        "the distilled data)",
    )
    int4_symmetric: bool = Field(
        True, description="int4 rtn: a symmetric grid (no zero points; hqq, kquant and gptq always fit them)"
    )
    int4_mixed_groups: Literal["auto"] | list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        "auto",
        description="int4_mixed: projection groups kept in int8; auto: the most sensitive ones by a sweep on the "
        "distilled data (each group alone in int4, top-1 agreement with fp32) while the file stays within "
        "int4_mixed_max_size",
    )
    int4_mixed_max_size: float = Field(
        0.2, gt=0, le=1, description="int4_mixed_groups=auto: the largest int4_mixed file, as a share of fp32's size"
    )
    keep_fp32_nodes: list[str] = Field(
        default_factory=list,
        description="MatMul nodes to keep in fp32, named by module (e.g. model.layers.0.mlp.down_proj/MatMul)",
    )
    group_block_sizes: dict[Literal["q", "k", "v", "o", "gate", "up", "down"], int] = Field(
        default_factory=lambda: {"gate": 64, "up": 64, "down": 64},
        description="int8/int4 block size per projection group across all layers; others use block_size "
        "(default: MLP at 64 — SmolLM2-135M int8 size ratio 0.269 at 97.8% top-1, see BENCHMARKS.md)",
    )
    embed_block_size: int | None = Field(
        64, ge=16, description="block size of the shared int8 tied embedding / LM head (null = block_size)"
    )
    static_keep_groups: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        default_factory=lambda: ["down"],
        description="projection groups int8_static keeps in fp32 (the most sensitive ones per export.sensitivity)",
    )
    calibration_examples: int = Field(
        32, ge=1, description="training rows (prompt + target) used to calibrate int8_static and the sensitivity sweep"
    )
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = Field(
        "MinMax",
        description="activation range calibration of int8_static (Percentile/Entropy keep histograms of every "
        "activation: far slower and memory-hungry on real models)",
    )
    sensitivity: bool = Field(
        False,
        description="run the per-group sensitivity sweep of int8_static (one projection group quantized at a time) "
        "and put the table in the report",
    )
    ort_format: bool = Field(
        False, description="also write the chosen model in ORT format (model.ort) for mobile onnxruntime builds"
    )
    opset: int = Field(18, ge=17)

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("block_size must be a power of two (16, 32, 64, 128, ...)")
        return v

    @property
    def weight_only_blocks(self) -> tuple[int, dict[str, int], int]:
        """(block, {group: block}, tied-embedding block) of the int8/int4 presets: what ``student.qat``
        trains for and the export stage checks it against (an unset embedding block is ``block_size``)."""
        return self.block_size, dict(self.group_block_sizes), self.embed_block_size or self.block_size

    @field_validator("embed_block_size")
    @classmethod
    def _pow2_or_none(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError("embed_block_size must be a power of two (16, 32, 64, 128, ...) or null")
        return v

    @field_validator("group_block_sizes")
    @classmethod
    def _pow2_groups(cls, v: dict) -> dict:
        bad = {k: b for k, b in v.items() if b < 16 or b & (b - 1)}
        if bad:
            raise ValueError(f"group_block_sizes values must be powers of two >= 16, got {bad}")
        return v


class EvalConfig(Strict):
    models: list[Literal["teacher", "student_base", "student", "student_onnx"]] = Field(
        default_factory=lambda: ["teacher", "student_base", "student", "student_onnx"],
        description="which models the evaluate stage scores",
    )


class Recipe(Strict):
    """One distillation run: generate → train → export → evaluate → report."""

    name: str = Field("run", description="run name; outputs go to <output_dir>/<name>")
    output_dir: str = Field("runs", description="root folder of run outputs")
    cache: str = Field(".distill/cache.sqlite", description="teacher completion cache (never pay twice)")
    task: TaskConfig = Field(default_factory=TaskConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: list[TeacherEntry] | None = Field(
        None,
        description="several teachers instead of one (each a whole teacher section plus name and when), asked in "
        "order; every question keeps one rationale, chosen by teachers_pick (null = the one teacher section)",
    )
    teachers_pick: Literal["correct", "vote", "judged"] = Field(
        "correct",
        description="with teachers: which teacher's rationale a question keeps: correct (the first teacher in list "
        "order whose row its filters keep), vote (the answer most teachers gave, ties to the earlier teacher; the "
        "first teacher reaching it whose row is kept) or judged (the kept row teachers[0].judge prefers in pairwise "
        "comparisons, both orders unless judge.debias=none; ties to the earlier teacher)",
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("name must be a plain folder name (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _one_teacher_or_several(self):
        """With ``teachers``, ``teacher`` is its first entry's section (what training, evaluation and the
        export read as "the teacher"); set explicitly as well it is refused."""
        if self.teachers is None:
            if "teachers_pick" in self.model_fields_set:
                raise ValueError("teachers_pick chooses among several teachers: set teachers: [...] or drop it")
            return self
        if "teacher" in self.model_fields_set:
            raise ValueError(
                "set teacher or teachers, not both: move the teacher section's keys into the first entry of "
                "teachers (each entry is a whole teacher section)"
            )
        if not self.teachers:
            raise ValueError("teachers is empty: list at least one teacher, or drop teachers and use teacher")
        if self.teachers[0].when == "unsolved":
            raise ValueError(
                "teachers[0].when=unsolved: the first teacher answers every problem (none is unsolved before it); "
                "set teachers[0].when=always, or put a when: always teacher first"
            )
        seen: dict[str, int] = {}
        for i, t in enumerate(self.teachers):
            name = t.name or t.model
            if name in seen:
                raise ValueError(
                    f"teachers[{seen[name]}] and teachers[{i}] are both called {name!r}: give teachers[{i}].name "
                    "a name of its own (rows record which teacher wrote them)"
                )
            seen[name] = i
            if t.name is None:
                t.name = name
        if self.teachers_pick == "judged" and self.teachers[0].judge is None:
            raise ValueError(
                "teachers_pick=judged compares the teachers' rows with teachers[0].judge: set teachers.0.judge.model"
            )
        if self.student.format == "kd" and len(self.teachers) > 1:
            raise ValueError(
                "student.format=kd learns one teacher's log-probabilities: use one teacher, or another student.format"
            )
        self.__dict__["teacher"] = self.teachers[0].section()  # not an assignment: it would validate again
        return self

    @property
    def teacher_entries(self) -> list[TeacherEntry]:
        """The teachers generation asks, in order: ``teachers``, or the one ``teacher`` section as a list of
        one (without a name: its rows keep the model's id as their teacher, as they always did)."""
        return list(self.teachers) if self.teachers else [TeacherEntry.model_validate(self.teacher.model_dump())]

    @model_validator(mode="after")
    def _kd_needs_logprobs(self):
        if (
            self.student.format == "kd"
            and not self.teacher.topk_logprobs
            and not self.teacher.model.startswith("replay:")
        ):
            raise ValueError("student.format=kd needs the teacher's log-probabilities: set teacher.topk_logprobs=20")
        return self

    @model_validator(mode="after")
    def _qat_needs_int4(self):
        if self.student.qat is None:
            return self
        if not {"int4", "int4_mixed"} & set(self.export.variants) or not self.export.enabled:
            raise ValueError(
                "student.qat trains for the int4 export: add int4 to export.variants or set student.qat=null"
            )
        if self.export.smooth_alpha > 0:
            raise ValueError(
                "student.qat trains the student's own weights for the int4 grid, export.smooth_alpha rescales them "
                "before rounding: set export.smooth_alpha=0 or student.qat=null"
            )
        if self.export.int4_algorithm != "rtn":
            raise ValueError(
                f"student.qat trains for the round-to-nearest int4 grid, export.int4_algorithm={self.export.int4_algorithm} "
                "fits another: set export.int4_algorithm=rtn or student.qat=null"
            )
        if not self.export.int4_symmetric:
            raise ValueError(
                "student.qat trains for the symmetric int4 grid, export.int4_symmetric=false adds zero points: "
                "set export.int4_symmetric=true or student.qat=null"
            )
        return self

    @model_validator(mode="after")
    def _from_teacher_needs_weights(self):
        if self.student.from_teacher is not None and self.teacher.model.startswith(("replay:", "openai:")):
            raise ValueError(
                f"student.from_teacher copies the teacher's weights, and teacher {self.teacher.model} has none: "
                "use a local model teacher (hf:/gguf:/embedded:) or set student.from_teacher=null"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def dump(self) -> dict:
        """The recipe as JSON-ready data that loads back to this recipe: with several teachers the
        ``teacher`` section (their first) is left out, with one the ``teachers`` keys are."""
        data = self.model_dump(mode="json")
        for key in ("teacher",) if self.teachers is not None else ("teachers", "teachers_pick"):
            data.pop(key)
        return data

    @model_validator(mode="after")
    def _open_answers_are_judged(self):
        if self.task.answer_type == "open":
            for i, t in enumerate(self.teacher_entries):
                if t.keep == "correct":
                    where = f"teachers.{i}.keep" if self.teachers is not None else "teacher.keep"
                    raise ValueError(
                        f"task.answer_type=open has no gold check, so {where}=correct keeps nothing: set {where}=judged "
                        "(with a judge model) or all"
                    )
        return self

    @model_validator(mode="after")
    def _synthetic_needs_votes(self):
        t = self.task
        if t.source != "synthetic":
            if t.synthesis != "problems":
                raise ValueError(f"task.synthesis={t.synthesis} writes new tasks: it needs task.source=synthetic")
            return self
        if t.synthesis == "problems" and self.teacher.method != "self_consistency":
            raise ValueError(
                "task.source=synthetic has no gold answers: set teacher.method=self_consistency (the vote is the label)"
            )
        want = {"instructions": "open", "code": "code"}.get(t.synthesis)
        if want and t.answer_type != want:
            raise ValueError(f"task.synthesis={t.synthesis} needs task.answer_type={want} (it is {t.answer_type})")
        return self


# Settings that do not change what a stage computes, by path: excluded from content hashes. A key of
# the same name elsewhere (``task.params.batch_size``) counts. ``student.batch_size`` has always been
# left out; it stays out so that finished run folders keep their hashes.
NON_SEMANTIC = frozenset(
    {
        "teacher.batch_size",
        "teacher.workers",
        "teacher.executor",
        "teacher.shard_rows",
        "student.on_policy.max_cost",  # budgets: raising one continues the same run
        "student.on_policy.max_tokens",
        "export.gate_workers",
        "teacher.price_per_1k_input",
        "teacher.price_per_1k_output",
        "teacher.max_tokens",
        "teacher.max_cost",
        # how a teacher is run or reached, not what it answers
        "teacher.engine",
        "teacher.base_url",
        "teacher.api_key_env",
        "teacher.concurrency",
        "teacher.requests_per_minute",
        "teacher.tokens_per_minute",
        "teacher.max_retries",
        "teacher.request_timeout",
        "teacher.retry_base",
        "teacher.batch",  # how often a batch is polled, how big it is: not what the teacher answers
        "teacher.judge.base_url",  # where the judge is reached and what it costs, not what it says
        "teacher.judge.api_key_env",
        "teacher.judge.price_per_1k_input",
        "teacher.judge.price_per_1k_output",
        "student.batch_size",
        "student.micro_batch_size",
        "student.eval_batch_size",
        "student.save_every",
        "student.workers",  # one model however many processes train it (tests/integration/test_ray_train.py)
        "student.storage_path",
        "student.report_to",  # where metrics are watched, not what is trained
    }
)


# Options added after the first release, by path: at their default they are left out of content
# hashes, so adding an option does not invalidate stages that finished before it existed.
OPTIONAL_DEFAULTS = {
    "student.tokenizer": None,
    "student.layers": None,
    "student.from_teacher": None,
    "student.lora": None,
    "student.kd": KDSettings().model_dump(mode="json"),
    "student.packing": False,
    "student.validation": None,
    "student.on_policy": None,
    "student.kd.teacher": None,
    "student.kd.dtype": None,
    "student.qat": None,
    "task.split": "order",
    "task.answer": AnswerConfig().model_dump(mode="json"),
    # the sandbox limits of code tasks, out of the hash of any other task that sets task.answer
    "task.answer.timeout_s": 10.0,
    "task.answer.memory_mb": 512,
    "task.answer.max_processes": 16,
    "task.answer.max_output_kb": 64,
    "task.config": None,
    "task.revision": None,
    "task.train_split": None,
    "task.eval_split": None,
    "task.columns": None,
    "task.keep_columns": [],
    "export.gate_size": 0,
    "export.gate_rule": "accuracy",
    "export.int4_algorithm": "rtn",
    "export.int4_symmetric": True,
    "export.int4_mixed_groups": "auto",
    "export.int4_mixed_max_size": 0.2,
    "student.lr_sweep": {"candidates": [5e-5, 1e-4, 2e-4, 4e-4], "steps": 0},
    "teacher.topk_logprobs": 0,
    "teacher.rationale_choice": "first",
    "teacher.vote": "majority",
    "teacher.complex_k": 0,
    "teacher.demo_selection": "all",
    "teacher.num_demos": 4,
    "student.calculator": False,
    "teachers": None,
    "teachers_pick": "correct",
    "task.synthesis": "problems",
    "task.dedup_lsh_rows": 10000,
    "teacher.judge": None,
}

# Lists whose items hash as a section: each entry of ``teachers`` is a teacher section (its batch size
# or worker count does not count either).
ITEM_SECTIONS = {"teachers": "teacher"}

# The recipe path of each section model, so a section hashes alone as it does inside the recipe.
SECTIONS: dict[type[BaseModel], str] = {
    TaskConfig: "task",
    TeacherConfig: "teacher",
    StudentConfig: "student",
    ExportConfig: "export",
    EvalConfig: "eval",
}


def content_hash(data: BaseModel | dict, path: str | None = None) -> str:
    """Hash of the semantic settings only: batch sizes, worker counts and executors do not count.

    ``data`` is a recipe section (hashed at its recipe path, e.g. ``teacher``) or a dict whose keys
    are section names (``{"task": ..., "teacher": ...}``); ``path`` names where a dict sits instead.
    """
    if isinstance(data, BaseModel):
        path = path if path is not None else SECTIONS.get(type(data), "")
        data = data.model_dump(mode="json")

    def strip(x, at: str):
        if not isinstance(x, dict):
            return x
        out = {}
        for k, v in sorted(x.items()):
            key = f"{at}.{k}" if at else k
            if key in NON_SEMANTIC or (key in OPTIONAL_DEFAULTS and v == OPTIONAL_DEFAULTS[key]):
                continue
            out[k] = [strip(i, ITEM_SECTIONS[key]) for i in v] if key in ITEM_SECTIONS and v else strip(v, key)
        return out

    return hashlib.sha256(json.dumps(strip(data, path or ""), sort_keys=True).encode()).hexdigest()[:16]


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section, _ = _section_of(field.annotation)  # a section, an optional one, or a list's items
        if section is not None:
            keys += _all_keys(section, prefix + name + ".")
    return keys


def _suggest(key: str) -> str:
    key = ".".join(p for p in key.split(".") if not p.isdigit())  # teachers.1.modle is near teachers.model
    close = difflib.get_close_matches(key, _all_keys(Recipe), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else "see `distill run --help` and recipes/ for valid keys"


def _keys_hint(loc: tuple) -> str:
    """Where to read the valid keys beside an unknown one at ``loc``: ``distill recipe keys`` of the
    section holding it (list positions dropped: ``teacher.demos.0.x`` is in ``teacher.demos``)."""
    section = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    return f"see `distill recipe keys {section}`" if section else "see `distill recipe keys`"


def _yaml_value(raw: str) -> tuple[Any, str | None]:
    """An override's value read as YAML, and None; or, when it is not YAML (e.g. a Jinja template),
    ``raw`` itself as a plain string and the parser's complaint."""
    if not raw:
        return "", None
    try:
        return yaml.safe_load(raw), None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date like 2024-02-30
        return raw, getattr(e, "problem", None) or str(e).splitlines()[0]


def _set_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise DistillError(f"override {override!r} is not key=value", "write overrides like student.epochs=2")
    key, raw = override.split("=", 1)
    value, _ = _yaml_value(raw)
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if isinstance(node, list):  # an entry of a list of sections: teachers.1.model
            node = _list_item(node, p, key)
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise DistillError(f"override {key!r}: {p} is not a section", _suggest(key))
    if isinstance(node, list):
        raise DistillError(f"override {key!r}: {parts[-2]} is a list", f"name an entry: {parts[-2]}.0.<key>")
    node[parts[-1]] = value


def _list_item(items: list, index: str, key: str):
    """The entry ``index`` (a number) of a list of sections an override ``key`` goes through."""
    if not index.isdigit() or int(index) >= len(items):
        raise DistillError(
            f"override {key!r}: {index} is not an entry of that list ({len(items)} entr{'y' if len(items) == 1 else 'ies'})",
            f"number the entry from 0 to {len(items) - 1}",
        )
    return items[int(index)]


def _format_error(err: ValidationError) -> DistillError:
    """The first validation problem as one line: the key, what is wrong, and the fix."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return DistillError(f"unknown recipe key '{key}'", f"{_suggest(key)} ({_keys_hint(e['loc'])})")
    msg = e["msg"].removeprefix("Value error, ")
    if not key:
        return DistillError(msg, "fix the recipe or the override")
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return DistillError(f"recipe key '{key}': {msg}{shown}", "fix the recipe or the override")


def _explain_override(err: ValidationError, data: dict, overrides) -> DistillError | None:
    """The first validation problem when YAML, not the user, chose an override's type: ``key=Answer:
    short`` read as a mapping (or a list, boolean, number, null) where the same text, quoted, passes;
    or a value that is not YAML (``[0, 2``) kept as text where the key wants a list, mapping or number.
    None when the override is just a wrong value, which ``_format_error`` words as before."""
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    for override in reversed(overrides):  # of two overrides of a key, the last one counts
        key, raw = override.split("=", 1)
        parts = tuple(key.strip().split("."))
        if loc[: len(parts)] == parts:
            break
    else:
        return None
    value, problem = _yaml_value(raw)
    shown = override if override.isprintable() else f"{key.strip()}={raw!r}"  # one line, control characters escaped
    problem = problem if problem is None or problem.isprintable() else repr(problem)
    if problem is not None:
        if first["type"] == "string_type" or not first["type"].endswith(("_type", "_parsing")):
            return None  # text was accepted as text; the value itself is wrong
        return DistillError(
            f"{shown} is not valid YAML ({problem}), so it was read as the text {raw!r}",
            "write the value as YAML, e.g. a list as [0, 2, 4] and a mapping as {loss: jsd}",
        )
    text = raw.strip()
    if isinstance(value, str) or not _valid_as_text(data, parts, text):
        return None
    quoted = shlex.quote(f"{key.strip()}={json.dumps(text, ensure_ascii=False)}")  # a YAML string, shell-quoted
    return DistillError(
        f"{shown} was read as YAML, which made it {_yaml_made(value, text)}", f"quote the value: {quoted}"
    )


def _valid_as_text(data: dict, parts: tuple[str, ...], text: str) -> bool:
    """Whether the recipe ``data`` has no problem at key ``parts`` once that key holds ``text`` as a string."""
    as_text = copy.deepcopy(data)
    node = as_text
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return False
    node[parts[-1]] = text
    try:
        Recipe.model_validate(as_text)
    except ValidationError as e:
        return not any(tuple(str(p) for p in x["loc"])[: len(parts)] == parts for x in e.errors())
    return True


def _yaml_made(value: Any, text: str) -> str:
    """What YAML made of the override text ``text``, and what in it did that: "a mapping (the ': ' does that)"."""
    if isinstance(value, dict):
        if text.startswith("{"):
            return "a mapping (the '{' does that)"
        if ": " in text:
            return "a mapping (the ': ' does that)"
        return "a mapping (the ':' at the end does that)" if text.endswith(":") else "a mapping"
    if isinstance(value, list):
        return "a list (the '[' does that)" if text.startswith("[") else "a list (the leading '- ' does that)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()} (YAML reads yes, no, on, off, true and false as booleans)"
    if value is None:
        if text.startswith("#"):
            return "null (the '#' starts a YAML comment)"
        return "null (YAML reads null and ~ as no value)"
    if isinstance(value, (int, float)):
        return f"a number (YAML reads {text} as one)"
    return f"a {type(value).__name__} (YAML reads {text} as one)"  # a date: 2024-01-01


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a YAML recipe (or defaults when ``path`` is None), apply overrides, validate.

    A file that cannot be read, is not YAML (the line is named), is empty or is not a mapping is one
    ``DistillError`` naming the file; so are output paths that point at a file (``check_output_paths``)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and not path.is_dir():
            raise DistillError(f"recipe {path} does not exist", "pass a YAML file, e.g. recipes/quickstart.yaml")
        data = _parse_recipe(read_input(path, "recipe"), path)
    return recipe_from_dict(data, overrides)


def _parse_recipe(text: str, path: Path) -> dict:
    """A recipe file's mapping; a YAML mistake (with its line), an empty file or another top-level
    value is one ``DistillError`` naming ``path``."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = e.problem or e.context or str(e).splitlines()[0]
        raise DistillError(f"recipe {path} is not valid YAML{where} ({why})", "fix the file there") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a date like 2024-02-30
        raise DistillError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})", "fix the file") from None
    if data is None:
        raise DistillError(
            f"recipe {path} is empty", "write at least a name and task, or run without a file for the defaults"
        )
    if not isinstance(data, dict):
        raise DistillError(
            f"recipe {path} must be a mapping of keys, not {type(data).__name__}",
            "write key: value lines, e.g. name: my-run (see recipes/quickstart.yaml)",
        )
    return data


def recipe_from_dict(data: dict, overrides: list[str] = ()) -> Recipe:
    """A recipe mapping (e.g. ``Recipe.dump()``) with ``key=value`` overrides applied, validated."""
    data = copy.deepcopy(data)  # overrides edit a copy, never the caller's mapping
    for o in overrides:
        _set_override(data, o)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain_override(e, data, overrides) or _format_error(e) from None
    check_output_paths(recipe)
    return recipe


def _file_on_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parents (nearest first) that exists and is not a folder, if any: a
    path below a file can never be created."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_paths(recipe: Recipe) -> None:
    """Where the run writes must be writable as what it is: ``output_dir`` (and the run folder in it)
    a folder or nothing yet, ``cache`` a SQLite file or nothing yet. Checked when the recipe is loaded,
    so a path that points at a file is one ``DistillError`` before anything is written."""
    out, run = Path(recipe.output_dir), recipe.run_dir
    for path, key in ((out, "output_dir"), (run, "run folder")):
        if path.exists() and not path.is_dir():
            raise DistillError(
                f"{key} {path} is a file, not a folder",
                "set output_dir (or name) to a folder or to a path not yet used",
            )
    blocker = _file_on_the_way(out)
    if blocker is not None:
        raise DistillError(
            f"output_dir {out} is inside {blocker}, which is a file", "set output_dir to a path under a folder"
        )
    cache = Path(recipe.cache)
    if cache.is_dir():
        raise DistillError(
            f"cache {cache} is a folder, not a file", "set cache to a file path, e.g. cache=.distill/cache.sqlite"
        )
    blocker = _file_on_the_way(cache)
    if blocker is not None:
        raise DistillError(f"cache {cache} is inside {blocker}, which is a file", "set cache to a path under a folder")
    if cache.is_file() and not _is_sqlite(cache):
        raise DistillError(
            f"cache {cache} is an existing file that is not a SQLite database",
            "point cache at a new path or at a cache distill wrote (the file is left as it is)",
        )


def _is_sqlite(path: Path) -> bool:
    """Whether ``path`` is empty (SQLite starts a database in it) or starts with SQLite's header."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return True  # unreadable: the cache reports it when it opens the file
    return not head or head == b"SQLite format 3\x00"


def recipe_keys(prefix: str = "") -> list[dict]:
    """Every recipe key, read from the pydantic models so the list cannot drift from what validation
    accepts: one dict per key, in recipe order (a section's own row, then its keys), with the dotted
    ``key`` (``student.validation.patience``; ``teacher.demos[].question`` for the items of a list),
    a readable ``type``, the ``default`` as JSON (an optional section's keys show the defaults they take
    once the section is set), ``required`` and the field's ``description``.

    ``prefix`` keeps one section (``task``, ``student.kd``); one that names no key is a DistillError
    listing the sections. ``distill recipe keys`` prints this; unknown-key errors point at it."""
    rows = _key_rows(Recipe, "")
    prefix = prefix.strip().strip(".")
    if not prefix:
        return rows
    kept = [r for r in rows if r["key"] == prefix or r["key"].startswith((prefix + ".", prefix + "[]"))]
    if not kept:
        sections = [r["key"] for r in rows if "section" in r["type"]]
        raise DistillError(f"no recipe section '{prefix}'", "sections: " + ", ".join(sections))
    return kept


def _key_rows(model: type[BaseModel], prefix: str) -> list[dict]:
    """The ``recipe_keys`` rows of ``model``'s fields under ``prefix``, each section followed by its keys."""
    rows = []
    try:  # what a fresh section holds: a default another default implies (epochs: auto brings validation)
        fresh = model().model_dump(mode="json")
    except ValidationError:  # a section with required keys
        fresh = {}
    for name, field in model.model_fields.items():
        section, in_list = _section_of(field.annotation)
        required = field.is_required()
        if required:
            default = None
        else:
            default = fresh[name] if name in fresh else to_jsonable_python(field.get_default(call_default_factory=True))
        rows.append(
            {
                "key": prefix + name,
                "type": _type_name(field.annotation),
                "default": default,
                "required": required,
                "description": field.description or _summary(section),
            }
        )
        if section is not None:
            rows += _key_rows(section, prefix + name + ("[]." if in_list else "."))
    return rows


def _section_of(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The settings model a field holds (a section, an optional one, or a list's items), and whether in a list."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is None and isinstance(a, type) and issubclass(a, BaseModel):
            return a, typing.get_origin(annotation) is list
    return None, False


def _type_name(annotation, alone: bool = True) -> str:
    """A field type as a recipe writer reads it: ``int``, ``float | auto``, ``one of rationale, label, kd``,
    ``list[str]``, ``section | null``; ``alone`` is False inside another type (a choice is then ``a | b``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        values = [str(a) for a in args]
        return "one of " + ", ".join(values) if alone and len(values) > 1 else " | ".join(values)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a, alone=False) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0], alone=False)}]"
    if origin is dict:
        k, v = (_type_name(a, alone=False) for a in args)
        return "mapping" if (k, v) == ("str", "any") else f"mapping[{k}: {v}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _summary(model: type[BaseModel] | None) -> str:
    """The first paragraph of a settings model's docstring, on one line ("" without one)."""
    doc = model.__dict__.get("__doc__") if model is not None else None
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""
