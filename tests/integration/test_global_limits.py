"""Limits that hold for the whole job: four Ray actors against a real `distill serve` behind the fault
proxy, which records when each request reaches it. The requests-per-minute cap holds in every sliding
60-s window across all actors, and one 429's Retry-After stops every actor until it has passed."""

import asyncio
import os
import threading
import time

import pytest
import ray
from faultproxy import FaultProxy
from serving import served

from distill.config import TeacherConfig
from distill.core.answers import Task
from distill.core.problems import load_problems
from distill.teachers.limits import NAMESPACE, bucket_name
from distill.teachers.workers import run_teacher

pytestmark = pytest.mark.integration


class _Script:
    """Stands in for the proxy's random generator: a fault exactly on the listed request numbers."""

    def __init__(self, proxy: "RecordingProxy", fail_on: set[int]):
        self.proxy, self.fail_on = proxy, fail_on

    def random(self) -> float:
        return 0.0 if len(self.proxy.arrivals) in self.fail_on else 1.0


class RecordingProxy(FaultProxy):
    """The fault proxy, noting each API request's arrival time, answering 429 with ``Retry-After:
    retry_after`` on the requests numbered in ``fail_on`` (1-based) and forwarding all others, each
    ``delay`` seconds late (a slower endpoint: requests in flight then hold their slots a while)."""

    def __init__(self, upstream: str, fail_on: set[int] = frozenset(), retry_after: float = 0.2, delay: float = 0.0):
        super().__init__(upstream, rate=0.5, seed=0, hang=1.0, faults=("429",))
        self.rng = _Script(self, set(fail_on))
        self.retry_after, self.delay = retry_after, delay
        self.arrivals: list[float] = []
        self.limited: list[float] = []  # when each 429 was written
        self.open: set = set()  # the handlers of requests not yet answered
        self.peak = 0  # the most requests in flight at once
        self.in_flight: list[tuple[float, int]] = []  # (arrival, requests in flight with it)

    async def _read_request(self, reader):
        req = await super()._read_request(reader)
        if req and req[1].startswith("/v1"):
            self.arrivals.append(time.monotonic())
            self.open.add(asyncio.current_task())
            self.peak = max(self.peak, len(self.open))
            self.in_flight.append((self.arrivals[-1], len(self.open)))
        return req

    async def handle(self, reader, writer):
        try:
            await super().handle(reader, writer)
        finally:  # the reply is written (no await since): its client may send the next one now
            self.open.discard(asyncio.current_task())

    async def _forward(self, method, path, headers, body):
        await asyncio.sleep(self.delay)
        return await super()._forward(method, path, headers, body)

    def _response(self, status, body, ctype="application/json", extra=None, length=None):
        if status == 429:
            extra = {**(extra or {}), "Retry-After": f"{self.retry_after:g}"}
            self.limited.append(time.monotonic())
        return FaultProxy._response(status, body, ctype, extra, length)


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_SERVE_TOKEN"}  # loopback: no token needed
    with served(tiny_teacher, tmp_path_factory.mktemp("serve") / "serve.log", env) as url:
        yield url


def _start(proxy: RecordingProxy) -> tuple[str, callable]:
    """Run the proxy on its own event loop in a thread; returns its URL and a stop function."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(proxy.handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()

    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", stop


def _job(base: str, tmp_path, task_cfg, n: int, **limits) -> tuple[list[dict], str]:
    """``n`` problems answered by 4 Ray actors through ``run_teacher``; (rows, the bucket's name)."""
    task_cfg = task_cfg.model_copy(update={"train_size": n, "eval_size": 2})
    train, evals = load_problems(task_cfg)
    problems = (train + evals)[:n]
    cfg = TeacherConfig(
        model="openai:tiny",
        base_url=base + "/v1",
        executor="ray",
        workers=4,
        batch_size=max(1, n // 4),
        max_new_tokens=16,
        keep="all",
        max_retries=3,
        request_timeout=20,
        **limits,
    )
    cache = str(tmp_path / "cache.sqlite")
    kwargs = dict(model_path="", teacher_cfg=cfg, task=Task.from_config(task_cfg), cache_path=cache)
    rows: list[dict] = []
    run_teacher(problems, kwargs, cfg, lambda t: rows.extend(t.to_pylist()))
    return rows, bucket_name(cfg.base_url, cfg.model, cache)


def _stats(name: str) -> dict:
    return ray.get(ray.get_actor(name, namespace=NAMESPACE).stats.remote())


def _most_in_a_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if a <= t < a + window) for a in times)


