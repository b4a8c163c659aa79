"""Recipe: the typed, validated description of one distillation run.

Loaded from YAML with ``key=value`` overrides (``student.epochs=2``). Unknown keys are rejected with
the closest valid key suggested; every field documents itself.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import DistillError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Strict):
    """Where problems come from and how answers are checked."""

    source: Literal["reasoning_gym", "file"] = Field(
        "reasoning_gym",
        description="reasoning_gym generator, or a file: .jsonl (question/answer), .json, zero-shot-CoT .log",
    )
    name: str = Field("chain_sum", description="reasoning_gym dataset name, or the file path for source=file")
    params: dict[str, Any] = Field(default_factory=dict, description="generator config (reasoning_gym kwargs)")
    answer_type: Literal["number", "text"] = Field("number", description="how answers are extracted and compared")
    train_size: int = Field(128, ge=1, description="problems the teacher answers to build the training set")
    eval_size: int = Field(40, ge=1, description="held-out problems every model is evaluated on")
    seed: int = Field(0, description="generator seed; train and eval use disjoint seeds")


class Demo(Strict):
    """A worked example shown to the teacher (few-shot CoT)."""

    question: str
    rationale: str
    answer: str


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
    keep: Literal["correct", "all"] = Field("correct", description="keep only rationales whose answer is correct")
    shard_rows: int = Field(64, ge=1, description="rows per committed Parquet shard (a kill loses at most this many)")
    price_per_1k_input: float = Field(0.0, ge=0, description="cost estimate per 1k prompt tokens")
    price_per_1k_output: float = Field(0.0, ge=0, description="cost estimate per 1k generated tokens")
    max_tokens: int = Field(0, ge=0, description="stop cleanly (resumable) after this many tokens in+out; 0 = no cap")
    max_cost: float = Field(0.0, ge=0, description="stop cleanly (resumable) at this estimated cost; 0 = no cap")

    @field_validator("prompt_template")
    @classmethod
    def _template_renders(cls, v: str) -> str:
        from teachers.prompts import render

        render(v, question="1 + 1 =")  # a broken or unsafe template fails here, before any job starts
        return v

    @model_validator(mode="after")
    def _logprobs_for_cot(self):
        if self.topk_logprobs and self.method in ("least_to_most", "self_ask"):
            raise ValueError("teacher.topk_logprobs is recorded by zero_shot_cot, few_shot_cot and self_consistency")
        return self

    @model_validator(mode="after")
    def _demos_for_few_shot(self):
        if self.method == "few_shot_cot" and not self.demos:
            raise ValueError("few_shot_cot needs teacher.demos (a list of question, rationale, answer)")
        return self


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

    loss: Literal["forward_kl", "jsd"] = Field("forward_kl", description="KL(teacher||student) or generalized JSD")
    temperature: float = Field(1.0, gt=0, le=10, description="softmax temperature of both distributions")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL")
    weight: float = Field(0.5, ge=0, le=1, description="loss = (1 - weight) * cross-entropy + weight * KD")


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
    lora: LoraSettings | None = Field(None, description="train LoRA adapters (merged before saving) instead")
    format: Literal["rationale", "label", "multitask", "kd"] = Field(
        "rationale",
        description="target: rationale + answer, answer only, [label]/[explain] multitask, or kd (the teacher's "
        "own tokens with its top-k log-probabilities; needs teacher.topk_logprobs and a shared tokenizer)",
    )
    kd: KDSettings = Field(default_factory=KDSettings, description="logit distillation settings (format=kd)")
    packing: bool = Field(
        False, description="pack several examples per row (no attention across examples) instead of padding"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="multitask: weight of the label loss (rationale gets 1 - alpha)")
    epochs: float = Field(2.0, gt=0, description="passes over the training set")
    lr: float = Field(1e-4, gt=0, lt=1, description="peak learning rate (AdamW)")
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
    eval_max_new_tokens: int = Field(256, ge=1, description="generation cap when evaluating students")
    eval_batch_size: int = Field(8, ge=1)

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


class ExportConfig(Strict):
    """ONNX export, quantized variants, the quality gate that picks one, and the bundle."""

    enabled: bool = True
    variants: list[Literal["int8", "int8_dynamic", "int4", "fp16"]] = Field(
        default_factory=lambda: ["int8", "int4"],
        description="variants tried besides fp32: int8 (blockwise MatMulNBits, int8 compute), int8_dynamic "
        "(per-channel quantize_dynamic), int4 (MatMulNBits), fp16",
    )
    gate: bool = Field(True, description="score every variant on the eval split and keep the smallest within tolerance")
    tolerance: float = Field(0.01, ge=0, le=1, description="accuracy a variant may lose vs fp32 (0.01 = 1 point)")
    smooth_alpha: float = Field(
        0.0, ge=0, le=1, description="SmoothQuant migration strength folded into weights before export (0 = off)"
    )
    block_size: int = Field(32, ge=16, description="quantization block size for int8/int4 (power of two)")
    keep_fp32_nodes: list[str] = Field(default_factory=list, description="MatMul node names to keep in fp32")
    opset: int = Field(18, ge=17)

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("block_size must be a power of two (16, 32, 64, 128, ...)")
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
    def _kd_needs_logprobs(self):
        if (
            self.student.format == "kd"
            and not self.teacher.topk_logprobs
            and not self.teacher.model.startswith("replay:")
        ):
            raise ValueError("student.format=kd needs the teacher's log-probabilities: set teacher.topk_logprobs=20")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def dump(self) -> dict:
        return self.model_dump(mode="json")


# Settings that do not change what a stage computes: excluded from content hashes.
NON_SEMANTIC = {
    "batch_size",
    "workers",
    "executor",
    "eval_batch_size",
    "micro_batch_size",
    "save_every",
    "price_per_1k_input",
    "price_per_1k_output",
    "max_tokens",
    "max_cost",
    "shard_rows",
}


# Options added after the first release: at their default they are left out of content hashes, so
# adding an option does not invalidate stages that finished before it existed.
OPTIONAL_DEFAULTS = {
    "tokenizer": None,
    "layers": None,
    "lora": None,
    "kd": KDSettings().model_dump(mode="json"),
    "packing": False,
    "topk_logprobs": 0,
}


def content_hash(section: BaseModel | dict) -> str:
    """Hash of the semantic settings only: batch sizes, worker counts and executors do not count."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section

    def strip(x):
        if isinstance(x, dict):
            return {
                k: strip(v)
                for k, v in sorted(x.items())
                if k not in NON_SEMANTIC and not (k in OPTIONAL_DEFAULTS and v == OPTIONAL_DEFAULTS[k])
            }
        return x

    return hashlib.sha256(json.dumps(strip(data), sort_keys=True).encode()).hexdigest()[:16]


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(Recipe), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else "see `distill run --help` and recipes/ for valid keys"


def _set_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise DistillError(f"override {override!r} is not key=value", "write overrides like student.epochs=2")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:  # not YAML (e.g. a Jinja template): take it as a plain string
        value = raw
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise DistillError(f"override {key!r}: {p} is not a section", _suggest(key))
    node[parts[-1]] = value


def _format_error(err: ValidationError) -> DistillError:
    """The first validation problem as one line: the key, what is wrong, and the fix."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return DistillError(f"unknown recipe key '{key}'", _suggest(key))
    msg = e["msg"].removeprefix("Value error, ")
    if not key:
        return DistillError(msg, "fix the recipe or the override")
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return DistillError(f"recipe key '{key}': {msg}{shown}", "fix the recipe or the override")


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a YAML recipe (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"recipe {path} does not exist", "pass a YAML file, e.g. recipes/quickstart.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DistillError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})", "fix the file") from None
        if not isinstance(data, dict):
            raise DistillError(f"recipe {path} must be a mapping of keys", "see recipes/quickstart.yaml")
    for o in overrides:
        _set_override(data, o)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _format_error(e) from None
