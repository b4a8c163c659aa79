"""Rich progress bars and console output shared by all stages."""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


# Without a terminal (a job's log file, CI, `nohup`), a bar is never redrawn: a plain line instead at
# most this often, and when the work is done.
LOG_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def progress_line(description: str, done: int, total: int | None, elapsed: float, status: str = "") -> str:
    """One progress line for a log: ``train 40/188 (21%) 3m12s, ~11m40s left, loss 0.41``."""
    line = f"{description} {done}/{total} ({done / total:.0%})" if total else f"{description} {done}"
    line += f" {_duration(elapsed)}"
    if total and 0 < done < total:
        line += f", ~{_duration(elapsed / done * (total - done))} left"
    return line + (f", {status}" if status else "")


@contextmanager
def _log_lines(description: str, total: int | None):
    start = time.monotonic()
    state = {"done": 0, "status": "", "printed": None, "at": start}

    def emit(now: float) -> None:
        state["printed"], state["at"] = state["done"], now
        console.print(
            progress_line(description, state["done"], total, now - start, state["status"]),
            highlight=False,
            soft_wrap=True,
        )

    def advance(n: int = 1, status: str | None = None) -> None:
        state["done"] += n
        if status is not None:
            state["status"] = status
        now = time.monotonic()
        finished = total and state["done"] >= total and state["printed"] != state["done"]
        if now - state["at"] >= LOG_EVERY_S or finished:
            emit(now)

    yield advance
    if state["printed"] != state["done"]:
        emit(time.monotonic())


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yields ``advance(n, **fields)``; shows done/total, elapsed, remaining and a free-text status
    (a bar on a terminal, else a plain line every ``LOG_EVERY_S`` seconds and at the end)."""
    if not console.is_terminal:
        with _log_lines(description, total) as advance:
            yield advance
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance
