"""The Ray executor: start (or join) Ray, size batches to the workers, map batches over an actor pool,
and hand a worker's own error back to the driver as itself.

Generic on purpose: the teacher library passes its worker class; nothing here knows about teachers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from distill.core.errors import DistillError


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or join) Ray quietly, once per process."""
    import logging

    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in Ray's session folder; failures still reach the driver as exceptions.
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # A worker's exception reaches the driver as its own class (RayTaskError(DistillError) with the
    # original as ``cause``) instead of a UserCodeException that keeps only its traceback text.
    ctx.raise_original_map_exception = True
    # Ray Data logs a worker's exception before re-raising it; the driver reports it (one line for
    # the user's own problems), so the log copy is noise. Set after ray.data configured its loggers.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def balanced_batch_size(n: int, batch_size: int, workers: int) -> int:
    """At most ``batch_size``, and such that the batches split evenly over the workers: 5 batches
    on 2 actors take 3 rounds (1.67x at best), 6 slightly smaller ones take 3 rounds of full use."""
    batches = max(1, math.ceil(n / batch_size))
    batches = math.ceil(batches / workers) * workers
    return max(1, math.ceil(n / batches))


def user_error(e: BaseException) -> DistillError | None:
    """The DistillError a worker raised, found through the exception chain (``cause`` of Ray's
    RayTaskError, then ``__cause__`` / ``__context__``), rebuilt without the text Ray appends."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        problem = getattr(x, "problem", None)
        if isinstance(x, DistillError) and isinstance(problem, str):
            fix = getattr(x, "fix", None)
            cls = next((c for c in type(x).__mro__ if c.__module__.startswith("distill.")), DistillError)
            try:
                return cls(problem, fix)
            except TypeError:  # a subclass with another constructor: the base class says the same
                return DistillError(problem, fix)
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def map_actor_pool(
    items: list[dict],
    worker: type,
    worker_kwargs: dict,
    *,
    batch_size: int,
    workers: int,
    num_cpus: float,
    on_batch: Callable,
    wait_for_actors: float = 600.0,
) -> None:
    """Run ``worker(**worker_kwargs)(batch)`` over ``items`` on a pool of ``workers`` Ray actors spread
    over the cluster's nodes, calling ``on_batch(table)`` in the driver as each batch returns (each batch
    exactly once). A DistillError raised in a worker is raised here as itself (one line for the user),
    anything else as Ray raised it.

    A batch whose actor dies (its process killed, or its whole node lost) goes back to the queue and is
    answered by the next free actor; the dead actor is restarted where the cluster has room (plain CPU
    resources, so a surviving node can take it) and rejoins the pool when it is up. The run fails only
    when no actor at all has been available for ``wait_for_actors`` seconds."""
    import collections
    import time

    import pyarrow as pa
    import ray
    from ray.exceptions import ObjectLostError, RayActorError

    init_ray()
    size = balanced_batch_size(len(items), batch_size, workers)
    todo = collections.deque(items[i : i + size] for i in range(0, len(items), size))
    losses: dict[int, int] = collections.Counter()  # batch (by id) -> times its actor was lost under it
    remote = ray.remote(worker).options(
        num_cpus=num_cpus,
        scheduling_strategy="SPREAD",  # one actor per node first; survivors can host a lost node's actors
        max_restarts=-1,  # a lost actor comes back wherever resources allow
        max_task_retries=0,  # its batch is not pinned to it: requeued here, taken by any live actor
    )
    actors = [remote.remote(**worker_kwargs) for _ in range(min(workers, len(todo)))]
    probes = {a.__ray_ready__.remote(): a for a in actors}  # actors starting (or restarting)
    reprobe: list[tuple[float, object]] = []  # (when, actor): lost actors to look at again
    running: dict = {}  # ref -> (actor, batch)
    idle: list = []
    last_alive = time.monotonic()
    try:
        while todo or running:
            while idle and todo:
                actor, batch = idle.pop(), todo.popleft()
                running[actor.__call__.remote(pa.Table.from_pylist(batch))] = (actor, batch)
            now = time.monotonic()
            for when, actor in [r for r in reprobe if r[0] <= now]:
                reprobe.remove((when, actor))
                probes[actor.__ray_ready__.remote()] = actor
            if running or idle:
                last_alive = now
            elif now - last_alive > wait_for_actors:
                raise DistillError(
                    f"no Ray actor has been available for {wait_for_actors:.0f} s ({len(todo)} batches left): "
                    "the cluster has no room for the teacher's workers",
                    "add a node, or lower teacher.workers; `distill jobs resume` continues exactly once",
                )
            waiting = [*running, *probes]
            if not waiting:  # every actor lost a moment ago: look at them again shortly
                time.sleep(max(0.0, min(when for when, _ in reprobe) - now))
                continue
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in done:
                if ref in probes:
                    actor = probes.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(actor)
                    except RayActorError as e:
                        if getattr(e, "_actor_init_failed", False):  # its constructor raised: not a lost node
                            raise _worker_error(e) from None
                        reprobe.append((time.monotonic() + 1.0, actor))  # not up yet: look again in a second
                    continue
                actor, batch = running.pop(ref)
                try:
                    table = ray.get(ref)
                except (RayActorError, ObjectLostError):
                    losses[id(batch)] += 1
                    if losses[id(batch)] > 4:  # a batch that kills every actor it meets
                        raise
                    todo.appendleft(batch)
                    reprobe.append((time.monotonic() + 1.0, actor))
                    continue
                except ray.exceptions.RayTaskError as e:  # the worker's own exception
                    raise _worker_error(e) from None
                on_batch(table)
                idle.append(actor)
    finally:
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # the driver lost the cluster itself: nothing left to stop
                pass


def _worker_error(e: BaseException) -> BaseException:
    """The DistillError inside a worker's exception, else the exception as Ray raised it."""
    return user_error(e) or e
