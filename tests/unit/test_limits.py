"""The shared limits' arithmetic on a fake clock (no sleeping), and the worker-side client's batching
and fallback against a stand-in bucket (no Ray)."""

import asyncio

import pytest

from distill.teachers.limits import Limits, LimitState, LocalLimiter, SharedLimiter, bucket_name, make_limiter


def test_rpm_is_a_sliding_window():
    s = LimitState(Limits(rpm=3))
    for t in (0, 1, 2):
        assert s.wait(t, 1) == 0
        s.grant(t, 1)
    assert s.wait(3, 1) == 57  # the 4th waits until the grant at t=0 leaves the window
    assert s.wait(60, 1) == 0
    s.grant(60, 1)
    assert s.wait(60.5, 1) == 0.5  # next: when t=1 leaves
    # In any 60-s window at most 3, however the grants are spread.
    s = LimitState(Limits(rpm=3))
    times, t = [], 0.0
    while t < 300:
        if s.wait(t, 1) == 0:
            s.grant(t, 1)
            times.append(t)
        t += 0.25
    assert max(sum(1 for x in times if a <= x < a + 60) for a in times) == 3


def test_fractional_rpm_allows_whole_requests():
    s = LimitState(Limits(rpm=2.5))
    s.grant(0, 1)
    s.grant(0, 1)
    assert s.wait(1, 1) == 59


def test_tpm_reserves_the_estimate_and_the_release_corrects_it():
    s = LimitState(Limits(tpm=100))
    a = s.grant(0, 60)  # estimate: prompt + max_tokens
    assert s.wait(10, 60) == 50  # 120 > 100: wait for the first to leave
    s.release(a, 20)  # it used 20
    assert s.used == 20 and s.wait(10, 60) == 0
    b = s.grant(10, 60)
    s.release(b, 90)  # more than estimated: later requests wait longer
    assert s.wait(11, 1) == 49  # 20 + 90 + 1 > 100: the grant at t=0 has to leave first
    assert s.wait(60, 1) == 0


def test_tpm_wait_frees_only_the_oldest_grants_needed():
    s = LimitState(Limits(tpm=100))
    s.grant(0, 50)
    s.grant(5, 30)
    s.grant(9, 20)
    assert s.wait(10, 40) == 50  # 100 + 40: the grant at t=0 (50) leaving is enough
    assert s.wait(10, 80) == 55  # needs t=0 and t=5 gone
    # A request larger than the cap goes alone, once the window is empty (not never).
    assert s.wait(10, 500) == 59
    assert LimitState(Limits(tpm=100)).wait(0, 500) == 0


def test_release_after_the_window_changes_nothing():
    s = LimitState(Limits(tpm=100), lease_ttl=1000)
    a = s.grant(0, 60)
    assert s.wait(61, 100) == 0  # the grant left the window
    s.release(a, 90)
    assert s.used == 0


def test_concurrency_holds_slots_until_release_or_lease_expiry():
    s = LimitState(Limits(concurrency=2), lease_ttl=100)
    a = s.grant(0, 1)
    s.grant(1, 1)
    assert s.wait(2, 1) == 98  # both slots held: until the first lease would expire
    s.release(a)
    assert s.wait(2, 1) == 0
    s.grant(2, 1)
    assert s.wait(50, 1) == 51
    assert s.wait(101, 1) == 0  # the worker holding t=1's slot died: its lease expired


def test_retry_after_pauses_every_grant_and_only_extends():
    s = LimitState(Limits(rpm=100))
    s.pause(5, 10)
    assert s.wait(5, 1) == 10 and s.wait(14, 1) == 1 and s.wait(15, 1) == 0
    s.pause(6, 2)  # a shorter Retry-After does not cut the pause short
    assert s.paused_until == 15


def test_margin_widens_the_window():
    s = LimitState(Limits(rpm=1, margin=0.5))
    s.grant(0, 1)
    assert s.wait(60, 1) == 0.5 and s.wait(60.5, 1) == 0


def test_share_divides_the_limits_among_workers():
    assert Limits(rpm=60, tpm=1000, concurrency=8).share(4) == Limits(rpm=15, tpm=250, concurrency=2)
    assert Limits(concurrency=3).share(4).concurrency == 1  # every worker can still make progress
    assert Limits().share(4) == Limits()


