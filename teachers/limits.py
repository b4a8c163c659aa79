"""Request, token and concurrency limits that hold for a whole job, not for each worker.

An endpoint's limits (``teacher.requests_per_minute``, ``tokens_per_minute``, ``concurrency``) are the
endpoint's, so N Ray actors that each count their own requests send N times the limit. The count
lives in one place instead:

* ``LimitState``: the arithmetic (a sliding-window log of grants, leases for the requests in flight,
  a pause), with the time passed in, so it is tested with a fake clock.
* ``LocalLimiter``: that state behind an asyncio wait, for one process (``executor: local``, a plain
  script) and inside the bucket actor.
* ``LimitBucket``: one named Ray actor per job holding a ``LocalLimiter``; ``SharedLimiter`` is a
  worker's client of it. One remote call grants every request a worker has waiting (a burst of
  requests in one worker costs one call); releases, with the real token usage, go back batched and
  unawaited.

A sliding-window log, not a refilling token bucket: a bucket refilled at rpm/60 per second lets a
full bucket's burst and a minute's refill through within one minute (twice the cap in a sliding 60-s
window); the log grants a request only when fewer than ``rpm`` were granted in the last ``window``
seconds, which is what an endpoint counting a sliding minute checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("distill.teachers.limits")

NAMESPACE = "distill"  # named actors are per Ray namespace; a fixed one lets jobs of one project find each other's
INF = float("inf")
# Seconds added to an HTTP endpoint's window: the time from a grant to the request reaching the
# server varies (a Ray reply, a new connection), and the server counts arrivals, not grants.
SEND_MARGIN = 0.25


@dataclass(frozen=True)
class Limits:
    """What an endpoint allows (0 = no cap): requests and tokens per ``window`` seconds, requests in flight.

    ``margin`` is added to the window before a grant leaves it: a request reaches the server a moment
    after it is granted, and an early request delayed more than a later one would otherwise put
    ``rpm + 1`` into the server's own sliding window."""

    rpm: float = 0
    tpm: float = 0
    concurrency: int = 0
    window: float = 60.0
    margin: float = 0.0

    def share(self, workers: int) -> Limits:
        """One of ``workers`` workers' part of the limits, for when the shared count is gone: every
        worker on 1/N keeps the job under its limits (slower only while some workers are idle)."""
        n = max(1, workers)
        concurrency = max(1, self.concurrency // n) if self.concurrency else 0
        return replace(self, rpm=self.rpm / n, tpm=self.tpm / n, concurrency=concurrency)

    @property
    def capped(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)


def lease_ttl(request_timeout: float) -> float:
    """How long a granted request holds its concurrency slot at most: its attempt ends within the
    request timeout, so a slot still held well after that belongs to a worker that died."""
    return request_timeout + 60.0


class _Grant:
    __slots__ = ("time", "tokens", "live")

    def __init__(self, t: float, tokens: int):
        self.time, self.tokens, self.live = t, tokens, True


class LimitState:
    """The limits' bookkeeping, no clock and no I/O of its own: every call takes ``now``.

    Grants are logged in time order with their token estimate; ``release`` swaps in the real usage
    (estimates are prompt + ``max_tokens``, so usually too high: correcting them gives the window
    back). A lease is a request in flight: it holds a concurrency slot until released, or until
    ``lease_ttl`` passes (its worker died). ``pause`` (a ``Retry-After``) holds every grant until then."""

    def __init__(self, limits: Limits, lease_ttl: float = 600.0):
        self.limits = limits
        self.lease_ttl = lease_ttl
        self.grants: deque[_Grant] = deque()
        self.used = 0  # tokens of the grants in ``self.grants``
        self.leases: dict[int, tuple[float, _Grant]] = {}  # lease id -> (expiry, its grant)
        self.paused_until = -INF
        self.granted = 0
        self._ids = itertools.count(1)

    def _expire(self, now: float) -> None:
        span = self.limits.window + self.limits.margin
        while self.grants and now - self.grants[0].time >= span:
            g = self.grants.popleft()
            g.live = False
            self.used -= g.tokens
        for lid in [lid for lid, (exp, _) in self.leases.items() if exp <= now]:
            del self.leases[lid]

    def wait(self, now: float, tokens: int) -> float:
        """Seconds until a request estimated at ``tokens`` may go (0: now). A request larger than the
        whole token cap goes alone, once the window is empty, rather than never."""
        self._expire(now)
        lim = self.limits
        span = lim.window + lim.margin
        waits = [self.paused_until - now]
        if lim.rpm:
            k = max(1, int(lim.rpm))  # whole requests: 20.5 rpm allows 20 in any window
            if len(self.grants) >= k:
                waits.append(self.grants[-k].time + span - now)
        if lim.tpm and self.grants and self.used + tokens > lim.tpm:
            over = self.used + tokens - lim.tpm
            for g in self.grants:  # the oldest grants that have to leave the window first
                over -= g.tokens
                if over <= 0:
                    break
            waits.append(g.time + span - now)
        if lim.concurrency and len(self.leases) >= lim.concurrency:
            waits.append(min(exp for exp, _ in self.leases.values()) - now)  # a release wakes waiters sooner
        return max(0.0, *waits)

    def grant(self, now: float, tokens: int) -> int:
        """Log a request going now (call when ``wait`` says 0); returns its lease id."""
        g = _Grant(now, tokens)
        self.grants.append(g)
        self.used += tokens
        self.granted += 1
        lid = next(self._ids)
        self.leases[lid] = (now + self.lease_ttl, g)
        return lid

    def release(self, lease: int, tokens: int | None = None) -> None:
        """The request is done: free its slot and, given its real usage, correct its grant's tokens."""
        entry = self.leases.pop(lease, None)
        if entry is None or tokens is None:
            return
        g = entry[1]
        if g.live:
            self.used += tokens - g.tokens
            g.tokens = tokens

    def pause(self, now: float, seconds: float) -> None:
        """No grant before ``now + seconds`` (a later pause can only extend it)."""
        self.paused_until = max(self.paused_until, now + seconds)


class LocalLimiter:
    """``LimitState`` for one event loop at a time: waiters queue in order (an asyncio lock is FIFO),
    the first sleeps until its request fits or a release or pause changes the answer.

    The state outlives event loops (each ``OpenAIBackend.generate`` runs its own), so a batch does not
    start a fresh window; the lock and wake-up event are made per loop."""

    def __init__(self, limits: Limits, lease_ttl: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.state = LimitState(limits, lease_ttl)
        self.clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._lock, self._changed = loop, asyncio.Lock(), asyncio.Event()

    async def acquire_many(self, estimates: list[int], hold: float = INF) -> list[int]:
        """Leases for the longest prefix of ``estimates`` that may go: waits (at most ``hold`` seconds,
        then returns none) for the first, then takes every following one that fits at once."""
        if not estimates:
            return []
        self._bind()
        async with self._lock:
            deadline = self.clock() + hold
            while (w := self.state.wait(now := self.clock(), estimates[0])) > 0:
                if now >= deadline:
                    return []
                self._changed.clear()
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(w, deadline - now))
            leases = [self.state.grant(now, estimates[0])]
            for tokens in estimates[1:]:
                if self.state.wait(now, tokens) > 0:
                    break
                leases.append(self.state.grant(now, tokens))
            return leases

    async def acquire(self, tokens: int) -> Any:
        """Wait until one request estimated at ``tokens`` may go; returns its lease for ``release``."""
        return (await self.acquire_many([tokens]))[0]

    def release(self, lease: Any, tokens: int | None = None) -> None:
        self.state.release(lease, tokens)
        if self._loop is not None:
            self._changed.set()

    def pause(self, seconds: float) -> None:
        self.state.pause(self.clock(), seconds)
        if self._loop is not None:
            self._changed.set()

    def flush(self) -> None:
        """Nothing is buffered in process (``SharedLimiter`` sends its releases here)."""


class LimitBucket:
    """The job's limits as a Ray actor (async: waiting grants do not block releases or other workers).
    The clock is the actor's own, so workers' clocks never have to agree."""

    def __init__(self, limits: Limits, lease_ttl: float):
        self.limiter = LocalLimiter(limits, lease_ttl)

    async def configure(self, limits: Limits) -> Limits:
        """Set the limits (the driver, at each run's start: a rerun with new limits gets them)."""
        self.limiter.state.limits = limits
        self.limiter.pause(0)  # wake waiters: their wait may be shorter now
        return limits

    async def acquire(self, estimates: list[int], hold: float) -> list[int]:
        return await self.limiter.acquire_many(estimates, hold)

    async def release(self, items: list[tuple[int, int | None]]) -> None:
        for lease, tokens in items:
            self.limiter.release(lease, tokens)

    async def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)

    async def stats(self) -> dict:
        s = self.limiter.state
        return {
            "granted": s.granted,
            "in_flight": len(s.leases),
            "paused_for": max(0.0, s.paused_until - time.monotonic()),
            "limits": s.limits,
        }


