"""``distill plan``: what a recipe's teacher calls will cost, known before the first one is paid.

The requests are not re-derived here: each method (``teachers.methods``, ``teachers.synthesis``)
runs as written against ``_DryTeacher``, which renders prompts with the real backend (tokenizer and
chat template only, never the weights), answers from the completion cache where it can and, where
it cannot, with a placeholder naming the step it stands for. So every request whose prompt depends
on nothing unknown (all of stage 1) is the exact request of the real run, with its exact cache key
and token count; a request built on a placeholder (stage 2 after an uncached rationale, a later
least-to-most step) is counted with the placeholder's share estimated, and the method's own rules
give the range of how many such calls there will be. ``--pilot N`` pays for N train problems
through the normal cached path first: what they measured sets the estimates, and the real run
finds their completions in the cache.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from distill.config import Recipe
from distill.core.answers import Task
from distill.core.errors import DistillError
from distill.core.problems import load_problems, load_seeds
from distill.core.sources import resolve_model
from distill.teachers.backends.base import Completion
from distill.teachers.budget import cost_of
from distill.teachers.cache import CompletionCache
from distill.teachers.methods import METHODS, scoring_prompt
from distill.teachers.workers import make_backend, run_teacher

# The names of a method's successive teacher.generate() calls; later calls take the last name.
PARTS = {
    "zero_shot_cot": ("reason", "answer"),
    "few_shot_cot": ("reason", "answer"),
    "self_consistency": ("reason", "answer"),
    "self_ask": ("reason", "answer"),
    "least_to_most": ("decompose", "solve"),
}
MEAN_OF_LAST = 2000  # cached completions of this teacher read for a mean output length


def _unknown(part: str) -> str:
    """The placeholder text of an uncached completion of ``part`` (or of a question not written yet):
    it states no answer (so stage 2 follows, as in the worst case), parses as no new problem, and
    reads as one sub-question (it ends with "?"); prompts built on it are recognised by it."""
    return f"⟪{part}⟫?"


@dataclass
class _Call:
    """One request the run will make: its step, prompt, token cap, and the cached answer if any."""

    part: str
    prompt: str
    cap: int
    key: str
    round: int  # which teacher.generate() call of the method asked for it
    hit: Completion | None


class _DryTeacher:
    """The teacher as a method sees it, making no call: prompts from the real backend, answers from
    the cache or placeholders; records every request. ``parts`` names the successive calls."""

    def __init__(self, backend, cache: CompletionCache | None, parts: tuple[str, ...]):
        self.backend, self.cache, self.parts = backend, cache, parts
        self.model_id = backend.model_id
        self.calls: list[_Call] = []
        self.rounds = 0

    def chat_prompt(self, messages: list[dict], assistant_prefix: str = "") -> str:
        return self.backend.chat_prompt(messages, assistant_prefix)

    def generate(self, requests) -> list[Completion]:
        part = self.parts[min(self.rounds, len(self.parts) - 1)]
        keys = [r.key(self.model_id) for r in requests]
        hits = self.cache.get_many(list(set(keys))) if self.cache is not None else {}
        out = []
        for r, k in zip(requests, keys):
            self.calls.append(_Call(part, r.prompt, r.decoding.max_new_tokens, k, self.rounds, hits.get(k)))
            out.append(hits.get(k) or Completion(_unknown(part), 0, 0, "stop"))
        self.rounds += 1
        return out


class _Tokens:
    """Counts prompt tokens as the teacher will: its own tokenizer (as the backend encodes a prompt),
    else tiktoken for an endpoint, else a chars/4 estimate; ``how`` says which."""

    def __init__(self, backend):
        self.tokenizer = getattr(backend, "tokenizer", None)
        self.encoding = None
        if self.tokenizer is not None:
            self.how = "the teacher's tokenizer"
            return
        try:
            import tiktoken

            self.encoding = tiktoken.get_encoding("o200k_base")
            self.how = "tiktoken o200k_base (an estimate: the endpoint's tokenizer may differ)"
        except Exception:  # not installed, or its encoding file cannot be fetched offline
            self.how = "a chars/4 estimate (no local tokenizer for an endpoint; install tiktoken for a closer one)"

    def __call__(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self.tokenizer is not None:
            return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        from distill.teachers.backends.openai import decode_chat

        plain = []
        for t in texts:  # a chat API prompt is the messages as JSON: count their text, not the JSON
            chat = decode_chat(t)
            plain.append(t if chat is None else "\n".join(m["content"] for m in chat[0]) + chat[1])
        if self.encoding is not None:
            return [len(self.encoding.encode(t)) for t in plain]
        return [max(1, round(len(t) / 4)) for t in plain]


def plan(recipe: Recipe, pilot: int = 0) -> dict:
    """What ``recipe``'s teacher calls will cost, per step: calls (min/estimate/max), cache hits,
    input and output tokens, cost and time, with totals, budget warnings and where each estimate
    came from. ``pilot`` > 0 first runs the teacher on that many train problems (paid once, cached).
    With several teachers, each one's steps (``teacher``: its name), ``_several_teachers``."""
    if recipe.teachers is not None:
        return _several_teachers(recipe, pilot)
    cfg = recipe.teacher
    if recipe.task.source == "synthetic" and recipe.task.synthesis == "instructions":
        from distill.teachers.synthesis import instruction_split

        train, evals = [], instruction_split(recipe.task.name, recipe.task.eval_size)[1]
    else:
        train, evals = load_problems(recipe.task)
    synthetic = recipe.task.source == "synthetic"
    out = {
        "recipe": recipe.name,
        "teacher": cfg.model,
        "method": cfg.method,
        "problems": {"train": recipe.task.train_size if synthetic else len(train), "eval": len(evals)},
        "pilot": None,
        "notes": [],
        "warnings": [],
    }
    if cfg.model.startswith("replay:"):
        out = _replay(recipe, train + evals, out)
        scoring = _scoring(recipe, train or evals, None, out)
        if scoring:
            out["stages"] += scoring
            out["total"] = _total(out["stages"])
            _budget_warnings(out, recipe)
        return out
    remote = cfg.model.startswith("openai:")
    path = "" if remote else str(resolve_model(cfg.model, cfg.trust_remote_code, "teacher"))
    if pilot:
        out["pilot"] = _pilot(recipe, path, train or evals, pilot)
    # Prompts and cache keys do not depend on the engine (vllm renders and names weights the same way):
    # the transformers backend gives them from the tokenizer alone.
    backend = make_backend(cfg.model_copy(update={"engine": "transformers"}), path)
    cache = CompletionCache(recipe.cache) if Path(recipe.cache).exists() else None
    count = _Tokens(backend)
    out["tokenizer"] = count.how
    calls: list[_Call] = []
    if synthetic:
        train, synth = _dry_synthesis(recipe, backend, cache, evals)
        calls += synth
    dry = _DryTeacher(backend, cache, PARTS[cfg.method])
    METHODS[cfg.method](dry, evals + train, cfg, Task.from_config(recipe.task))
    calls += dry.calls
    question_tokens = sum(count([p["question"] for p in evals])) / max(len(evals), 1)
    rate, parallel, time_source = _throughput(recipe, out["pilot"])
    if rate and time_source == "the pilot" and pilot < cfg.batch_size:
        out["notes"].append(
            f"time: the pilot ran one batch of {pilot}, the run batches {cfg.batch_size} (and loads the weights "
            "once per worker): it likely overestimates; a pilot of teacher.batch_size problems measures it closer"
        )
    names = ("synthesize",) * synthetic + PARTS[cfg.method]
    stages = _parts(calls, names, cfg, count, _cache_mean(cache, backend.model_id), question_tokens, out)
    if cfg.judge is not None:
        stages.append(_judge_step(recipe, train, stages, out))
    for s in stages:
        paid = s["tokens_out"]["estimate"]
        s["seconds"] = None if paid is None else 0.0 if not paid else paid / rate / parallel if rate else None
        s["seconds_max"] = s["tokens_out"]["max"] / rate / parallel if rate else None  # every call at its cap
    written = [p for p in train if p["question"] != _unknown("question")]
    stages += _scoring(recipe, written or evals, backend, out)
    out["stages"] = stages
    out["total"] = _total(stages)
    out["time_source"] = time_source
    _budget_warnings(out, recipe)
    return out


