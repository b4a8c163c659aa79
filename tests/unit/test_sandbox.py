"""The sandbox that runs code tasks' tests, against hostile solutions: each limit holds (time,
processes, memory, files, output, network, other users' files), nothing it starts outlives the run,
and a plain solution passes or fails with the failing test's line. Then the code answer type:
extraction, golds, reasons and the training target's round trip.

Root (as CI runs) gets every mechanism; a test whose mechanism is unavailable here skips, naming it."""

import os
import socket
import textwrap
import time
import uuid

import pytest

from distill.core.answers import Task
from distill.core.code import extract_code, without_solution
from distill.core.errors import DistillError
from distill.core.sandbox import UID_BASE, UID_COUNT, isolation, run_python

ISO = isolation()
needs_uid = pytest.mark.skipif(
    not ISO.private_uid, reason="needs root: the process cap and file isolation run the program as a private uid"
)
needs_namespaces = pytest.mark.skipif(
    not ISO.namespaces,
    reason="needs unshare (CAP_SYS_ADMIN): no network namespace here, sockets blocked in Python only",
)


def _run(source: str, **limits):
    return run_python(textwrap.dedent(source), **{"timeout_s": 5, **limits})


def _alive(pids: list[int], wait_s: float = 2.0) -> list[int]:
    """Those of ``pids`` still running a sandboxed program (zombies and reused pids do not count),
    after up to ``wait_s`` for a kill to land (without a PID namespace, SIGKILL is asynchronous)."""
    until = time.monotonic() + wait_s
    while (alive := _running(pids)) and time.monotonic() < until:
        time.sleep(0.05)
    return alive


def _running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = b"program.py" in f.read()  # the runner's command line names the program
        except (OSError, IndexError):
            continue
        if ours and state not in ("Z", "X"):
            alive.append(pid)
    return alive


def _sandbox_uid_processes() -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if UID_BASE <= uid < UID_BASE + UID_COUNT:
            out.append(int(pid))
    return _alive(out)


# --- plain programs ---------------------------------------------------------------------------------


def test_a_correct_program_passes_and_a_failing_assert_names_its_line():
    ok = _run("def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('done')")
    assert ok.ok and ok.exit_code == 0 and ok.reason is None and ok.stdout_tail == "done\n"
    bad = _run("def f(x):\n    return x\n\nassert f(0) == 0\nassert f(1) == 2\n")
    assert not bad.ok and bad.line == 5 and bad.error == "AssertionError"
    assert bad.reason == "AssertionError at line 5" and "assert f(1) == 2" in bad.stderr_tail


def test_a_program_that_exits_early_does_not_pass():
    for early in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):
        r = _run(early + "\nassert False")
        assert not r.ok and r.reason.startswith("exited"), r


def test_the_environment_is_empty_and_stdin_closed(monkeypatch):
    monkeypatch.setenv("DISTILL_SANDBOX_SECRET", "hunter2")
    r = _run("import os\nprint(sorted(os.environ))\ntry:\n    input()\nexcept EOFError:\n    print('eof')")
    assert r.ok and "DISTILL_SANDBOX_SECRET" not in r.stdout_tail and r.stdout_tail.endswith("eof\n")


# --- hostile programs -------------------------------------------------------------------------------


def test_an_infinite_loop_times_out_in_bounded_wall_time():
    start = time.monotonic()
    r = _run("while True:\n    pass", timeout_s=1)
    assert not r.ok and r.reason == "timed out after 1 s"
    assert time.monotonic() - start < 4  # one second, plus starting and stopping


FORK_STORM = r"""
import os, time
n, (ready, done) = 0, os.pipe()
try:
    for _ in range(300):  # bounded: the cap is what stops it, never the machine
        pid = os.fork()
        if pid == 0:
            os.write(1, b"child %s\n" % os.readlink("/proc/self").encode())  # its pid as the job sees it
            os.write(done, b".")
            {detach}
            time.sleep(30)
            os._exit(0)
        n += 1
finally:
    told = 0
    while told < n:  # every child has written its pid
        told += len(os.read(ready, n - told))
    os.write(1, b"forked %d\n" % n)
"""


def _forked(r) -> tuple[int, list[int]]:
    words = r.stdout_tail.split()
    children = [int(words[i + 1]) for i, w in enumerate(words[:-1]) if w == "child"]
    return int(words[words.index("forked") + 1]), children


def test_a_fork_storm_is_capped_and_no_child_survives():
    r = _run(FORK_STORM.format(detach="pass"), max_processes=8)
    n, children = _forked(r)
    assert not r.ok and r.reason.startswith("too many processes"), r
    assert 0 < n < 8 and len(children) == n  # the runner is one of the 8
    assert _alive(children) == []


@needs_uid
def test_daemonised_children_do_not_survive():
    detach = "os.setsid()\n            if os.fork():\n                os._exit(0)"  # a double-forked daemon
    r = _run(FORK_STORM.format(detach=detach).replace("range(300)", "range(3)"), max_processes=16)
    assert r.ok, r
    assert _sandbox_uid_processes() == []


def test_a_huge_allocation_hits_the_memory_limit():
    r = _run("x = bytearray(10**10)", memory_mb=256)
    assert not r.ok and r.reason == "killed: memory limit (256 MiB) at line 1"


def test_a_huge_file_hits_the_file_size_limit():
    r = run_python("with open('big', 'wb') as f:\n    f.write(b'x' * (8 << 20))", max_file_kb=1024)
    assert not r.ok and r.reason.startswith("file size limit (1024 KiB)"), r