_remote_bucket = None
_held: dict[str, Any] = {}  # name -> handle: a non-detached actor lives while a handle to it does


def _bucket_actor():
    global _remote_bucket
    if _remote_bucket is None:
        import ray

        _remote_bucket = ray.remote(LimitBucket)
    return _remote_bucket


def bucket_name(base_url: str, model: str, cache_path: str) -> str:
    """The bucket's name: one per endpoint, served model and project (completion cache).

    An endpoint's limits are its account's, which no recipe names (keys stay out of everything), so
    the cache stands in for it: jobs of one project against one endpoint share a budget (two jobs at
    once stay under the limit together), other projects on the same cluster keep their own."""
    key = json.dumps([base_url.rstrip("/"), model, str(cache_path)])
    return "distill-limits-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def open_bucket(name: str, limits: Limits, ttl: float, create: bool = False, timeout: float = 60.0):
    """The named bucket actor, or None when Ray is not running or it does not answer in ``timeout`` s.

    ``create`` (the driver): made by the first caller (``get_if_exists``: a second job of the project
    joins the first's), with ``limits``. Not detached: it ends with its owner, the first driver.
    Workers only look it up, never create it: a bucket made mid-job (after the first one died) would
    not know the last window's requests and grant a full window again."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        if create:
            options = dict(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime=None, num_cpus=0)
            handle = _bucket_actor().options(**options).remote(limits, ttl)
            ray.get(handle.configure.remote(limits), timeout=timeout)  # a rerun with new limits sets them
        else:
            handle = ray.get_actor(name, namespace=NAMESPACE)
            ray.get(handle.stats.remote(), timeout=timeout)
        return handle
    except Exception as e:  # noqa: BLE001 - any failure means: limit without the bucket
        log.warning("rate-limit bucket %s unavailable (%s): limiting in this process", name, e)
        return None


class SharedLimiter:
    """A worker's client of the job's ``LimitBucket``.

    The worker's waiting requests ride on one ``acquire`` call at a time (granted as a batch), so
    the bucket sees one call per worker per burst, not one per request. Releases are sent batched
    per event-loop turn and not awaited. If the bucket stops answering (its call times out, its actor
    died), the worker limits itself to its ``share`` of the limits from then on, in process, counting
    what the bucket granted it in the last window and what is still in flight: the job stays under
    its limits as each worker keeps to its part (give or take what the others had in flight at the
    switch, until that is answered), and the bucket is never recreated mid-job (a new one would not
    know the requests of the last window)."""

    def __init__(
        self,
        bucket,
        share: Limits,
        ttl: float,
        hold: float = 10.0,
        call_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.bucket = bucket  # an actor handle (anything whose methods have ``.remote``)
        self.share, self.ttl = share, ttl
        self.hold, self.call_timeout = hold, call_timeout
        self.clock = clock
        self.local: LocalLimiter | None = None  # set once the bucket is gone
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # This worker's grants from the bucket: [time, lease, tokens] in the last window, and those in flight.
        self._recent: deque[list] = deque()
        self._out: dict[int, list] = {}
        self._moved: dict[int, int] = {}  # bucket lease in flight at the switch -> its local lease

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._waiting: deque[tuple[int, asyncio.Future]] = deque()
            self._pump: asyncio.Task | None = None
            self._releases: list[tuple[int, int | None]] = []

    def _fall_back(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {error}"[:300]
        self.local = LocalLimiter(self.share, self.ttl, self.clock)
        span, now = self.share.window + self.share.margin, self.clock()
        for t, lease, tokens in self._recent:  # what the bucket granted here still counts
            if now - t < span or lease in self._out:
                local = self.local.state.grant(t, tokens)
                if lease in self._out:
                    self._moved[lease] = local
                else:
                    self.local.state.release(local)
        self._recent.clear()
        self._out.clear()
        log.warning("rate-limit bucket stopped answering (%s): this worker keeps to its share", self.failure)

    async def acquire(self, tokens: int) -> tuple[bool, int]:
        if self.local is None:
            self._bind()
            fut = self._loop.create_future()
            self._waiting.append((tokens, fut))
            if self._pump is None or self._pump.done():
                self._pump = self._loop.create_task(self._pump_grants())
            lease = await fut
            if lease is not None:
                return True, lease
        return False, await self.local.acquire(tokens)

    async def _pump_grants(self) -> None:
        """Ask the bucket for every waiting request, hand out what it grants, repeat while any wait."""
        while True:
            while self._waiting and self._waiting[0][1].done():  # cancelled while waiting
                self._waiting.popleft()
            if not self._waiting:
                return
            batch = [tokens for tokens, _ in self._waiting]
            try:
                ref = self.bucket.acquire.remote(batch, self.hold)
                granted = await asyncio.wait_for(ref, self.hold + self.call_timeout)
            except Exception as e:  # noqa: BLE001 - timed out, actor died, or anything else: go on without it
                self._fall_back(e)
                for _, fut in self._waiting:
                    if not fut.done():
                        fut.set_result(None)  # None: take it from the local limiter
                self._waiting.clear()
                return
            for lease in granted:
                tokens, fut = self._waiting.popleft()
                entry = [self.clock(), lease, tokens]
                self._recent.append(entry)
                self._out[lease] = entry
                if fut.done():  # its request was cancelled meanwhile: give the lease back
                    self.release((True, lease))
                else:
                    fut.set_result(lease)

    def release(self, lease: tuple[bool, int], tokens: int | None = None) -> None:
        shared, lid = lease
        if not shared:
            self.local.release(lid, tokens)
        elif self.local is not None:  # granted by the bucket before it went
            if lid in self._moved:
                self.local.release(self._moved.pop(lid), tokens)
        else:
            entry = self._out.pop(lid, None)
            if entry is not None and tokens is not None:
                entry[2] = tokens
            span, now = self.share.window + self.share.margin, self.clock()
            while self._recent and now - self._recent[0][0] >= span and self._recent[0][1] not in self._out:
                self._recent.popleft()
            self._releases.append((lid, tokens))
            if len(self._releases) == 1:
                self._loop.call_soon(self.flush)

    def pause(self, seconds: float) -> None:
        """Pause every worker: Ray runs this worker's calls in order, so its next acquire sees it."""
        if self.local is not None:
            self.local.pause(seconds)
            return
        with suppress(Exception):
            self.bucket.pause.remote(seconds)

    def flush(self) -> None:
        """Send the releases buffered so far (also called when a batch's requests are all done)."""
        if self._loop is None or not self._releases or self.local is not None:
            return
        items, self._releases = self._releases, []
        with suppress(Exception):  # a dead bucket is found, and handled, by the next acquire
            self.bucket.release.remote(items)


def make_limiter(limits: Limits, ttl: float, bucket: str | None = None, workers: int = 1):
    """The limiter for one worker: the client of the job's bucket named ``bucket`` (a Ray worker of
    a job of ``workers``; the driver made it, ``job_bucket``), else in process. A worker that cannot
    reach the bucket limits itself to its share, so the job still keeps its limits."""
    if bucket is None or not limits.capped:
        return LocalLimiter(limits, ttl)
    handle = open_bucket(bucket, limits, ttl)
    if handle is None:
        return LocalLimiter(limits.share(workers), ttl)
    return SharedLimiter(handle, limits.share(workers), ttl)


def job_bucket(cfg, cache_path: str) -> str:
    """Create the job's bucket from the driver, with the recipe's limits; returns its name.

    The driver owns it and keeps a handle for the rest of its life, so the bucket outlasts every
    actor of the job (an actor-owned one would end with that actor, which Ray Data stops as soon as
    it runs out of batches), lasts across runs in one process (the last window still counts), and
    ends with the driver."""
    from distill.core.executor import init_ray

    init_ray()
    name = bucket_name(cfg.base_url or "", cfg.model, cache_path)
    handle = open_bucket(name, limits_of(cfg), lease_ttl(cfg.request_timeout), create=True)
    if handle is not None:
        _held[name] = handle
    return name


def limits_of(cfg) -> Limits:
    """The limits a teacher config sets."""
    return Limits(cfg.requests_per_minute, cfg.tokens_per_minute, cfg.concurrency, margin=SEND_MARGIN)