def _several_teachers(recipe, pilot: int) -> dict:
    """The plan of each teacher of ``recipe.teachers`` as if it were the only one, its steps named by
    it and summed. A ``when: unsolved`` teacher is asked only what the teachers before it leave
    unsolved, unknown before they answer: its calls are an upper bound (every problem), from 0. The
    pilot and on-policy scoring are the first teacher's (the one training calls the teacher)."""
    plans = []
    for k, t in enumerate(recipe.teachers):
        student = recipe.student if k == 0 else recipe.student.model_copy(update={"on_policy": None})
        one = recipe.model_copy(update={"teacher": t.section(), "teachers": None, "student": student})
        p = plan(one, pilot if k == 0 else 0)
        for s in p["stages"]:
            s["teacher"] = t.name
            if t.when == "unsolved" and s["stage"] == "generate":
                s["calls"]["min"] = 0
                s["upper_bound_estimate"] = True
        if t.when == "unsolved":
            p["notes"].append(
                "when: unsolved — asked only the problems the teachers before it leave unsolved: these calls, "
                "tokens and cost are an upper bound (every problem), from 0"
            )
        plans.append(p)
    out = dict(plans[0])
    out["teacher"] = ", ".join(t.name for t in recipe.teachers)
    out["method"] = ", ".join(t.method for t in recipe.teachers)
    out["teachers"] = [{"name": t.name, "model": t.model, "when": t.when} for t in recipe.teachers]
    out["stages"] = [s for p in plans for s in p["stages"]]
    out["notes"] = [f"{t.name}: {n}" for t, p in zip(recipe.teachers, plans) for n in p["notes"]]
    out["warnings"] = [f"{t.name}: {w}" for t, p in zip(recipe.teachers, plans) for w in p["warnings"]]
    out["total"] = _total(out["stages"])
    return out


