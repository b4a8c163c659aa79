"""One writer per run folder: ``run_lock(run_dir)`` holds ``<run_dir>/.lock`` while a process writes there.

A second writer (another ``distill run``/``generate``/..., another job) is refused at once with one
line naming the holder — pid, job id, host, since when — as a ``DistillError`` (exit 2), before it
touches anything in the folder. The lock is an ``fcntl.flock`` on that file, so the kernel drops it
when the holder ends in any way (kill -9 included): a stale lock needs no clean-up, and of several
processes racing for a freed lock the kernel lets exactly one win. The file holds the holder's JSON
metadata for the message; a clean release empties it, so metadata found on taking the lock means
the previous holder was killed. The lock is re-entrant within one thread (``distill run`` calls
``run_stage`` per stage; ``ablate`` calls it too). Readers (``distill jobs status``, reading a
report) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.errors import DistillError

LOCK_FILE = ".lock"
# How long a refused writer waits for a holder that is still writing its metadata (or letting go).
SETTLE_SECONDS = 2.0


class RunFolderBusy(DistillError):
    """Another live process holds the run folder's lock; ``holder`` is its metadata ({} if unknown)."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = Path(run_dir), holder
        super().__init__(f"run folder {run_dir} is in use by {describe(holder)}", _fix(holder))


@dataclass
class _Hold:
    """This process's hold on one run folder: the locked descriptor, the owning thread, the depth."""

    fd: int
    thread: int
    info: dict
    created: list[Path] = field(default_factory=list)
    depth: int = 1


_holds: dict[str, _Hold] = {}
_mutex = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child closes its copies of the lock descriptors: only the process that took a lock holds
    it, so a child outliving a killed parent cannot keep its run folder locked."""
    global _mutex
    _mutex = threading.Lock()
    for hold in _holds.values():
        with suppress(OSError):
            os.close(hold.fd)
    _holds.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@contextmanager
def run_lock(run_dir: str | Path, job: str | None = None):
    """Hold ``run_dir``'s lock for the block (creating the folder); yields the holder metadata.

    Raises ``RunFolderBusy`` when another process (or another thread of this one) holds it. Nested
    calls in the same thread only count; the last one out releases. ``job`` names the job this
    process runs, for the message another writer gets. A folder the lock created and that holds
    nothing else when it is released is removed again, so a command that failed early leaves none.
    """
    run_dir = Path(run_dir)
    created = _missing_dirs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    with _mutex:
        hold = _holds.get(key)
        if hold is not None and hold.thread != threading.get_ident():
            raise RunFolderBusy(run_dir, hold.info)
        if hold is not None:
            hold.depth += 1
    if hold is None:
        hold = _acquire(run_dir, job, created)
        with _mutex:
            _holds[key] = hold
    elif job and not hold.info.get("job"):
        hold.info["job"] = job  # the job runner's own call names its job
        _write(hold.fd, hold.info)
    try:
        yield dict(hold.info)
    finally:
        with _mutex:
            hold.depth -= 1
            last = hold.depth == 0
            if last:
                _holds.pop(key, None)
        if last:
            _release(run_dir, hold)


def holder(run_dir: str | Path) -> dict | None:
    """The metadata of the live process holding ``run_dir``'s lock, or None when it is free.

    Takes no lock (a shared probe, let go at once) and creates nothing: cheap enough for
    ``distill jobs submit`` to refuse a run folder a live job holds before it records the job."""
    path = Path(run_dir) / LOCK_FILE
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        info = _read_holder(path)
        if info is not None and _plausible(info):
            return info
        if time.monotonic() > deadline:
            return info or {}
        time.sleep(0.02)


def ensure_free(run_dir: str | Path) -> None:
    """Raise ``RunFolderBusy`` when a live process holds ``run_dir``'s lock (see ``holder``)."""
    info = holder(run_dir)
    if info is not None:
        raise RunFolderBusy(Path(run_dir), info)


def describe(info: dict) -> str:
    """``job <id> (pid 123 on host, since 2026-01-01 12:00:00)`` or ``pid 123 on host since ...``."""
    if not info:
        return "another process (it has not written its details yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    where = f"pid {info.get('pid')} on {info.get('host')}"
    return f"job {info['job']} ({where}, since {since})" if info.get("job") else f"{where} since {since}"


def _fix(info: dict) -> str:
    if info.get("job"):
        stop = f"`distill jobs cancel {info['job']}`"
    elif info.get("pid") and info.get("host") == socket.gethostname():
        stop = f"`kill {info['pid']}`"
    else:
        stop = f"on {info['host']}" if info.get("host") else "it"
    return f"wait for it to finish or stop it ({stop}), or give this run another name (name=...)"


def _acquire(run_dir: Path, job: str | None, created: list[Path]) -> _Hold:
    """Take the lock or raise ``RunFolderBusy``; write this process's metadata into the lock file."""
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + SETTLE_SECONDS
    while (fd := _try_lock(path)) is None:
        info = _read_holder(path)
        if info is not None and _plausible(info):
            raise RunFolderBusy(run_dir, info)
        if time.monotonic() > deadline:
            raise RunFolderBusy(run_dir, info or {})
        time.sleep(0.02)  # the holder is writing its metadata or letting go: look again
    previous = _parse(os.pread(fd, 1 << 16, 0))
    info = {
        "pid": os.getpid(),
        "job": job,
        "host": socket.gethostname(),
        "since": time.time(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
    }
    _write(fd, info)
    if previous:
        from distill.core.progress import console

        console.print(
            f"[dim]run folder {run_dir}: {describe(previous)} stopped without letting go of it; taking over[/]",
            highlight=False,
            soft_wrap=True,
        )
    return _Hold(fd, threading.get_ident(), info, created)


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock, or None when another process holds it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            raise DistillError(
                f"cannot lock run folder {path.parent}: {e.strerror}",
                "put output_dir on a local disk whose file system supports file locks (flock)",
            ) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the file was removed (its folder cleaned up) after we opened it: lock the one there now


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _write(fd: int, info: dict) -> None:
    """Replace the lock file's metadata in place (never an empty file between: a reader retries on bad JSON)."""
    data = json.dumps(info).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data)
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _read_holder(path: Path) -> dict | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _plausible(info: dict) -> bool:
    """Whether ``info`` can name the live holder: a pid of this host that is gone (or a zombie) is the
    killed previous holder, whose metadata the new holder has not overwritten yet."""
    return info.get("host") != socket.gethostname() or pid_alive(info["pid"])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running: it exists (or is another user's) and is no
    zombie (exited, not yet reaped). The state is read after the last ``)`` of /proc/<pid>/stat, since
    the command name in parentheses may itself hold spaces."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _release(run_dir: Path, hold: _Hold) -> None:
    """Let go of the lock: empty the metadata (a clean release), or remove the lock file and the folders
    the lock created when nothing else was written there; closing the descriptor drops the flock."""
    try:
        with suppress(OSError):
            left = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
            if not (hold.created and left <= {LOCK_FILE}):
                os.ftruncate(hold.fd, 0)
                return
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            for folder in hold.created:  # deepest first; stops at the first one something else is in
                with suppress(FileNotFoundError):
                    os.rmdir(folder)
    finally:
        os.close(hold.fd)
