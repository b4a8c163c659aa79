"""The run folder lock: one writer at a time, re-entrant in its thread, taken over from a killed holder."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distill.core.errors import DistillError
from distill.core.locks import LOCK_FILE, RunFolderBusy, ensure_free, holder, run_lock

ROOT = Path(__file__).resolve().parents[2]

# A real second process: takes the lock (optionally as a job), says so, holds it until `stop` exists.
HOLD = """
import os, sys, time
from pathlib import Path
from distill.core.locks import run_lock
run_dir, job, stop = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3])
with run_lock(run_dir, job=job):
    print("held", os.getpid(), flush=True)
    while not stop.exists():
        time.sleep(0.02)
"""

# A racer: waits for `go`, tries the lock once; the winner holds it until `stop` exists.
RACE = """
import os, sys, time
from pathlib import Path
from distill.core.locks import RunFolderBusy, run_lock
run_dir, go, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
try:
    with run_lock(run_dir):
        print("won", os.getpid(), flush=True)
        while not stop.exists():
            time.sleep(0.02)
except RunFolderBusy as e:
    print("refused", e, flush=True)
"""


def _spawn(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _hold(run_dir: Path, stop: Path, job: str = "") -> subprocess.Popen:
    """A live process holding ``run_dir``'s lock (until ``stop`` exists or it is killed)."""
    proc = _spawn(HOLD, run_dir, job, stop)
    line = proc.stdout.readline()
    assert line.split() == ["held", str(proc.pid)], line + proc.stderr.read()
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_host_and_start(tmp_path):
    run_dir, stop = tmp_path / "runs" / "dup", tmp_path / "stop"
    proc = _hold(run_dir, stop)
    try:
        with pytest.raises(RunFolderBusy) as refused:
            with run_lock(run_dir):
                pytest.fail("took a lock another live process holds")
        e = refused.value
        assert isinstance(e, DistillError) and e.holder["pid"] == proc.pid
        assert e.problem.startswith(
            f"run folder {run_dir} is in use by pid {proc.pid} on {socket.gethostname()} since "
        )
        assert (
            e.fix == f"wait for it to finish or stop it (`kill {proc.pid}`), or give this run another name (name=...)"
        )
        # A reader's cheap check names the same holder and takes nothing.
        assert holder(run_dir)["pid"] == proc.pid
        with pytest.raises(RunFolderBusy):
            ensure_free(run_dir)
    finally:
        stop.touch()
        proc.wait(timeout=30)
    # Let go on exit: free for the next writer.
    assert holder(run_dir) is None
    with run_lock(run_dir) as info:
        assert info["pid"] == os.getpid()


def test_a_job_holding_the_lock_is_named_with_its_cancel_command(tmp_path):
    run_dir, stop = tmp_path / "dup", tmp_path / "stop"
    proc = _hold(run_dir, stop, job="20260101-120000-abc123")
    try:
        with pytest.raises(RunFolderBusy) as refused:
            with run_lock(run_dir):
                pass
        assert str(refused.value).startswith(
            f"run folder {run_dir} is in use by job 20260101-120000-abc123 (pid {proc.pid} on {socket.gethostname()}, since "
        )
        assert "(`distill jobs cancel 20260101-120000-abc123`)" in refused.value.fix
    finally:
        stop.touch()
        proc.wait(timeout=30)


def test_reentrant_in_its_thread_refused_in_another_and_released_on_exceptions(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("name: run\n")
    refused = []

    def other_thread():
        try:
            with run_lock(run_dir):
                refused.append(None)
        except RunFolderBusy as e:
            refused.append(e)

    with pytest.raises(ValueError, match="inner failure"):
        with run_lock(run_dir, job=None) as outer:
            with run_lock(run_dir) as inner:  # a run calling run_stage: no deadlock, the same holder
                assert inner["pid"] == outer["pid"] == os.getpid()
                with run_lock(run_dir):
                    pass
            assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()  # the inner exit kept it
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            raise ValueError("inner failure")
    assert isinstance(refused[0], RunFolderBusy) and f"pid {os.getpid()}" in str(refused[0])
    # Released on the exception: the metadata is emptied and another process takes it at once.
    assert (run_dir / LOCK_FILE).read_text() == "" and holder(run_dir) is None
    code = "from distill.core.locks import run_lock\nwith run_lock(__import__('sys').argv[1]): print('ok')"
    assert (
        subprocess.run([sys.executable, "-c", code, run_dir], cwd=ROOT, capture_output=True, text=True).stdout == "ok\n"
    )


def test_a_folder_the_lock_created_and_nothing_else_used_is_removed_again(tmp_path):
    with run_lock(tmp_path / "runs" / "new"):
        assert (tmp_path / "runs" / "new" / LOCK_FILE).exists()
    assert list(tmp_path.iterdir()) == []
    assert holder(tmp_path / "missing") is None and not (tmp_path / "missing").exists()  # the check creates nothing


def test_the_lock_of_a_process_killed_with_sigkill_is_taken_over(tmp_path, capsys):
    run_dir, stop = tmp_path / "run", tmp_path / "stop"
    proc = _hold(run_dir, stop)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The killed holder's metadata is still in the file; the kernel dropped its flock.
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid
    assert holder(run_dir) is None
    with run_lock(run_dir) as info:
        assert info["pid"] == os.getpid()
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {proc.pid} on {socket.gethostname()}" in capsys.readouterr().err  # the takeover is said


def test_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    run_dir, go, stop = tmp_path / "run", tmp_path / "go", tmp_path / "stop"
    dead = _hold(run_dir, tmp_path / "never")
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(timeout=30)
    racers = [_spawn(RACE, run_dir, go, stop) for _ in range(4)]
    time.sleep(1.0)  # let them start and wait on `go`
    go.touch()
    try:
        lines = [p.stdout.readline().strip() for p in racers]
    finally:
        stop.touch()
        for p in racers:
            p.wait(timeout=60)
    winners = [ln for ln in lines if ln.startswith("won")]
    assert len(winners) == 1, lines
    winner = int(winners[0].split()[1])
    refused = [ln for ln in lines if ln.startswith("refused")]
    assert len(refused) == 3 and all(f"in use by pid {winner} on " in ln for ln in refused), lines