def _dry_synthesis(recipe, backend, cache, evals) -> tuple[list[dict], list[_Call]]:
    """Synthesis as ``stages.generate`` runs it, through the dry teacher: the problems cached
    completions already wrote, the rest (up to ``task.train_size``) as placeholder questions. A code
    problem's solution is asked for by the method's own requests, which the method's steps count (the
    generate stage answers the kept problems from the cache): its checking calls are not counted twice."""
    from distill.teachers import synthesis

    t, kind = recipe.task, recipe.task.synthesis
    dry = _DryTeacher(backend, cache, ("synthesize",))
    settings = dict(seed=t.seed, shots=t.seed_shots, temperature=recipe.teacher.temperature)
    settings.update(threshold=t.dedup_threshold, lsh_rows=t.dedup_lsh_rows)
    avoid = [r["question"] for r in evals]
    if kind == "instructions":
        seeds = synthesis.instruction_split(t.name, t.eval_size)[0]
        items, _ = synthesis.synthesize_instructions(dry, seeds, t.train_size, avoid, **settings)
    elif kind == "code":
        solver = _DryTeacher(backend, cache, PARTS[recipe.teacher.method])

        def solve(problems):
            return METHODS[recipe.teacher.method](solver, problems, recipe.teacher, Task.from_config(t))

        items, _ = synthesis.synthesize_code(dry, load_seeds(t), t.train_size, avoid, solve, **settings)
    else:
        questions, _ = synthesis.synthesize(
            dry, [r["question"] for r in load_seeds(t)], t.train_size, avoid, **settings
        )
        items = [{"question": q} for q in questions]
    problems = synthesis.as_train_problems(items, kind, {}) if items else []
    problems += [
        {"id": f"syn-{i:06d}", "split": "train", "question": _unknown("question"), "gold": None}
        for i in range(len(problems), t.train_size)
    ]
    return problems, dry.calls


