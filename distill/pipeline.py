"""The pipeline: generate → train → export → evaluate → report, each stage into its own folder.

A stage writes into ``<run>/.<stage>.tmp`` and is renamed to ``<run>/<stage>`` only when it
succeeds, so a failed or killed stage leaves nothing half-written under its real name. A stage
whose folder exists with the same content hash of its semantic settings is reused, not re-run.
Every entry point here holds the run folder's lock (``distill.core.locks``) while it runs, so a
second writer on the same folder is refused with the holder's name instead of corrupting it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import Recipe, content_hash
from distill.core.artifacts import write_json, write_recipe
from distill.core.errors import DistillError
from distill.core.locks import LOCK_FILE, run_lock
from distill.core.progress import console

STAGES = ("generate", "train", "export", "evaluate")

# What each stage leaves for the next one (or for the user), relative to its folder.
STAGE_PATHS = {
    "generate": {"train": "dataset/train.parquet", "eval": "dataset/eval.parquet", "shards": "shards"},
    "train": {"model": "model", "loss": "loss.json"},
    "export": {"bundle": "bundle", "variants": "variants"},
    "evaluate": {"scores": "scores.json"},
}


@dataclass
class StageResult:
    """One stage's outcome: its folder, the paths it leaves, its metrics and wall time.

    ``reused`` is True when the folder was already up to date (``seconds`` is then 0)."""

    stage: str
    dir: Path
    metrics: dict
    seconds: float = 0.0
    reused: bool = False
    paths: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self):
        if not self.paths:
            self.paths = {k: self.dir / v for k, v in STAGE_PATHS.get(self.stage, {}).items()}


@dataclass
class RunResult:
    """A pipeline run: the run folder, its report, the evaluation scores and every stage's result."""

    run_dir: Path
    report: Path
    scores: dict
    stages: dict[str, StageResult]


def stage_hash(recipe: Recipe, stage: str) -> str:
    """Content hash of everything that determines a stage's output (upstream stages included)."""
    parts = {"task": recipe.task, "teacher": recipe.teacher}
    if recipe.teachers is not None:  # several teachers: each one, its order and when, and the pick count
        parts["teachers"] = [t.model_dump(mode="json") for t in recipe.teachers]
        parts["teachers_pick"] = recipe.teachers_pick
    if stage in ("train", "export", "evaluate"):
        parts["student"] = recipe.student
    if stage in ("export", "evaluate"):
        parts["export"] = recipe.export
    if stage == "evaluate":
        parts["eval"] = recipe.eval
    return content_hash({k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in parts.items()})


ESTIMATE_FILE = "estimate.json"  # in the run folder: the plan made before the generate stage's first call


def needs_estimate(recipe: Recipe, stages: tuple[str, ...]) -> bool:
    """Whether a run of ``stages`` should plan its teacher calls first: it generates, its generate stage is
    not already done, and no estimate was made for these generate settings."""
    if "generate" not in stages or is_done(recipe.run_dir / "generate", stage_hash(recipe, "generate")):
        return False
    try:
        return json.loads((recipe.run_dir / ESTIMATE_FILE).read_text()).get("generate") != stage_hash(
            recipe, "generate"
        )
    except (OSError, ValueError):
        return True


def record_estimate(recipe: Recipe, estimate: dict | None) -> None:
    """Keep ``estimate`` (``distill.plan.estimate_totals``) in the run folder for the report's "estimate vs
    actual", tagged with the generate stage hash it was made for."""
    if estimate is not None:
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(recipe.run_dir / ESTIMATE_FILE, {**estimate, "generate": stage_hash(recipe, "generate")})


def is_done(folder: Path, digest: str) -> bool:
    """Whether ``folder`` holds a finished stage (its DONE.json) with content hash ``digest``."""
    marker = folder / "DONE.json"
    return marker.exists() and json.loads(marker.read_text()).get("hash") == digest


def _finished(folder: Path) -> float | None:
    marker = folder / "DONE.json"
    return json.loads(marker.read_text()).get("finished") if marker.exists() else None


def upstream_marks(run_dir: Path, stage: str) -> dict:
    """When each stage before ``stage`` last finished: a stage built on an upstream output that has
    since been redone (a partial generation whose failed rows were retried) is stale though its
    settings did not change."""
    return {s: _finished(run_dir / s) for s in STAGES[: STAGES.index(stage)] if (run_dir / s / "DONE.json").exists()}


def _upstream_current(run_dir: Path, stage: str) -> bool:
    """Whether ``stage``'s finished output was built on the upstream outputs there now (a folder from
    before this was recorded counts as current)."""
    recorded = json.loads((run_dir / stage / "DONE.json").read_text()).get("upstream")
    return recorded is None or recorded == upstream_marks(run_dir, stage)


