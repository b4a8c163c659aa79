"""Run untrusted Python (a teacher's or a student's solution and its tests) in a subprocess that
cannot hurt the job: ``run_python(source, ...) -> SandboxResult``.

The program runs under a fresh ``python -I -S`` (isolated mode, no site: only the standard library
imports) with an empty environment, stdin closed, a fresh working directory, and these limits:

- wall time: after ``timeout_s`` the launcher kills the program, then the job its process group;
  ``RLIMIT_CPU`` is a backstop, and the launcher and the program die with the job (``PR_SET_PDEATHSIG``).
- memory: ``RLIMIT_AS`` (an allocation past it is a ``MemoryError``); core dumps off (``RLIMIT_CORE=0``).
- files: ``RLIMIT_FSIZE`` per file (``max_file_kb``), ``RLIMIT_NOFILE`` descriptors.
- output: stdout + stderr are read by the job with a cap; past it the program is killed.
- processes: ``RLIMIT_NPROC``, which the kernel ignores for root. So as root (CI runs as root) the
  program runs as a private uid/gid (a random one of 65536 from 0x71000000: neither distributions nor
  systemd allocate there, unlike 61184-65519, systemd's dynamic users, or 65534, ``nobody``, whose
  other processes would count against the cap), with no supplementary groups and ``no_new_privs``
  (a setuid binary gains nothing). That uid also makes file permissions apply: root's files
  (``/etc/shadow``, the job's 0600 files, root-owned folders) are out of reach. (No cgroup: a v2
  ``pids.max`` needs a delegated cgroup tree, which containers rarely give; the uid needs nothing.)
- as root, namespaces (``unshare(2)`` from a small launcher, as ``unshare --net --pid --mount`` of
  util-linux does): a network namespace (no interface but a down loopback: no connection anywhere,
  127.0.0.1 included), a PID namespace (the program is its init: when it exits or is killed, the
  kernel kills every process it started, daemonised or not, before the job goes on), and a mount
  namespace where every mount is read-only except fresh tmpfs (4 x ``max_file_kb`` each) over
  ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (the working directory is ``/tmp/work`` there): nothing it
  writes outlives it or fills the disk. ``/proc`` stays the host's: it can list the job's processes
  and their command lines, not read their memory, environment or files. The interpreter is bind-mounted read-only at ``/tmp/.python`` so the private uid can
  run it wherever it is installed (e.g. under root's 0700 home).
- a prelude replaces ``socket.socket`` with one that raises: defence in depth only (``_socket`` is
  still importable; the network namespace is what holds).

Where namespaces are unavailable as root (no ``CAP_SYS_ADMIN``, a seccomp profile), the private uid
still holds (process cap, file permissions; the interpreter must then be readable by other users)
but the network is only blocked by the prelude, what it writes in world-writable folders (``/tmp``)
stays after the run, and escaped processes are killed by a signal to every process of the uid. Not root: no uid change and no namespaces; ``RLIMIT_NPROC``
counts all the user's processes, so it is set to the user's current count plus ``max_processes``
(approximate), a process that calls ``setsid()`` escapes the process-group kill, the network is only
blocked by the prelude, and the program can read what the user can. ``isolation()`` says which
applies.

The verdict needs the program to run to its end: the runner writes a one-time token (which it reads
from a descriptor it then closes) to a status pipe after the last line ran, so a solution that exits
early (``sys.exit(0)``, ``os._exit(0)``) fails. The solution shares the interpreter with the tests, so
one written to game them in-process (introspecting the runner, an object equal to everything) can
still pass: the sandbox protects the job, not the grade from a deliberately adversarial program.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache

UID_BASE, UID_COUNT = 0x71000000, 65536
_TAIL = 4096  # bytes of stdout / stderr kept on the result
_PY_MOUNT = "/tmp/.python"
_WORKDIR_NS = "/tmp/work"

# The launcher starts as root (or the user), enters the namespaces, forks the program as their init,
# drops privileges in the child and execs the runner; it exits with the child's status (128 + signal
# when killed). On SIGTERM it kills the child and waits for it, so the namespace is gone when it exits.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
c = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def die(what):
    os.write(2, ("sandbox: %s failed: %s\n" % (what, os.strerror(ctypes.get_errno()))).encode())
    os._exit(125)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the job
if os.getppid() != c["parent"]:
    os._exit(125)
def enter_namespaces():
    if libc.unshare(0x00020000 | 0x40000000 | 0x20000000) != 0:  # CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
        die("unshare")
    def mount(src, dst, fstype, flags, data=None, must=True):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0 and must:
            die("mount " + dst)
    mount(None, "/", None, 0x4000 | 0x40000)  # MS_REC | MS_PRIVATE: nothing propagates to the host
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            field = line.split()
            point = field[4].encode().decode("unicode_escape")
            flags = 0x20 | 0x1000 | 1 | sum(keep.get(o, 0) for o in field[5].split(","))
            mount(None, point, None, flags, must=False)  # MS_REMOUNT | MS_BIND | MS_RDONLY, best effort
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", 2 | 4, "size=%dk,mode=1777" % c["disk_kb"])  # MS_NOSUID | MS_NODEV
    os.mkdir(c["cwd"], 0o700)
    if c["uid"] is not None:
        os.chown(c["cwd"], c["uid"], c["uid"])
    os.mkdir(c["py_mount"], 0o755)
    mount(c["py_source"], c["py_mount"], None, 0x1000 | 0x4000)  # MS_BIND | MS_REC
    mount(None, c["py_mount"], None, 0x20 | 0x1000 | 1 | 2 | 4)  # read-only, nosuid, nodev
if c["namespaces"]:
    try:
        enter_namespaces()
    except OSError as e:
        os.write(2, ("sandbox: preparing the namespaces failed: %s\n" % e).encode())
        os._exit(125)
pid = os.fork()
if pid == 0:
    try:
        for name, value in c["limits"]:
            resource.setrlimit(getattr(resource, name), (value, value))
        os.chdir(c["cwd"])
        if c["uid"] is not None:
            os.setgroups([])
            os.setgid(c["uid"])
            os.setuid(c["uid"])
        if not os.access(c["python"], os.X_OK):
            os.write(2, ("sandbox: uid %d cannot run %s (a folder on its path is closed to other users)\n"
                         % (os.getuid(), c["python"])).encode())
            os._exit(125)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            die("no_new_privs")
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (setuid cleared it)
        os.execve(c["python"], [c["python"], "-I", "-S", "-u", "-c", c["runner"], json.dumps(c["fds"])], c["env"])
    except BaseException as e:
        os.write(2, ("sandbox: starting the program failed: %r\n" % (e,)).encode())
        os._exit(125)
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
while True:
    try:
        status = os.waitpid(pid, 0)[1]
        break
    except InterruptedError:
        pass
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""

# The runner: reads the program and the token from a descriptor, blocks sockets, runs the program as
# __main__ and, when its last line ran (or it raised), writes a verdict line with the token.
_RUNNER = r"""
import json, linecache, os, sys, traceback
def main():
    fds = json.loads(sys.argv.pop())
    with os.fdopen(fds["job"], "rb") as f:
        job = json.loads(f.read())
    token, source, me = job["token"], job["source"], os.getpid()
    import socket
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError(13, "network access is disabled in the sandbox")
    socket.socket = NoSocket
    linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")
    verdict = {"token": token, "ok": True}
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:
        lines = [n for frame, n in traceback.walk_tb(e.__traceback__) if frame.f_code.co_filename == "program.py"]
        if isinstance(e, SyntaxError) and e.filename == "program.py":
            lines = [e.lineno]
        try:
            message = (e.msg if isinstance(e, SyntaxError) else str(e))[:300]
        except BaseException:
            message = ""
        verdict = {"token": token, "ok": False, "error": type(e).__name__, "message": message,
                   "errno": getattr(e, "errno", None) if isinstance(e, OSError) else None,
                   "line": lines[0] if lines else None}
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frame on
        except BaseException:
            pass
    if os.getpid() != me:  # a forked child finished the program too: only the runner has a say
        os._exit(0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        os.write(fds["status"], (json.dumps(verdict) + "\n").encode())
    except BaseException:
        pass
    os._exit(0 if verdict["ok"] else 1)
main()
"""

# As root without a PID namespace: every process of the private uid, however it detached, is killed
# by one that runs as that uid (kill(-1) reaches exactly the processes a uid may signal).
_KILL_UID = r"""
import os, signal, sys
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
for _ in range(100):
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        break
"""


@dataclass(frozen=True)
class SandboxResult:
    """What a run gave: ``ok`` only when the program ran to its end and exited 0 within the limits;
    otherwise ``reason`` says why in a few words. ``error`` / ``line``: the exception a program raised
    (``"AssertionError"``, ``"ZeroDivisionError: division by zero"``) and the line of ``source`` whose
    top-level statement raised it (the test that failed), when that is what happened."""

    ok: bool
    exit_code: int | None
    reason: str | None
    stdout_tail: str
    stderr_tail: str
    seconds: float
    error: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class Isolation:
    """Which mechanisms ``run_python`` can use here (see the module docstring)."""

    private_uid: bool  # runs as a private uid: RLIMIT_NPROC holds, file permissions protect root's files
    namespaces: bool  # network, PID and mount namespaces: no network, no survivors, no lasting writes

    def describe(self) -> str:
        if self.private_uid and self.namespaces:
            return "private uid, network/PID/mount namespaces"
        if self.private_uid:
            return "private uid; no namespaces (network blocked in Python only)"
        return "not root: resource limits only (no private uid, network blocked in Python only)"


_NS_PROBE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ok = libc.unshare(0x00020000 | 0x40000000 | 0x20000000) == 0
ok = ok and libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0
ok = ok and libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 6, b"size=64k") == 0
os._exit(0 if ok else 1)
"""


@cache
def isolation() -> Isolation:
    """Probed once: root (the private uid) and whether this kernel and container let us unshare."""
    if os.geteuid() != 0:
        return Isolation(False, False)
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _NS_PROBE],
            env={},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        namespaces = probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        namespaces = False
    return Isolation(True, namespaces)