def _pilot(recipe, model_path: str, problems: list[dict], n: int) -> dict:
    """Run the teacher on ``n`` of ``problems`` (a seeded sample, not the first rows: a file sorted by
    difficulty would bias them) through ``run_teacher``, in this process; their completions land in
    the cache, so the plan counts them as paid and the real run reuses them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from distill.core.progress import console

    sample = random.Random(recipe.task.seed).sample(problems, min(n, len(problems)))
    cfg = recipe.teacher.model_copy(update={"executor": "local"})
    kwargs = dict(
        model_path=model_path,
        teacher_cfg=cfg,
        task=Task.from_config(recipe.task),
        cache_path=str(Path(recipe.cache).resolve()),
    )
    console.print(
        f"[bold]plan[/] pilot: the teacher answers {len(sample)} problem{'s' * (len(sample) != 1)} (cached for the real run)"
    )
    tables: list[pa.Table] = []
    t0 = time.time()
    run_teacher(sample, kwargs, cfg, tables.append)
    seconds = time.time() - t0
    rows = pa.concat_tables(tables)
    fresh = rows.filter(pc.invert(rows["cached"]))
    tokens_in = pc.sum(fresh["tokens_in"]).as_py() or 0
    tokens_out = pc.sum(fresh["tokens_out"]).as_py() or 0
    return {
        "problems": len(sample),
        "failed": pc.sum(pc.is_valid(rows["error"])).as_py() or 0,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost": cost_of(tokens_in, tokens_out, cfg),
        "seconds": seconds,
        "tokens_per_second": tokens_out / seconds if tokens_out and seconds > 0 else None,
    }


def _throughput(recipe, pilot: dict | None) -> tuple[float | None, int, str | None]:
    """(output tokens per second of one worker, workers of the real run, where it was measured): the
    pilot's (one worker; weights loading included), else this run's last generate stage (all its
    workers, its fresh share of the tokens), else unknown."""
    cfg = recipe.teacher
    if pilot and pilot["tokens_per_second"]:
        return pilot["tokens_per_second"], cfg.workers if cfg.executor == "ray" else 1, "the pilot"
    metrics = recipe.run_dir / "generate" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        fresh = m.get("tokens_out", 0) * (1 - m.get("cached_rows", 0) / max(m.get("problems", 1), 1))
        if m.get("teacher_model") == cfg.model and fresh > 0 and m.get("seconds"):
            return fresh / m["seconds"], 1, f"the last generate run, {metrics}"
    from distill.core.sources import EMBEDDED

    spec = EMBEDDED.get(cfg.model.removeprefix("embedded:")) if cfg.model.startswith("embedded:") else None
    if spec is not None and spec.tokens_per_second:  # recorded on the project's machine: a CPU's figure
        workers = cfg.workers if cfg.executor == "ray" else 1
        return spec.tokens_per_second, workers, "a 2-core CPU recorded for this model: a pilot measures yours"
    return None, 1, None


def _cache_mean(cache: CompletionCache | None, model_id: str) -> float | None:
    """Mean output tokens of this teacher's latest cached generations (a scored text reads 0 tokens
    out: not counted), for steps none of whose own requests is cached."""
    if cache is None:
        return None
    with cache.lock:
        rows = cache.db.execute(
            "SELECT value FROM completions WHERE model = ? ORDER BY created DESC LIMIT ?", (model_id, MEAN_OF_LAST)
        ).fetchall()
    counts = [n for (v,) in rows if (n := json.loads(v).get("tokens_out", 0)) > 0]
    return sum(counts) / len(counts) if counts else None


def _parts(
    calls: list[_Call], parts: tuple[str, ...], cfg, count: _Tokens, model_mean: float | None, question_tokens, out
) -> list:
    """Per step of the method: the dry run's requests turned into calls, cache hits, tokens and cost.

    A paid request is *certain* (the run makes it whatever the teacher writes) or *possible* (it
    depends on an uncached answer): possible ones count with a measured ``rate`` in the estimate, in
    full in the max. Least-to-most adds ``extra`` calls: a problem's uncached decomposition stands
    for 1 to ``max_subquestions + 1`` solve steps, where the dry run made 2."""
    per_call: dict[str, float | None] = {}
    caps = {p: max((c.cap for c in calls if c.part == p), default=0) for p in parts}
    for p in parts:
        hits = [c.hit.tokens_out for c in calls if c.part == p and c.hit]
        mean = sum(hits) / len(hits) if hits else (min(model_mean, caps[p]) if model_mean else None)
        per_call[p] = mean
        if not caps[p]:  # no call of this step (every stage-1 answer cached and explicit)
            continue
        if hits:
            src = f"the mean of its {len(hits)} cached completions" + (
                ", the pilot's among them" if out["pilot"] else ""
            )
        elif mean is not None:
            src = "the mean of this teacher's latest cached completions (of other prompts)"
        else:
            src = "nothing of this teacher is cached: run --pilot N to measure it"
        out["notes"].append(f"{p}: output tokens per call {'unknown' if mean is None else f'{mean:.1f}'}, {src}")
    fills = {p: (per_call[p] or caps[p], caps[p]) for p in parts}
    fills["question"] = (question_tokens, question_tokens)
    marks = {p: _unknown(p) for p in fills}

    def tokens(prompts: list[str]) -> list[tuple[float, float]]:
        """(estimate, max) prompt tokens: the text counted, each placeholder as its step's output."""
        bare = []
        for t in prompts:
            for m in marks.values():
                t = t.replace(m, "")
            bare.append(t)
        return [
            (
                n + sum(t.count(m) * fills[p][0] for p, m in marks.items()),
                n + sum(t.count(m) * fills[p][1] for p, m in marks.items()),
            )
            for t, n in zip(prompts, count(bare))
        ]

    stages = []
    for p in parts:
        mine = [c for c in calls if c.part == p]
        hits = [c for c in mine if c.hit]
        # A request built on a placeholder stands for one of its own (its sample's rationale); an exact
        # one asked twice in one call is paid once, as CachedTeacher does.
        on_mark = [c for c in mine if not c.hit and any(m in c.prompt for m in marks.values())]
        marked = {id(c) for c in on_mark}
        exact = {(c.round, c.key): c for c in mine if not c.hit and id(c) not in marked}
        paid = list(exact.values()) + on_mark
        derived = [False] * len(exact) + [True] * len(on_mark)
        possible = [False] * len(paid)
        rate, extra, guessed = 1.0, (0, 0, 0), False
        if p == "answer" and cfg.answer_extraction == "fallback":
            possible = derived
            reasons = sum(1 for c in calls if c.part == "reason" and c.hit)
            known = sum(1 for c, d in zip(paid, derived) if not d) + len(hits)
            if reasons:
                rate = known / reasons
                out["notes"].append(f"answer: stage 2 follows {rate:.0%} of {reasons} cached stage-1 answers")
            else:
                guessed = True
                out["notes"].append(
                    "answer: stage 2 is paid only when stage 1 states no answer; with none known the estimate "
                    "is the max (run --pilot N to measure it)"
                )
        elif p == "synthesize":
            first = min((c.round for c in paid), default=0)
            possible = [c.round > first for c in paid]
            rate = 0.0  # assumed: the first uncached round yields enough (it asks for half as many again)
        elif p == "solve":
            unknown = sum(1 for c in calls if c.part == "decompose" and not c.hit)
            known = sum(1 for c in calls if c.part == "decompose" and c.hit)
            steps = (len(mine) - 2 * unknown) / known if known else cfg.max_subquestions + 1
            extra = (-unknown, unknown * (steps - 2), unknown * (cfg.max_subquestions - 1))
            guessed = not known and unknown > 0
        t = tokens([c.prompt for c in paid])
        certain = [x for x, q in zip(t, possible) if not q]
        maybe = [x for x, q in zip(t, possible) if q]
        on_placeholders = [x for x, d in zip(t, derived) if d] or t or [(0.0, 0.0)]
        mean_est = sum(x[0] for x in on_placeholders) / len(on_placeholders)
        mean_max = sum(x[1] for x in on_placeholders) / len(on_placeholders)
        lo = len(certain) + extra[0]
        est = len(certain) + rate * len(maybe) + extra[1]
        hi = len(certain) + len(maybe) + extra[2]
        tin_est = sum(x[0] for x in certain) + rate * sum(x[0] for x in maybe) + extra[1] * mean_est
        tin_max = sum(x[1] for x in t) + extra[2] * mean_max
        tout_est = None if per_call[p] is None and est else est * (per_call[p] or 0)
        tout_max = hi * caps[p]
        cost_est = cost_of(tin_est, tout_est or 0, cfg) if tout_est is not None or not cfg.price_per_1k_output else None
        stages.append(
            {
                "stage": "synthesize" if p == "synthesize" else "generate",
                "part": p,
                "calls": {"min": len(hits) + lo, "estimate": len(hits) + round(est), "max": len(hits) + hi},
                "cached": len(hits),
                "tokens_in": {
                    "estimate": round(tin_est),
                    "max": round(tin_max),
                    "cached": sum(c.hit.tokens_in for c in hits),
                },
                "tokens_out": {
                    "estimate": round(tout_est) if tout_est is not None else None,
                    "max": tout_max,
                    "cached": sum(c.hit.tokens_out for c in hits),
                },
                "cost": {"estimate": cost_est, "max": cost_of(tin_max, tout_max, cfg)},
                "upper_bound_estimate": guessed,
            }
        )
    return stages