@contextmanager
def stage_dir(run_dir: Path, stage: str, digest: str):
    """Yield a temp folder for the stage; on success it replaces ``run_dir/stage`` atomically."""
    final = run_dir / stage
    tmp = run_dir / f".{stage}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = {"hash": digest, "finished": time.time()}
    if stage in STAGES:
        done["upstream"] = upstream_marks(run_dir, stage)
    write_json(tmp / "DONE.json", done)
    old = run_dir / f".{stage}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _metrics(folder: Path) -> dict:
    """A stage folder's metrics.json (the evaluate stage's: its scores)."""
    f, scores = folder / "metrics.json", folder / "scores.json"
    if f.exists():
        return json.loads(f.read_text())
    return {"scores": json.loads(scores.read_text())} if scores.exists() else {}


def work_dir(recipe: Recipe, stage: str) -> Path:
    """Where a stage keeps what must survive a kill (generate: committed shards; train: checkpoints)."""
    return recipe.run_dir / f".{stage}.work-{stage_hash(recipe, stage)[:12]}"


def run_stage(recipe: Recipe, stage: str, force: bool = False, resume: bool = True, on_progress=None) -> StageResult:
    """Run one stage of ``recipe`` (its inputs must exist); returns its ``StageResult``.

    Generation commits shards and training keeps checkpoints in ``work_dir`` until the stage
    succeeds; with ``resume`` a killed run continues from there, otherwise it starts over. Holds the
    run folder's lock: another process writing there raises ``RunFolderBusy`` before anything changes.
    """
    with run_lock(recipe.run_dir):
        return _run_stage(recipe, stage, force, resume, on_progress)


def _run_stage(recipe: Recipe, stage: str, force: bool, resume: bool, on_progress) -> StageResult:
    run_dir = recipe.run_dir
    digest = stage_hash(recipe, stage)
    # A generation with failed rows (retries spent) is done enough for the next stages, but a new
    # run retries those rows from the kept work folder instead of reusing it.
    if (
        not force
        and is_done(run_dir / stage, digest)
        and not _metrics(run_dir / stage).get("failed_rows")
        and _upstream_current(run_dir, stage)
    ):
        console.print(f"[dim]{stage}: up to date in {run_dir / stage}, reusing (pass --force to redo)[/]")
        return StageResult(stage, run_dir / stage, _metrics(run_dir / stage), reused=True)
    for upstream in STAGES[: STAGES.index(stage)]:
        if stage == "evaluate" and upstream == "export" and not recipe.export.enabled:
            continue
        if not is_done(run_dir / upstream, stage_hash(recipe, upstream)):
            raise DistillError(
                f"stage {stage} needs {run_dir / upstream} from this recipe, which is missing or stale",
                f"run `distill {upstream}` (or `distill run`) with the same recipe first",
            )
    work = work_dir(recipe, stage)
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    with stage_dir(run_dir, stage, digest) as out:
        if stage == "generate":
            from distill.stages.generate import generate

            generate(recipe, out, work=work, on_progress=on_progress)
        elif stage == "train":
            from distill.stages.train import train_stage

            train_stage(recipe, run_dir / "generate", out, checkpoint_dir=work)
        elif stage == "export":
            from distill.stages.export import export_stage

            export_stage(recipe, run_dir / "train", run_dir / "generate", out)
        elif stage == "evaluate":
            from distill.stages.evaluate import evaluate_stage

            export_dir = run_dir / "export" if recipe.export.enabled else None
            evaluate_stage(recipe, run_dir / "generate", run_dir / "train", export_dir, out)
        seconds = time.time() - t0
        metrics = _metrics(out)
    if not metrics.get("failed_rows"):
        shutil.rmtree(work, ignore_errors=True)
    return StageResult(stage, run_dir / stage, metrics, seconds)


def evaluate_split(recipe: Recipe, split: str, force: bool = False) -> StageResult:
    """Evaluate the run's models on ``split`` (``train`` or a task file) into ``<run>/evaluate-<split>``;
    reused when done with the same settings and split contents. Holds the run folder's lock."""
    with run_lock(recipe.run_dir):
        return _evaluate_split(recipe, split, force)