_uids_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _claim_uid() -> int:
    """A random private uid no other run of this process holds now (runs may go on in threads)."""
    with _uids_lock:
        while True:
            uid = UID_BASE + secrets.randbelow(UID_COUNT)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _user_tasks(uid: int) -> int:
    """Tasks (threads) the user ``uid`` runs now: what RLIMIT_NPROC counts."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return n


def _interpreter() -> tuple[str, str, str]:
    """(the folder bind-mounted for the program, the interpreter inside it, that as seen in the
    namespace): the interpreter's installation, whichever venv the job runs in."""
    real = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not real.startswith(prefix + os.sep):  # an interpreter outside its prefix: bind its folder
        prefix = os.path.dirname(real)
    return prefix, real, _PY_MOUNT + real[len(prefix) :]


def _exited(pid: int) -> bool:
    """Whether ``pid`` exited, without reaping it (its process group id stays reserved until then)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _describe(verdict: dict, memory_mb: int, max_processes: int, max_file_kb: int) -> str:
    """A failed program's reason: a limit it hit, else its exception and line."""
    where = f" at line {verdict['line']}" if verdict.get("line") else ""
    error = verdict.get("error") or "an exception"
    errno = verdict.get("errno")
    if error == "SystemExit":
        return f"exited before the end of the program (SystemExit: {verdict.get('message') or None}){where}"
    if error == "MemoryError":
        return f"killed: memory limit ({memory_mb} MiB){where}"
    if errno == 11 and error in ("BlockingIOError", "OSError"):  # EAGAIN from fork: RLIMIT_NPROC
        return f"too many processes (limit {max_processes}){where}"
    if error == "RuntimeError" and "can't start new thread" in verdict.get("message", ""):
        return f"too many processes (limit {max_processes}, threads count){where}"
    if errno == 27:  # EFBIG
        return f"file size limit ({max_file_kb} KiB){where}"
    if errno in (24, 23):  # EMFILE, ENFILE
        return f"too many open files{where}"
    message = verdict.get("message")
    return f"{error}: {message}{where}" if message else f"{error}{where}"