def _judge_step(recipe, train: list[dict], stages: list[dict], out: dict) -> dict:
    """The judge's calls (teacher.judge): one per answered train row, so 0 to every train problem; each
    prompt is the judge's real prompt (rubric, question, reference) counted with the judge's tokenizer,
    plus the rationale it reads (the reasoning step's estimated length per call, else its cap). Output
    tokens are counted at the judge's cap, cost at the judge's prices."""
    from distill.teachers.judge import judge_messages

    cfg = recipe.teacher
    j = cfg.judge
    remote = j.model.startswith("openai:")
    path = "" if remote else str(resolve_model(j.model, cfg.trust_remote_code, "teacher.judge"))
    backend = make_backend(cfg.judge_section().model_copy(update={"engine": "transformers"}), path)
    shown = {"auto": True, "always": True, "never": False}[j.reference]
    prompts = [
        backend.chat_prompt(judge_messages(p["question"], "", j, p.get("gold") if shown else None)) for p in train
    ]
    reason = next((s for s in stages if s["part"] in ("reason", "solve")), None)
    per_call = cfg.max_new_tokens
    if reason and reason["tokens_out"]["estimate"] is not None and reason["calls"]["estimate"]:
        per_call = reason["tokens_out"]["estimate"] / reason["calls"]["estimate"]
    base = sum(_Tokens(backend)(prompts))
    n = len(train)
    tin_est, tin_max = round(base + n * per_call), base + n * cfg.max_new_tokens
    tout = n * j.max_new_tokens
    out["notes"].append(
        f"judge: one call per answered train row (≤ {n}) by {j.model}, output counted at its cap "
        f"(teacher.judge.max_new_tokens={j.max_new_tokens}); cost at teacher.judge.price_per_1k_*"
        + (
            "; teachers_pick=judged adds pairwise calls (2 per pair of kept rows)"
            if recipe.teachers_pick == "judged"
            else ""
        )
    )
    return {
        "stage": "generate",
        "part": "judge",
        "calls": {"min": 0, "estimate": n, "max": n},
        "cached": 0,
        "tokens_in": {"estimate": tin_est, "max": tin_max, "cached": 0},
        "tokens_out": {"estimate": tout, "max": tout, "cached": 0},
        "cost": {"estimate": cost_of(tin_est, tout, j), "max": cost_of(tin_max, tout, j)},
        "upper_bound_estimate": True,
        "seconds": None,
    }