def test_printing_megabytes_is_cut_off_at_the_output_cap():
    start = time.monotonic()
    r = _run("import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 10_000)\n", max_output_kb=64)
    assert not r.ok and r.reason == "output over 64 KiB"
    assert len(r.stdout_tail) <= 4096 and time.monotonic() - start < 4


@needs_uid
def test_files_outside_its_folder_are_out_of_reach(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the job's secret")
    secret.chmod(0o600)
    outside = f"/etc/distill-sandbox-{uuid.uuid4().hex}"
    r = _run(f"""
        import os
        for path in ("/etc/shadow", {str(secret)!r}):
            try:
                print(open(path).read())
            except OSError as e:
                print("read failed", type(e).__name__)
        for path in ({outside!r}, {str(tmp_path / "planted")!r}):
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as e:
                print("write failed", type(e).__name__)
        open("mine.txt", "w").write("its own folder is writable")
        print(open("mine.txt").read(), os.getuid())
    """)
    assert r.ok, r
    assert r.stdout_tail.count("read failed") == 2 and r.stdout_tail.count("write failed") == 2, r.stdout_tail
    assert "secret" not in r.stdout_tail and "root:" not in r.stdout_tail
    assert not os.path.exists(outside) and not (tmp_path / "planted").exists()
    assert "its own folder is writable" in r.stdout_tail
    assert UID_BASE <= int(r.stdout_tail.split()[-1]) < UID_BASE + UID_COUNT


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def test_a_socket_to_localhost_is_refused(listener):
    port = listener.getsockname()[1]
    r = _run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert not r.ok and "network access is disabled" in r.reason
    with pytest.raises(BlockingIOError):
        listener.accept()


@needs_namespaces
def test_even_a_raw_socket_cannot_reach_localhost(listener):
    port = listener.getsockname()[1]
    r = _run(f"import _socket\ns = _socket.socket(2, 1)\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
    assert not r.ok and "unreachable" in r.reason, r  # the network namespace has no interface up
    with pytest.raises(BlockingIOError):
        listener.accept()


# --- the code answer type ---------------------------------------------------------------------------

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
OUTPUT = """Add the numbers.

```text
not this block
```

```python
def add(a, b):
    return a + b
```
That is all."""


def test_code_extraction_reads_the_last_python_block():
    assert extract_code(OUTPUT) == ("def add(a, b):\n    return a + b", True)
    assert extract_code("```\nx = 1\n```\n```python\ny = 2\n```") == ("y = 2", True)
    assert extract_code("No fence:\n```\n  x = 1\n  y = 2\n```") == ("x = 1\ny = 2", True)  # dedented
    assert extract_code("def f():\n    return 1") == ("def f():\n    return 1", False)  # the whole output parses
    assert extract_code("def f():\n    return 1", fallback_last=False) == (None, False)
    task = Task("code")
    assert task.extract("I would use a loop.").reason == "no Python code block in output"
    assert task.extract("```python\nunclosed = True").answer is None
    long = "```" * 50_000 + "\n" + "`" * 100_000  # fences read line by line: linear time
    from guards import finishes_within

    with finishes_within(60, "reading a hostile output's code fences"):
        task.extract(long)


def test_a_code_gold_is_its_tests():
    task = Task("code")
    joined = "\n".join(TESTS)
    assert task.normalize_gold(TESTS) == joined
    assert task.normalize_gold('["assert add(1, 2) == 3", "assert add(2, 2) == 4"]') == "\n".join(TESTS[:2])
    assert task.normalize_gold(joined) == joined  # idempotent
    with pytest.raises(DistillError, match="not valid Python"):
        task.normalize_gold("assert add(1, 2) ==")
    with pytest.raises(DistillError, match="empty"):
        task.normalize_gold("")


def test_a_code_answer_is_checked_by_running_the_tests():
    task = Task("code", timeout_s=2)
    code = task.extract(OUTPUT).answer
    assert task.check(code, TESTS) == (True, None)
    wrong = "def add(a, b):\n    return a + b if a > 0 else a"
    assert task.check(wrong, TESTS) == (
        False,
        "tests failed: AssertionError at line 3 of the tests: assert add(-1, 1) == 0",
    )
    raising = "def add(a, b):\n    return a / 0"
    assert task.check(raising, TESTS)[1] == (
        "tests failed: ZeroDivisionError: division by zero at line 1 of the tests: assert add(1, 2) == 3"
    )
    assert task.check("def add(a, b)\n    return a", TESTS)[1] == (
        "solution failed: SyntaxError: expected ':' at line 1 of the solution"
    )
    assert task.check("while True:\n    pass", TESTS) == (False, "timed out after 2 s")


def test_the_training_target_states_the_code_once_and_reads_back():
    from distill.students.data import target_text

    task = Task("code")
    code = task.extract(OUTPUT).answer
    sentence = task.answer_sentence(code)
    assert sentence == f"```python\n{code}\n```" and task.extract(sentence) == task.extract(OUTPUT)
    tricky = 's = """\n```\n"""\nprint(s)'  # a fence inside the code: a longer fence around it
    assert task.extract(task.answer_sentence(tricky)).answer == tricky
    target = target_text({"rationale": OUTPUT, "pred": code, "gold": TESTS}, "rationale", task)
    assert target.count("def add") == 1 and task.extract(target).answer == code
    assert target.startswith("Let's think step by step. Add the numbers.") and "That is all." in target
    assert without_solution("no code here", code) == "no code here"
