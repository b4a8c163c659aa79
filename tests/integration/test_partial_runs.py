"""Partial runs against real failing teachers: the OpenAI-compatible backend pointed at a loopback
port where nothing listens, and a real `distill serve` of the tiny teacher. No mock objects.

A row whose teacher call failed (retries spent) is no wrong answer: it counts in no accuracy, the
run says loudly that it is partial (exit code 3), `distill run` stops before training unless
`--allow-partial`, and running the same command again retries only the failed rows."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from serving import free_port, served
from tiny import write_recipe

pytestmark = pytest.mark.integration

PARTIAL = 3


def _cli(*args, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lines(r: subprocess.CompletedProcess, start: str) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(start)]


def _summary(r: subprocess.CompletedProcess) -> str:
    """The generate stage's one summary line."""
    found = _lines(r, "generate: kept")
    assert len(found) == 1, r.stdout + r.stderr
    return found[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    jobs = tmp_path_factory.mktemp("jobs") / "jobs.sqlite"
    out = {k: v for k, v in os.environ.items() if k not in ("DISTILL_SERVE_TOKEN", "OPENAI_API_KEY")}
    return {**out, "DISTILL_JOBS_DB": str(jobs)}


@pytest.fixture(scope="module")
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture(scope="module")
def server(tiny_teacher, env, tmp_path_factory):
    """`distill serve` of the tiny teacher on loopback (no token); yields (base url, its access log)."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with served(tiny_teacher, log_path, env) as url:
        yield url + "/v1", log_path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_task_cfg, tiny_student, dead_url) -> Path:
    """A tiny run whose teacher endpoint is down: one attempt per row, no backoff to sit through."""
    teacher = {
        "model": "openai:tiny",
        "base_url": dead_url,
        "max_retries": 0,
        "retry_base": 0.01,
        "request_timeout": 10.0,
        "max_new_tokens": 24,
        "batch_size": 8,
        "executor": "local",
    }
    student = {
        "model": f"hf:{tiny_student}",
        "epochs": 1,
        "lr": 3e-3,
        "batch_size": 4,
        "micro_batch_size": 2,
        "max_length": 128,
        "eval_max_new_tokens": 8,
    }
    root = tmp_path_factory.mktemp("partial")
    return write_recipe(
        root,
        "partial",
        tiny_task_cfg,
        teacher,
        student,
        export={"enabled": False},
        eval={"models": ["teacher", "student"]},
    )


def _run_dir(recipe: Path, name: str) -> Path:
    return recipe.parent / "runs" / name


def test_generate_with_every_row_failing_is_partial_not_wrong(recipe, env):
    r = _cli("generate", recipe, "name=dead", cwd=recipe.parent, env=env)
    assert r.returncode == PARTIAL, r.stdout + r.stderr
    line = _summary(r)
    assert "kept 0/12 train rationales" in line and "18 rows FAILED" in line, line
    assert "ClientConnectorError" in line and "×18" in line and "rerun the same command" in line, line
    # No teacher accuracy is made up from rows that never got an answer.
    assert "no teacher eval accuracy" in line and "0.0%" not in r.stdout + r.stderr
    assert len(_lines(r, "partial:")) == 1 and not _lines(r, "error:")
    gen = _run_dir(recipe, "dead") / "generate"
    metrics = json.loads((gen / "metrics.json").read_text())
    assert metrics["partial"] and metrics["failed_rows"] == 18
    assert (metrics["failed_train_rows"], metrics["failed_eval_rows"]) == (12, 6)
    assert metrics["teacher_eval_accuracy"] is None and metrics["teacher_eval_n"] == 0
    assert len(metrics["failures"]) == 1 and metrics["failures"][0]["rows"] == 18
    assert metrics["failures"][0]["reason"].startswith("ClientConnectorError")
    # Every row is recorded with its reason, none dropped.
    rows = pq.read_table(gen / "shards").to_pylist()
    assert len(rows) == 18 and all(row["error"] for row in rows)


def test_run_stops_before_train_with_one_line(recipe, env):
    r = _cli("run", recipe, "name=stop", cwd=recipe.parent, env=env)
    assert r.returncode == PARTIAL, r.stdout + r.stderr
    (stop,) = _lines(r, "partial:")
    assert "18 of 18 rows" in stop and "ClientConnectorError" in stop and "stopped before train" in stop, stop
    assert "rerun the same command to retry only the failed rows" in stop, stop
    assert "--allow-partial" not in stop  # nothing succeeded: there is nothing to go on with
    assert not _lines(r, "error:")
    run_dir = _run_dir(recipe, "stop")
    assert (run_dir / "generate" / "DONE.json").exists() and not (run_dir / "train").exists()
    assert "**Partial run:**" in (run_dir / "report.md").read_text()


def test_api_raises_partial_run(recipe, env):
    import distill
    from distill.teachers.budget import PartialRun

    with pytest.raises(PartialRun) as e:
        distill.run(recipe, ["name=api"])
    assert isinstance(e.value, distill.DistillError) and e.value.exit_code == PARTIAL
    assert "18 of 18 rows" in str(e.value) and "stopped before train" in str(e.value)
    assert not (_run_dir(recipe, "api") / "train").exists()


def test_partial_job_status_counts_the_reasons(recipe, env):
    from distill.jobs import JobStore

    r = _cli("jobs", "submit", recipe, "name=job", cwd=recipe.parent, env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[-1]
    store = JobStore(Path(env["DISTILL_JOBS_DB"]))
    for _ in range(600):
        if store.get(job)["state"] not in ("queued", "starting", "running"):
            break
        time.sleep(0.2)
    assert store.get(job)["state"] == "partial", store.get(job)
    shown = _cli("jobs", "status", job, cwd=recipe.parent, env=env).stdout
    (failed,) = [ln for ln in shown.splitlines() if ln.strip().startswith("FAILED")]
    assert "18 rows" in failed and "ClientConnectorError" in failed and "×18" in failed, shown
    assert f"distill jobs resume {job}" in failed


def _requests(log: Path) -> int:
    """Teacher requests `distill serve` answered so far (one access-log line each)."""
    return sum("/v1/chat/completions" in ln for ln in log.read_text().splitlines())


def test_allow_partial_trains_on_what_succeeded_then_rerun_retries_only_the_failed(recipe, env, server):
    """Deterministic partial failure: the completion cache holds the answers to 10 of the 18 problems
    (a smaller task through the live server), the endpoint is then down, so exactly those 10 rows succeed."""
    live, log = server
    cwd, run_dir = recipe.parent, _run_dir(recipe, "mixed")
    # 6 of the 12 train problems and 4 of the 6 eval ones, answered by the live teacher into the cache.
    prefill = ("name=prefill", "task.train_size=6", "task.eval_size=4", f"teacher.base_url={live}")
    r = _cli("generate", recipe, *prefill, cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    per_problem = _requests(log) / 10

    r = _cli("run", recipe, "name=mixed", cwd=cwd, env=env)
    assert r.returncode == PARTIAL, r.stdout + r.stderr
    (stop,) = _lines(r, "partial:")
    assert "8 of 18 rows" in stop and "stopped before train" in stop and "--allow-partial" in stop, stop
    line = _summary(r)
    assert "on 4 of 6 eval problems" in line and "8 rows FAILED" in line and "×8" in line, line
    metrics = json.loads((run_dir / "generate" / "metrics.json").read_text())
    evals = pq.read_table(run_dir / "generate" / "dataset" / "eval.parquet").to_pylist()
    answered = [e for e in evals if e["error"] is None]
    assert len(answered) == metrics["teacher_eval_n"] == 4 and metrics["failed_eval_rows"] == 2
    assert metrics["teacher_eval_accuracy"] == sum(e["correct"] for e in answered) / 4  # failed rows not wrong
    assert f"teacher eval accuracy {metrics['teacher_eval_accuracy']:.1%} on 4 of 6" in line
    assert metrics["train_rows_kept"] > 0 and not (run_dir / "train").exists()

    r = _cli("run", recipe, "name=mixed", "--allow-partial", cwd=cwd, env=env)
    assert r.returncode == PARTIAL, r.stdout + r.stderr
    (went_on,) = _lines(r, "partial:")
    assert "8 of 18 rows" in went_on and "learned from the rows that succeeded" in went_on, went_on
    assert (run_dir / "train" / "DONE.json").exists() and (run_dir / "evaluate" / "DONE.json").exists()
    teacher = json.loads((run_dir / "evaluate" / "scores.json").read_text())["teacher"]
    assert (teacher["n"], teacher["failed"]) == (4, 2) and teacher["accuracy"] == metrics["teacher_eval_accuracy"]
    report = (run_dir / "report.md").read_text()
    assert "**Partial run:**" in report and "--allow-partial" in report and "8 of 18 rows" in report
    assert f"({teacher['correct']}/4)" in report
    trained_at = json.loads((run_dir / "train" / "DONE.json").read_text())["finished"]

    # The endpoint is back: only the 8 failed rows are asked again, the run completes, and the stages
    # that learned from the partial data are redone.
    before = _requests(log)
    r = _cli("run", recipe, "name=mixed", f"teacher.base_url={live}", cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10 rows already committed, 8 to go" in r.stdout + r.stderr
    assert _requests(log) - before == 8 * per_problem
    assert "FAILED" not in _summary(r) and not _lines(r, "partial:")
    assert json.loads((run_dir / "generate" / "metrics.json").read_text())["failed_rows"] == 0
    assert json.loads((run_dir / "train" / "DONE.json").read_text())["finished"] > trained_at
    teacher = json.loads((run_dir / "evaluate" / "scores.json").read_text())["teacher"]
    assert teacher["n"] == 6 and "failed" not in teacher
    assert "Partial run" not in (run_dir / "report.md").read_text()


def test_a_stage_built_on_a_partial_generation_is_redone_after_the_retry(recipe, env, server):
    """`distill train` on its own (not only `distill run`) redoes a student trained on a partial
    generation once `distill generate` has retried its failed rows; the ablation refuses partial data."""
    live, _ = server
    cwd, run_dir = recipe.parent, _run_dir(recipe, "stale")
    other = ("task.seed=7", "teacher.keep=all")  # problems the earlier tests did not put in the cache
    r = _cli(
        "generate",
        recipe,
        "name=prefill7",
        *other,
        "task.train_size=6",
        "task.eval_size=4",
        f"teacher.base_url={live}",
        cwd=cwd,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("run", recipe, "name=stale", *other, "--allow-partial", cwd=cwd, env=env)
    assert r.returncode == PARTIAL, r.stdout + r.stderr
    r = _cli("ablate", recipe, "name=stale", *other, "--formats", "label", cwd=cwd, env=env)
    assert r.returncode == PARTIAL and "the ablation stopped before training its students" in r.stdout + r.stderr
    trained_at = json.loads((run_dir / "train" / "DONE.json").read_text())["finished"]
    r = _cli("generate", recipe, "name=stale", *other, f"teacher.base_url={live}", cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("train", recipe, "name=stale", *other, cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train: up to date" not in r.stdout + r.stderr
    done = json.loads((run_dir / "train" / "DONE.json").read_text())
    assert done["finished"] > trained_at
    assert done["upstream"]["generate"] == json.loads((run_dir / "generate" / "DONE.json").read_text())["finished"]
    r = _cli("train", recipe, "name=stale", *other, cwd=cwd, env=env)  # now current: reused
    assert "train: up to date" in r.stdout + r.stderr