def _scoring(recipe, problems: list[dict], backend, out: dict) -> list[dict]:
    """The training stage's teacher calls: on-policy scoring and ``student.kd.teacher``'s scores of the
    kept rationales. ``backend`` is the generating teacher's (None for a replay teacher)."""
    st = recipe.student
    steps = []
    if st.on_policy is not None:
        steps.append(
            _on_policy(
                recipe,
                problems,
                _scoring_backend(recipe, st.on_policy.teacher, "student.on_policy.teacher", backend),
                out,
            )
        )
    if st.format == "kd" and st.kd.teacher is not None:
        steps.append(
            _kd_scoring(recipe, problems, _scoring_backend(recipe, st.kd.teacher, "student.kd.teacher", backend), out)
        )
    return steps


def _scoring_backend(recipe, source: str | None, key: str, backend):
    """The backend that counts a scoring teacher's tokens: the generating teacher's when it is the same."""
    cfg = recipe.teacher
    if backend is not None and source in (None, cfg.model):
        return backend
    source = source or cfg.model
    path = "" if source.startswith("openai:") else str(resolve_model(source, cfg.trust_remote_code, key))
    return make_backend(cfg.model_copy(update={"model": source, "engine": "transformers"}), path)


def _kept_rows(recipe) -> int:
    """The most rows generate can keep (its last count if there is one)."""
    rows = recipe.task.train_size * recipe.teacher.rationales_per_question
    metrics = recipe.run_dir / "generate" / "metrics.json"
    if metrics.exists():
        rows = json.loads(metrics.read_text()).get("train_rows_kept", rows)
    return rows


def _kd_scoring(recipe, problems: list[dict], backend, out: dict) -> dict:
    """``student.kd.teacher`` reads every kept rationale once after its prompt (no output tokens): exact
    when generate is done (the kept rows), else each rationale at the teacher's output cap."""
    st, cfg = recipe.student, recipe.teacher
    task = Task.from_config(recipe.task)
    count = _Tokens(backend)
    dataset = recipe.run_dir / "generate" / "dataset" / "train.parquet"
    if dataset.exists():
        import pyarrow.parquet as pq

        from distill.stages.train import kd_score_requests

        rows = pq.read_table(dataset, columns=["question", "rationale", "pred", "gold"]).to_pylist()
        reqs = kd_score_requests(backend, rows, cfg, task)
        each = [a + b for a, b in zip(count([r.prompt for r in reqs]), count([r.completion for r in reqs]))]
        keys = [r.key(backend.model_id) for r in reqs]
        hits = CompletionCache(recipe.cache).get_many(keys) if Path(recipe.cache).exists() else {}
        fresh = [n for key, n in zip(keys, each) if key not in hits]
        calls, cached, tokens, bound = len(fresh), len(rows) - len(fresh), sum(fresh), False
        cached_tokens = sum(each) - tokens
    else:
        calls = _kept_rows(recipe)
        prompts = count([scoring_prompt(backend, p["question"], cfg, task) + cfg.trigger for p in problems])
        tokens = round(calls * (sum(prompts) / max(len(prompts), 1) + cfg.max_new_tokens))
        bound, cached, cached_tokens = True, 0, 0
    out["notes"].append(
        f"kd scores: {st.kd.teacher} reads each kept rationale once "
        + (
            "(counted from the generated data)"
            if not bound
            else "(each at the teacher's output cap until generate has run)"
        )
        + "; cached scores are free"
    )
    cost = cost_of(tokens, 0, cfg)
    return {
        "stage": "train",
        "part": "kd scoring",
        "calls": {"min": 0 if bound else calls, "estimate": calls, "max": calls},
        "cached": cached,
        "tokens_in": {"estimate": tokens, "max": tokens, "cached": cached_tokens},
        "tokens_out": {"estimate": 0, "max": 0, "cached": 0},
        "cost": {"estimate": cost, "max": cost},
        "upper_bound_estimate": bound,
        "seconds": None,
    }


def _on_policy(recipe, problems: list[dict], backend, out: dict) -> dict:
    """Teacher scoring calls of on-policy training: λ of the optimizer steps, a batch of student
    samples each, every one read by the teacher after its prompt (at most the sample cap; no output
    tokens). Steps are counted on the most examples generate can keep (its last count if there is one)."""
    from distill.students.trainer import planned_steps

    st, op, cfg = recipe.student, recipe.student.on_policy, recipe.teacher
    source = op.teacher or cfg.model
    rows = _kept_rows(recipe)
    steps, _ = planned_steps(rows * (2 if st.format == "multitask" else 1), st)
    calls = round(steps * op.lmbda) * st.batch_size
    count = _Tokens(backend)
    task = Task.from_config(recipe.task)
    prompts = count([scoring_prompt(backend, p["question"], cfg, task) for p in problems])
    per_call = sum(prompts) / max(len(prompts), 1) + (op.max_new_tokens or st.eval_max_new_tokens)
    out["notes"].append(
        f"on-policy: ~{round(steps * op.lmbda)} of ≤ {steps} optimizer steps × batch {st.batch_size} student samples "
        f"scored by {source} (cached scores are free; the samples are not known before training)"
    )
    tokens = round(calls * per_call)
    cost = cost_of(tokens, 0, cfg)
    return {
        "stage": "train",
        "part": "on-policy scoring",
        "calls": {"min": calls, "estimate": calls, "max": calls},
        "cached": 0,
        "tokens_in": {"estimate": tokens, "max": tokens, "cached": 0},
        "tokens_out": {"estimate": 0, "max": 0, "cached": 0},
        "cost": {"estimate": cost, "max": cost},
        "upper_bound_estimate": False,
        "seconds": None,
    }


