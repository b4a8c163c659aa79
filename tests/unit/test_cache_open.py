"""Workers that open the same new completion cache at the same moment all get it (no "database is locked")."""

import multiprocessing as mp
import time

from distill.teachers.cache import CompletionCache


def _open_at(path, t0, q):
    while time.time() < t0:
        pass
    try:
        CompletionCache(path)
        q.put(None)
    except Exception as e:  # noqa: BLE001 - the failure is what the test reports
        q.put(repr(e))


def test_processes_opening_a_new_cache_together_all_succeed(tmp_path):
    """Switching a new file to WAL needs an exclusive lock, which sqlite refuses at once (no busy
    wait) to a second opener: before the retry, 4 of 20 such rounds of 6 processes failed here."""
    ctx = mp.get_context("fork")
    errors = []
    for trial in range(15):
        q = ctx.Queue()
        t0 = time.time() + 0.3
        procs = [ctx.Process(target=_open_at, args=(tmp_path / f"c{trial}.sqlite", t0, q)) for _ in range(6)]
        for p in procs:
            p.start()
        errors += [r for r in (q.get(timeout=60) for _ in procs) if r]
        for p in procs:
            p.join()
    assert errors == []
