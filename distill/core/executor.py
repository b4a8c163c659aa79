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
) -> None:
    """Run ``worker(**worker_kwargs)(batch)`` over ``items`` on a pool of ``workers`` Ray actors,
    calling ``on_batch(table)`` in the driver as each batch returns. A DistillError raised in a
    worker is raised here as itself (one line for the user), anything else as Ray raised it."""
    import ray

    init_ray()
    batch = balanced_batch_size(len(items), batch_size, workers)
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch))
    ds = ds.map_batches(
        worker,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=num_cpus,
    )
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            on_batch(table)
    except DistillError as e:
        if type(e).__module__.startswith("distill."):
            raise  # raised by on_batch in this process: already itself
        raise user_error(e) from None
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        raise cause from None