def _replay(recipe, problems: list[dict], out: dict) -> dict:
    """A replay teacher answers from recorded outputs: no call, no cost."""
    from distill.teachers.replay import covered, load_records

    path = recipe.teacher.model.removeprefix("replay:")
    hits = covered(load_records(path), problems)
    out["tokenizer"] = None
    out["notes"].append(f"replay: {hits} of {len(problems)} problems have a recorded answer; no teacher call, cost 0")
    zero = {"estimate": 0, "max": 0, "cached": 0}
    out["stages"] = [
        {
            "stage": "generate",
            "part": "replay",
            "calls": {"min": 0, "estimate": 0, "max": 0},
            "cached": 0,
            "tokens_in": dict(zero),
            "tokens_out": dict(zero),
            "cost": {"estimate": 0.0, "max": 0.0},
            "upper_bound_estimate": False,
            "seconds": 0.0,
        }
    ]
    out["total"] = _total(out["stages"])
    out["time_source"] = None
    return out


def _total(stages: list[dict]) -> dict:
    """The sum of the steps; an estimate nobody could make (no output length known) stays None."""

    def add(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    return {
        "calls": {k: sum(s["calls"][k] for s in stages) for k in ("min", "estimate", "max")},
        "cached": sum(s["cached"] for s in stages),
        "tokens_in": {k: sum(s["tokens_in"][k] for s in stages) for k in ("estimate", "max", "cached")},
        "tokens_out": {
            "estimate": add(s["tokens_out"]["estimate"] for s in stages),
            "max": sum(s["tokens_out"]["max"] for s in stages),
            "cached": sum(s["tokens_out"]["cached"] for s in stages),
        },
        "cost": {"estimate": add(s["cost"]["estimate"] for s in stages), "max": sum(s["cost"]["max"] for s in stages)},
        "seconds": add(s["seconds"] for s in stages if s["stage"] != "train"),
        "seconds_max": add(s.get("seconds_max") for s in stages if s["stage"] != "train"),
    }


def _budget_warnings(out: dict, recipe) -> None:
    """Warn where the estimate, or the token caps, reach a budget cap: the run would stop there
    (resumable). The generate meter counts the rows it pays for (not cached ones, not synthesis);
    the on-policy caps count the scoring tokens actually read."""
    cfg = recipe.teacher
    gen = [s for s in out["stages"] if s["stage"] == "generate"]
    in_est = sum(s["tokens_in"]["estimate"] for s in gen)
    in_max = sum(s["tokens_in"]["max"] for s in gen)
    # an output estimate nobody could make counts as none: the input alone may reach the cap
    out_est = sum(s["tokens_out"]["estimate"] or 0 for s in gen)
    out_max = sum(s["tokens_out"]["max"] for s in gen)
    least = "at least " if any(s["tokens_out"]["estimate"] is None for s in gen) else ""
    checks = [
        ("generate", "teacher.max_tokens", cfg.max_tokens, in_est + out_est, in_max + out_max),
        ("generate", "teacher.max_cost", cfg.max_cost, cost_of(in_est, out_est, cfg), cost_of(in_max, out_max, cfg)),
    ]
    op, scoring = recipe.student.on_policy, [s for s in out["stages"] if s["stage"] == "train"]
    if op is not None and scoring:
        s = scoring[0]
        tokens, cost = s["tokens_in"], s["cost"]
        checks.append(
            ("on-policy scoring", "student.on_policy.max_tokens", op.max_tokens, tokens["estimate"], tokens["max"])
        )
        checks.append(("on-policy scoring", "student.on_policy.max_cost", op.max_cost, cost["estimate"], cost["max"]))
    for what, key, cap, est, most in checks:
        if not cap:
            continue
        unit = "tokens" if key.endswith("tokens") else "cost"
        shown = _num if unit == "tokens" else _money
        if est >= cap:
            out["warnings"].append(
                f"{what}: {least if what == 'generate' else ''}{shown(est)} estimated {unit}, past {key}={cap:g} — "
                "the run would stop at the cap (resumable)"
            )
        elif most >= cap:
            out["warnings"].append(
                f"{what}: {shown(most)} {unit} if every call writes up to its cap, past {key}={cap:g} — "
                "the run could stop there"
            )


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() or x >= 100 else f"{x:.4g}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = round(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _money(x: float) -> str:
    return f"{x:,.2f}" if x >= 0.1 or not x else f"{x:.4f}"


def _range(d: dict, fmt=_num) -> str:
    """ "est" when the bounds agree, else "est (min–max)" / "est (≤ max)"."""
    est = d["estimate"]
    if "min" in d and d["min"] != d["max"]:
        return f"{fmt(est)} ({fmt(d['min'])}–{fmt(d['max'])})"
    return fmt(est) if est == d["max"] else f"{fmt(est)} (≤ {fmt(d['max'])})"


def _seconds_or_max(seconds: float | None, bound: float | None) -> str:
    """The time estimate, or with the output length unknown its bound at every call's cap (``≤ 2m 03s``)."""
    return _seconds(seconds) if seconds is not None or bound is None else f"≤ {_seconds(bound)}"


def print_plan(p: dict, console=None) -> None:
    """The plan as a table (one row per step), one line of totals, then notes and warnings."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    title = f"plan: {p['recipe']} — teacher {p['teacher']} ({p['method']})"
    table = Table(title=escape(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("stage", "calls", "cached", "input tokens", "output tokens", "cost", "time"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for s in p["stages"]:
        out = s["tokens_out"]
        table.add_row(
            escape(f"{s['stage']} {s['teacher']}: {s['part']}" if "teacher" in s else f"{s['stage']}: {s['part']}"),
            _range(s["calls"]),
            _num(s["cached"]),
            _range(s["tokens_in"]),
            f"{'unknown' if out['estimate'] is None else _num(out['estimate'])} (≤ {_num(out['max'])})",
            "unknown" if s["cost"]["estimate"] is None else _range(s["cost"], _money),
            "—" if s["stage"] == "train" else _seconds_or_max(s["seconds"], s.get("seconds_max")),
        )
    console.print(table)
    t = p["total"]
    out_est = "unknown" if t["tokens_out"]["estimate"] is None else _num(t["tokens_out"]["estimate"])
    cost = "unknown" if t["cost"]["estimate"] is None else _money(t["cost"]["estimate"])
    known = t["seconds"] is not None or t.get("seconds_max") is not None
    timed = (t["seconds"] or t.get("seconds_max")) and p["time_source"]
    time_note = f" (throughput of {p['time_source']})" if known and timed else ""
    time_note += "" if known else " without --pilot" if not p["pilot"] else ""
    console.print(
        f"total: {_num(t['calls']['estimate'])} teacher calls ({_num(t['cached'])} cached), "
        f"{_num(t['tokens_in']['estimate'])} input tokens, {out_est} output tokens (≤ {_num(t['tokens_out']['max'])}) "
        f"to pay, {_num(t['tokens_in']['cached'] + t['tokens_out']['cached'])} tokens from the cache for free, "
        f"cost {cost} (≤ {_money(t['cost']['max'])}), time {_seconds_or_max(t['seconds'], t.get('seconds_max'))}"
        f"{time_note}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if p["pilot"]:
        pi = p["pilot"]
        console.print(
            f"pilot: {pi['problems']} problems paid {_num(pi['tokens_in'])} input + {_num(pi['tokens_out'])} output "
            f"tokens (cost {_money(pi['cost'])}) in {_seconds(pi['seconds'])}; the run reuses them from the cache",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    notes = ([f"tokens counted with {p['tokenizer']}"] if p.get("tokenizer") else []) + p["notes"]
    for n in notes:
        console.print(f"  {escape(n)}", style="dim", highlight=False, soft_wrap=True)
    for w in p["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


def estimate_totals(recipe: Recipe) -> dict | None:
    """What the generate stage is planned to cost (no pilot: no weights loaded, no call paid): calls,
    input and output tokens (cached ones included, as the stage's own counts include them), cost and
    seconds, with the generate stage hash it was made for. None when no plan can be made (a plan is
    advice: nothing stops for want of one)."""
    from distill.core.progress import console

    try:
        stages = [s for s in plan(recipe)["stages"] if s["stage"] != "train"]
    except DistillError:  # bad input: the stage itself says so in its one line, nothing is added here
        return None
    except Exception as e:  # a plan that cannot be made leaves the run as it is
        console.print(f"no cost estimate ({type(e).__name__}: {e})", style="dim", highlight=False, markup=False)
        return None

    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    out = total(s["tokens_out"]["estimate"] for s in stages)
    return {
        "calls": sum(s["calls"]["estimate"] for s in stages),
        "tokens_in": sum(s["tokens_in"]["estimate"] + s["tokens_in"]["cached"] for s in stages),
        "tokens_out": None if out is None else out + sum(s["tokens_out"]["cached"] for s in stages),
        "cost": total(s["cost"]["estimate"] for s in stages),
        "seconds": total(s["seconds"] for s in stages),
    }
