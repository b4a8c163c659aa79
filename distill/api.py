"""The Python API: the pipeline and each of its stages as functions returning result objects.

    import distill

    distill.set_env_defaults()
    result = distill.run("recipes/quickstart.yaml", overrides=["student.epochs=2"])
    result.scores["student"]["accuracy"], result.stages["export"].paths["bundle"]

A ``recipe`` is a YAML path, a ``Recipe`` (``distill.load_recipe``) or None for the defaults;
``overrides`` are ``key=value`` strings as on the command line. Errors a user can fix raise
``distill.DistillError`` with one line naming the problem and the fix. Each function holds its run
folder's lock while it runs: another process (or thread) writing the same run folder gets a
``DistillError`` naming the holder instead of corrupting it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distill.config import Recipe, load_recipe, recipe_from_dict
from distill.pipeline import STAGES, RunResult, StageResult, evaluate_split, run_stage
from distill.pipeline import run as run_pipeline

RecipeLike = str | Path | Recipe | None


def recipe_of(recipe: RecipeLike, overrides: Sequence[str] = ()) -> Recipe:
    """The validated ``Recipe`` for a path, a ``Recipe`` (overrides applied to a copy) or None (defaults)."""
    if isinstance(recipe, Recipe):
        return recipe_from_dict(recipe.dump(), list(overrides)) if overrides else recipe
    return load_recipe(recipe, list(overrides))


def run(
    recipe: RecipeLike = None,
    overrides: Sequence[str] = (),
    *,
    stages: Sequence[str] = STAGES,
    force: bool = False,
    resume: bool = True,
    allow_partial: bool = False,
) -> RunResult:
    """Run the pipeline (generate → train → export → evaluate → report); returns a ``RunResult``
    with the run folder, report path, scores and each stage's ``StageResult``. Up-to-date stages are reused.

    When the teacher failed on some rows (retries spent) the run is partial: it stops after generate
    and raises ``distill.teachers.budget.PartialRun`` (a ``DistillError``), unless ``allow_partial``:
    then it goes on with the rows that succeeded (``stages["generate"].metrics["failed_rows"]`` counts
    the others, the report says the run is partial). Calling it again retries only the failed rows."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        from distill.core.errors import DistillError

        raise DistillError(f"unknown stage(s) {unknown}", f"pick from {list(STAGES)}")
    from distill.pipeline import needs_estimate
    from distill.plan import estimate_totals

    r, stages = recipe_of(recipe, overrides), tuple(stages)
    estimate = estimate_totals(r) if needs_estimate(r, stages) else None  # the report's estimate vs actual
    return run_pipeline(r, stages, force, resume, allow_partial, estimate)


def generate(recipe: RecipeLike = None, overrides: Sequence[str] = (), *, force: bool = False) -> StageResult:
    """The teacher answers the task's problems; ``paths``: train, eval (Parquet), shards."""
    return run_stage(recipe_of(recipe, overrides), "generate", force)


def train(
    recipe: RecipeLike = None, overrides: Sequence[str] = (), *, force: bool = False, resume: bool = True
) -> StageResult:
    """Fine-tune the student on the generated data; ``paths``: model (a save_pretrained folder), loss."""
    return run_stage(recipe_of(recipe, overrides), "train", force, resume)


def export_student(recipe: RecipeLike = None, overrides: Sequence[str] = (), *, force: bool = False) -> StageResult:
    """Export the trained student to ONNX, quantize, gate; ``paths``: bundle (the folder to ship), variants."""
    return run_stage(recipe_of(recipe, overrides), "export", force)


def evaluate(
    recipe: RecipeLike = None, overrides: Sequence[str] = (), *, split: str = "eval", force: bool = False
) -> StageResult:
    """Score the run's models on ``split`` (eval, train or a task file); ``metrics["scores"]`` per model."""
    r = recipe_of(recipe, overrides)
    return run_stage(r, "evaluate", force) if split == "eval" else evaluate_split(r, split, force)