def _signal_reason(code: int) -> str:
    sig = code - 128
    if sig == signal.SIGXCPU:
        return "killed: CPU time limit"
    if sig == signal.SIGXFSZ:
        return "killed: file size limit"
    try:
        return f"killed by {signal.Signals(sig).name}"
    except ValueError:
        return f"exited with status {code}"


def run_python(
    source: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 16,
    max_output_kb: int = 64,
    *,
    max_file_kb: int = 16 * 1024,
) -> SandboxResult:
    """Run ``source`` as a program in the sandbox (see the module docstring) and report how it went.

    Never raises for anything the program does; a sandbox that cannot start (say, an unreadable
    interpreter) is a failed result whose reason starts with ``sandbox:``."""
    iso = isolation()
    start = time.monotonic()
    token = secrets.token_hex(16)
    py_source, real_python, ns_python = _interpreter()
    nproc = max_processes if iso.private_uid else _user_tasks(os.getuid()) + max_processes
    limits = [
        ("RLIMIT_CPU", math.ceil(timeout_s) + 1),
        ("RLIMIT_AS", memory_mb * 1024 * 1024),
        ("RLIMIT_FSIZE", max_file_kb * 1024),
        ("RLIMIT_NOFILE", 64),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", nproc),
    ]
    stdout, stderr, status = bytearray(), bytearray(), bytearray()
    total, timed_out, over = 0, False, False
    proc, uid, status_r, status_w = None, None, -1, -1
    host_dir = tempfile.mkdtemp(prefix="distill-sandbox-")
    try:
        uid = _claim_uid() if iso.private_uid else None
        cwd = _WORKDIR_NS if iso.namespaces else host_dir
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd}
        if iso.namespaces:
            env["LD_LIBRARY_PATH"] = _PY_MOUNT + "/lib"  # a shared libpython's absolute RUNPATH may be unreachable
        if uid is not None and not iso.namespaces:
            os.chown(host_dir, uid, uid)
        status_r, status_w = os.pipe()
        with tempfile.TemporaryFile() as job:
            job.write(json.dumps({"token": token, "source": source}).encode())
            job.flush()
            job.seek(0)
            config = {
                "parent": os.getpid(),
                "namespaces": iso.namespaces,
                "uid": uid,
                "cwd": cwd,
                "disk_kb": 4 * max_file_kb,
                "py_source": py_source,
                "py_mount": _PY_MOUNT,
                "python": ns_python if iso.namespaces else real_python,
                "limits": limits,
                "env": env,
                "runner": _RUNNER,
                "fds": {"job": job.fileno(), "status": status_w},
            }
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=host_dir,
                env={"PATH": env["PATH"], "LANG": "C.UTF-8"},
                pass_fds=(job.fileno(), status_w),
                start_new_session=True,
            )
        os.close(status_w)
        status_w = -1
        assert proc.stdout is not None and proc.stderr is not None
        buffers = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr, status_r: status}
        cap, deadline, exited_at = max_output_kb * 1024, start + timeout_s, None
        with selectors.DefaultSelector() as sel:
            for fd in buffers:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            while not over:
                now = time.monotonic()
                if exited_at is None and _exited(proc.pid):
                    exited_at = now
                if exited_at is not None and (not sel.get_map() or now - exited_at > 0.2):
                    break  # the program is gone; whatever still holds its pipes is killed below
                if now >= deadline:
                    timed_out = True
                    break
                for key, _ in sel.select(min(0.05 if sel.get_map() else 0.002, deadline - now)):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    buf = buffers[key.fd]
                    if key.fd == status_r:
                        buf += chunk[: max(0, 65536 - len(buf))]
                        continue
                    total += len(chunk)
                    buf += chunk
                    del buf[:-_TAIL]
                    if total > cap:
                        over = True
                        break
    finally:
        for fd in (status_w, status_r):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            _stop(proc, uid, iso)
        if uid is not None:
            with _uids_lock:
                _uids_in_use.discard(uid)
        shutil.rmtree(host_dir, ignore_errors=True)
    seconds = time.monotonic() - start
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    code = proc.returncode
    verdict = next(
        (v for v in _verdicts(status) if v.get("token") == token and not timed_out and not over and code in (0, 1)),
        None,
    )
    result = dict(exit_code=code, stdout_tail=out, stderr_tail=err, seconds=seconds)
    if timed_out:
        return SandboxResult(False, reason=f"timed out after {timeout_s:g} s", **result)
    if over:
        return SandboxResult(False, reason=f"output over {max_output_kb} KiB", **result)
    if verdict is not None and verdict.get("ok") and code == 0:
        return SandboxResult(True, reason=None, **result)
    if verdict is not None:
        reason = _describe(verdict, memory_mb, max_processes, max_file_kb)
        plain = not reason.startswith(("killed", "too many", "file size", "exited"))
        error = verdict.get("error") or "an exception"
        if plain and verdict.get("message"):
            error = f"{error}: {verdict['message']}"
        return SandboxResult(False, reason=reason, error=error if plain else None, line=verdict.get("line"), **result)
    if code == 125 and "sandbox: " in err:
        return SandboxResult(False, reason=err[err.index("sandbox: ") :].splitlines()[0], **result)
    if code is not None and code > 128:
        return SandboxResult(False, reason=_signal_reason(code), **result)
    return SandboxResult(False, reason=f"exited with status {code} before the end of the program", **result)


def _verdicts(status: bytes) -> list[dict]:
    out = []
    for line in status.decode(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _stop(proc: subprocess.Popen, uid: int | None, iso: Isolation) -> None:
    """End the run: the launcher kills the program and waits for it (with a PID namespace, every
    process in it is gone then), then its whole process group is killed, and without a namespace, as
    root, every process of the private uid."""
    if not _exited(proc.pid):
        proc.send_signal(signal.SIGTERM)
        until = time.monotonic() + 2.0
        while not _exited(proc.pid) and time.monotonic() < until:
            time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # still unreaped: the group id cannot have been reused
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    if uid is not None and not iso.namespaces:
        subprocess.run([sys.executable, "-I", "-S", "-c", _KILL_UID, str(uid)], env={}, timeout=30, check=False)