def test_requests_per_minute_hold_across_four_actors(server, ray_cluster, tiny_task_cfg, tmp_path):
    """20 rpm for the job, not per actor (4 actors on their own would send 80): the job's ~26 requests
    need two windows, and no sliding 60 s holds more than 20 of them."""
    proxy = RecordingProxy(server)
    base, stop = _start(proxy)
    try:
        t0 = time.monotonic()
        rows, name = _job(base, tmp_path, tiny_task_cfg, 24, requests_per_minute=20, concurrency=4)
        wall = time.monotonic() - t0
    finally:
        stop()
    times = sorted(proxy.arrivals)
    most = _most_in_a_window(times)
    gaps = [b - a for a, b in zip(times, times[20:])]
    print(
        f"{len(times)} requests in {wall:.1f}s; most in any 60-s window {most}; "
        f"min gap i..i+20 {min(gaps):.3f}s; most in flight {proxy.peak}"
    )
    assert len(rows) == 24 and not any(r["error"] for r in rows)
    assert len(times) > 20, "the job must need more than one window"
    assert most <= 20
    assert min(gaps) >= 60.0
    assert proxy.peak <= 4  # teacher.concurrency is the job's too
    stats = _stats(name)
    assert stats["granted"] == len(times)  # every request went through the one shared bucket
    assert stats["in_flight"] == 0  # every lease came back


def test_retry_after_pauses_every_actor(server, ray_cluster, tiny_task_cfg, tmp_path):
    """The 6th request is answered 429 with Retry-After: 3; from then on no actor sends anything until
    the 3 s have passed. The endpoint answers in 0.3 s, so without the shared pause the other
    actors' requests would keep arriving every few tens of milliseconds."""
    proxy = RecordingProxy(server, fail_on={6}, retry_after=3.0, delay=0.3)
    base, stop = _start(proxy)
    try:
        rows, name = _job(base, tmp_path, tiny_task_cfg, 20, concurrency=4)
    finally:
        stop()
    assert len(proxy.limited) == 1
    t429 = proxy.limited[0]
    during = [t - t429 for t in proxy.arrivals if t429 < t < t429 + 3.0]
    after = [t for t in proxy.arrivals if t >= t429 + 3.0]
    print(f"{len(proxy.arrivals)} requests; within 3 s of the 429 at +{[round(d, 3) for d in during]}")
    assert len(rows) == 20 and not any(r["error"] for r in rows)
    assert all(d < 0.05 for d in during), during  # at most ones already on their way when the 429 came
    assert len(after) >= 12  # the job was far from done: the pause held back real work
    assert _stats(name)["granted"] == len(proxy.arrivals) and proxy.peak <= 4


def test_job_survives_the_bucket_dying(server, ray_cluster, tiny_task_cfg, tmp_path):
    """The bucket actor killed mid-job: every worker falls back to its share in process (here one
    request in flight each, a quarter of the job's 4), counting its requests still in flight, and the
    job finishes with every row answered."""
    proxy = RecordingProxy(server, delay=0.2)
    base, stop = _start(proxy)
    killed: list[float] = []

    def kill_after_five():
        name = bucket_name(base + "/v1", "openai:tiny", str(tmp_path / "cache.sqlite"))
        while len(proxy.arrivals) < 5:
            time.sleep(0.01)
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        killed.append(time.monotonic())

    killer = threading.Thread(target=kill_after_five, daemon=True)
    killer.start()
    try:
        rows, name = _job(base, tmp_path, tiny_task_cfg, 24, concurrency=4)
    finally:
        stop()
    assert killed and len(rows) == 24 and not any(r["error"] for r in rows)
    # At the switch a worker with more in flight than its share waits for them, the others may each
    # send one: at most 4 + 3. Once those are answered (0.2 s each here, 0.6 s allowed), the job's 4 hold again.
    settled = [n for t, n in proxy.in_flight if t > killed[0] + 0.6]
    print(f"most in flight {proxy.peak}; after the switch settled {max(settled, default=0)} ({len(settled)} requests)")
    assert proxy.peak <= 7 and settled and max(settled) <= 4
    with pytest.raises(ValueError, match="Failed to look up actor"):
        _stats(name)  # gone for good: the workers did not make a new one mid-job