def test_bucket_name_is_per_endpoint_model_and_project():
    a = bucket_name("http://h:8000/v1", "openai:m", "/p/cache.sqlite")
    assert a == bucket_name("http://h:8000/v1/", "openai:m", "/p/cache.sqlite")
    assert a != bucket_name("http://h:8001/v1", "openai:m", "/p/cache.sqlite")
    assert a != bucket_name("http://h:8000/v1", "openai:n", "/p/cache.sqlite")
    assert a != bucket_name("http://h:8000/v1", "openai:m", "/q/cache.sqlite")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_local_limiter_grants_the_prefix_that_fits_and_holds_no_longer_than_asked():
    clock = FakeClock()
    lim = LocalLimiter(Limits(rpm=3), clock=clock)

    async def run():
        assert len(await lim.acquire_many([1] * 5, hold=0)) == 3
        assert await lim.acquire_many([1], hold=0) == []  # would wait: hold 0 returns at once
        clock.t = 60
        return await lim.acquire_many([1] * 5, hold=0)

    assert len(asyncio.run(run())) == 3
    # The state outlives event loops: a second asyncio.run (the next batch) is no fresh window.
    assert asyncio.run(lim.acquire_many([1], hold=0)) == []


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeBucket:
    """A stand-in for the bucket actor's handle: ``method.remote(...)`` returns an awaitable."""

    def __init__(self, limits: Limits, broken: bool = False):
        self.limiter = LocalLimiter(limits)
        self.calls = 0
        self.released: list = []
        self.broken = broken
        self.acquire = _Method(self._acquire)
        self.release = _Method(self._release)
        self.pause = _Method(self.limiter.pause)

    def _release(self, items):
        self.released += items
        for lease, tokens in items:
            self.limiter.release(lease, tokens)

    async def _acquire(self, estimates, hold):
        self.calls += 1
        if self.broken:
            await asyncio.sleep(10)  # never answers within the client's timeout
        return await self.limiter.acquire_many(estimates, hold)


def test_shared_limiter_batches_waiting_requests_into_one_call():
    bucket = FakeBucket(Limits(concurrency=16))
    lim = SharedLimiter(bucket, Limits(concurrency=4), ttl=60)

    async def run():
        leases = await asyncio.gather(*(lim.acquire(10) for _ in range(12)))
        for lease in leases:
            lim.release(lease, 5)
        await asyncio.sleep(0)  # the batched release goes out on the next loop turn
        return leases

    leases = asyncio.run(run())
    assert all(shared for shared, _ in leases) and bucket.calls == 1
    assert len(bucket.released) == 12 and bucket.limiter.state.leases == {}


def test_shared_limiter_falls_back_to_its_share_when_the_bucket_stops_answering():
    clock = FakeClock()
    bucket = FakeBucket(Limits(rpm=8, concurrency=8))
    lim = SharedLimiter(
        bucket, Limits(rpm=8, concurrency=8).share(4), ttl=60, hold=0.05, call_timeout=0.05, clock=clock
    )

    async def before():
        a = await lim.acquire(1)
        b = await lim.acquire(1)
        lim.release(a, 1)
        return b

    b = asyncio.run(before())  # one done, one still in flight, when the bucket goes
    bucket.broken = True
    clock.t = 1
    with pytest.raises(asyncio.TimeoutError):  # its share (2 a window, 2 in flight) is spent by the two
        asyncio.run(asyncio.wait_for(lim.acquire(1), 0.5))
    assert lim.failure and "TimeoutError" in lim.failure and bucket.calls == 3
    assert lim.local.state.limits == Limits(rpm=2, concurrency=2)  # 8 over 4 workers
    assert len(lim.local.state.grants) == 2 and len(lim.local.state.leases) == 1
    lim.release(b, 1)  # the bucket's lease in flight at the switch frees its local slot
    assert lim.local.state.leases == {}
    clock.t = 61  # a window later the share is this worker's again

    async def after():
        return await asyncio.gather(*(lim.acquire(1) for _ in range(2)))

    leases = asyncio.run(after())
    assert [shared for shared, _ in leases] == [False, False]  # from the in-process limiter
    assert bucket.calls == 3  # never asked again: a new bucket would not know the last window


@pytest.mark.parametrize("bucket", [None, "some-bucket"])
def test_make_limiter_without_ray_is_in_process(bucket):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray cluster is running in this session")
    # No Ray running: the bucket cannot be opened, so a worker of 4 keeps to a quarter.
    lim = make_limiter(Limits(rpm=60), ttl=60, bucket=bucket, workers=4)
    assert isinstance(lim, LocalLimiter)
    assert lim.state.limits.rpm == (60 if bucket is None else 15)
