"""What `distill jobs` shows and decides from the store's rows alone: queue order and waiting reasons,
whether the scheduler has work, the estimate-vs-actual lines, several teachers and batch-API progress."""

from distill.jobs import _can_progress, estimate_lines, queue_label, queue_order, status_lines, waiting_reason


def _job(i, state="queued", priority=0, after=(), run_dir=None, **extra):
    return {
        "id": f"j{i}",
        "state": state,
        "priority": priority,
        "after": list(after),
        "created": float(i),
        "run_dir": run_dir or f"/runs/{i}",
        "recipe": "r.yaml",
        "overrides": [],
        "progress": {},
        "error": None,
        "log": f"/logs/{i}.log",
        "estimate": None,
        "started": None,
        "finished": None,
        **extra,
    }


def test_priority_then_age_and_why_a_job_waits():
    jobs = [
        _job(1, "running", run_dir="/runs/shared"),
        _job(2),
        _job(3, priority=5),
        _job(4, after=["j2"]),
        _job(5, run_dir="/runs/shared"),
        _job(6, "paused"),
    ]
    assert [j["id"] for j in queue_order(jobs)] == ["j3", "j2", "j4", "j5"]
    assert [queue_label(j, jobs) for j in jobs] == [
        "running",
        "queued 2",
        "queued 1",
        "queued, after j2 (queued)",
        "queued, run folder in use by job j1",
        "paused",
    ]
    assert waiting_reason(jobs[3], [*jobs[:1], {**jobs[1], "state": "done"}, *jobs[2:]]) is None
    assert waiting_reason(_job(7, after=["gone"]), jobs) is None  # an id no longer in the store is done


def test_the_scheduler_has_work_only_when_something_can_start():
    assert not _can_progress([])
    assert _can_progress([_job(1)])
    assert _can_progress([_job(1, "starting")])  # a claimed job still waits for its runner
    assert not _can_progress([_job(1, "paused"), _job(2, "done")])
    # waits on a running job: stay up to start it when that one ends
    assert _can_progress([_job(1, "running"), _job(2, after=["j1"])])
    # waits only on a failed or paused job: that needs a user (`resume`), not the scheduler
    assert not _can_progress([_job(1, "failed"), _job(2, after=["j1"])])
    assert not _can_progress([_job(1, "paused"), _job(2, after=["j1"])])


def test_estimate_vs_actual_of_a_finished_job():
    job = _job(
        1,
        "done",
        started=100.0,
        finished=190.0,
        estimate={"calls": 40, "tokens_in": 2000, "tokens_out": 5000, "cost": 0.5, "seconds": 60.0},
        progress={"tokens_in": 2100, "tokens_out": 4000, "paid_cost": 0.45, "calls": 44},
    )
    lines = estimate_lines(job)
    assert lines[0] == "  estimate vs actual"
    assert lines[1].split() == ["calls", "40", "est.", "44", "actual", "(1.10×)"]
    assert lines[3].split() == ["tokens", "out", "5,000", "est.", "4,000", "actual", "(0.80×)"]
    assert lines[5].split() == ["time", "1m", "00s", "est.", "1m", "30s", "actual", "(1.50×)"]
    assert estimate_lines({**job, "estimate": None}) == []
    unknown = estimate_lines({**job, "estimate": {**job["estimate"], "tokens_out": None}})
    assert unknown[3].split() == ["tokens", "out", "—", "est.", "4,000", "actual"]


def test_several_teachers_and_batches_in_the_status():
    batches = [{"id": f"batch_{i}", "status": "completed", "requests": 8} for i in range(5)]
    job = _job(1, "running", progress={"teacher": "big", "rows": 3, "total": 8, "batches": batches})
    text = "\n".join(status_lines(job))
    assert "  teacher  big (rows below count this teacher's problems)" in text
    assert "  rows     3/8 done" in text
    assert "  batches  batch_1 completed (8 requests), batch_2" in text and "and 1 earlier" in text