def _evaluate_split(recipe: Recipe, split: str, force: bool) -> StageResult:
    import hashlib

    from distill.stages.evaluate import evaluate_stage

    run_dir = recipe.run_dir
    for upstream in ("generate", "train"):
        if not is_done(run_dir / upstream, stage_hash(recipe, upstream)):
            raise DistillError(
                f"evaluating on {split!r} needs {run_dir / upstream} from this recipe, which is missing or stale",
                f"run `distill {upstream}` (or `distill run`) with the same recipe first",
            )
    path = Path(split)
    ident = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else split
    name = "evaluate-" + ("".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem) or "file")
    digest = content_hash({"evaluate": stage_hash(recipe, "evaluate"), "split": ident})
    if not force and is_done(run_dir / name, digest):
        console.print(f"[dim]evaluate on {split}: up to date in {run_dir / name}, reusing (pass --force to redo)[/]")
        return StageResult("evaluate", run_dir / name, _metrics(run_dir / name), reused=True)
    export_dir = run_dir / "export"
    export_ok = recipe.export.enabled and is_done(export_dir, stage_hash(recipe, "export"))
    t0 = time.time()
    with stage_dir(run_dir, name, digest) as out:
        evaluate_stage(recipe, run_dir / "generate", run_dir / "train", export_dir if export_ok else None, out, split)
    return StageResult("evaluate", run_dir / name, _metrics(run_dir / name), time.time() - t0)


def run(
    recipe: Recipe,
    stages: tuple[str, ...] = STAGES,
    force: bool = False,
    resume: bool = True,
    allow_partial: bool = False,
    estimate: dict | None = None,
) -> RunResult:
    """Run ``stages`` in order, then write the report and print the table; holds the run folder's lock
    throughout (the stages re-enter it). ``estimate``: the teacher calls' plan (``needs_estimate``,
    ``distill.plan.estimate_totals``), recorded before the first call; the report sets it beside the actual.

    A generation whose teacher failed on some rows (retries spent) makes the run partial: the run
    stops after generate, writes the report and raises ``PartialRun`` (exit code 3 on the command
    line). With ``allow_partial`` the later stages run on the rows that succeeded and the report says
    the run is partial. Running again retries only the failed rows, and then redoes the later stages
    that learned from fewer rows."""
    created = not recipe.run_dir.exists()
    with run_lock(recipe.run_dir):
        record_estimate(recipe, estimate)
        return _run(recipe, stages, force, resume, created, allow_partial)


def _run(
    recipe: Recipe, stages: tuple[str, ...], force: bool, resume: bool, created: bool, allow_partial: bool = False
) -> RunResult:
    from distill.stages.report import print_table, write_report
    from distill.teachers.budget import PartialRun

    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_recipe(run_dir / "recipe.yaml", recipe.dump())
    results: dict[str, StageResult] = {}
    partial: PartialRun | None = None
    try:
        for stage in stages:
            if stage == "export" and not recipe.export.enabled:
                continue
            results[stage] = run_stage(recipe, stage, force, resume)  # a stage built on redone input is redone
            gen = results[stage].metrics
            if stage == "generate" and gen.get("failed_rows"):
                later = [s for s in stages[stages.index(stage) + 1 :] if s != "export" or recipe.export.enabled]
                nothing_to_train = "train" in later and not gen.get("train_rows_kept")
                if not allow_partial or nothing_to_train:
                    partial = PartialRun.from_metrics(gen, later[0] if later else None, allowed=allow_partial)
                    break
    except BaseException:
        # A run that failed before leaving anything but its recipe leaves no folder behind.
        if created and {p.name for p in run_dir.iterdir()} <= {"recipe.yaml", LOCK_FILE, ESTIMATE_FILE}:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    scores = {} if partial is not None else _read_scores(run_dir)  # a stopped run has no current scores
    timings_file = run_dir / "stage_seconds.json"
    previous = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    # A reused stage keeps the wall time it took when it actually ran.
    seconds = {k: (r.seconds if r.seconds > 0 else previous.get(k, 0.0)) for k, r in results.items()}
    write_json(timings_file, seconds)
    try:  # the plan made before the teacher's first call, when it was for this generate stage
        estimate = json.loads((run_dir / ESTIMATE_FILE).read_text())
        estimate = estimate if estimate.pop("generate", None) == stage_hash(recipe, "generate") else None
    except (OSError, ValueError):
        estimate = None
    metrics = {k: r.metrics for k, r in results.items()}
    write_report(run_dir, recipe.dump(), seconds, metrics, scores, estimate)
    if scores:
        print_table(scores, seconds)
    console.print(f"report: {run_dir / 'report.md'}")
    if partial is not None:
        raise partial
    return RunResult(run_dir, run_dir / "report.md", scores, results)


def _read_scores(run_dir: Path) -> dict:
    f = run_dir / "evaluate" / "scores.json"
    return json.loads(f.read_text()) if f.exists() else {}
