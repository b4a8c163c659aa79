"""A real multi-node Ray cluster on loopback, for the tests and bench scripts: each node is its own
``ray start`` (its own raylet, object store, resources and temp dir), and one node can be killed alone.

Only this cluster's processes are ever touched: each ``ray start`` runs in a new session, so a node's
processes are the ones in that session (its raylet, object store, agents and the workers the raylet
starts) plus their children. ``ray stop`` is never called — it stops every Ray process on the machine,
other people's included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One ``ray start``: its name, temp dir and the session its processes run in."""

    name: str
    temp_dir: Path
    session: int = 0  # the session id (the pid of the ``ray start`` that led it)
    resources: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        """Every live process of this node: its session's, and their children (Ray workers included)."""
        import psutil

        found: set[int] = set()
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.session and p.status() != psutil.STATUS_ZOMBIE:
                    found.add(p.pid)
                    found.update(c.pid for c in p.children(recursive=True))
            except (OSError, psutil.Error):
                continue
        found.discard(os.getpid())
        return sorted(found)

    def kill(self) -> list[int]:
        """SIGKILL every process of this node at once (raylet, object store, agents, workers); returns the pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def titles(self) -> list[str]:
        """The command lines of this node's processes (a Ray actor's reads ``ray::ClassName...``)."""
        out = []
        for pid in self.pids():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        return out


class LocalCluster:
    """A head node and worker nodes joined to it on 127.0.0.1. ``address`` is what ``--address`` takes."""

    def __init__(self, root: Path | None = None):
        # Short paths: Ray's unix sockets live under the temp dir and a socket path has ~107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dc-", dir=root or "/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def _env(self) -> dict:
        from distill.core.env import set_env_defaults

        set_env_defaults()
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}
        return {**env, "RAY_USAGE_STATS_ENABLED": "0"}

    def add_node(self, name: str, num_cpus: int = 1, resources: dict | None = None, timeout: float = 120) -> Node:
        """Start a node (the first one is the head; ``name`` is its resource label unless ``resources`` says
        otherwise) and wait until the cluster lists it alive."""
        head = not self.nodes
        node = Node(name, self.root / name, resources=resources or {name: 1})
        ports = {
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        if head:
            ports |= {"--port": self.port, "--ray-client-server-port": free_port(), "--dashboard-port": free_port()}
        cmd = [RAY, "start", "--head"] if head else [RAY, "start", "--address", self.address]
        cmd += ["--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus)]
        cmd += ["--resources", json.dumps(node.resources), "--temp-dir", str(node.temp_dir), "--disable-usage-stats"]
        cmd += ["--include-dashboard", "false"] if head else []
        for k, v in ports.items():
            cmd += [k, str(v)]
        before = {n["node_id"] for n in self.alive_nodes()} if not head else set()
        log = (self.root / f"{name}.start.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        node.session = proc.pid
        self.nodes.append(node)  # before waiting: a failed start is still torn down
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"ray start for {name} exited {rc}: {(self.root / f'{name}.start.log').read_text()}")
        self.wait_for(lambda alive: any(n["node_id"] not in before for n in alive), timeout)
        return node

    def alive_nodes(self) -> list[dict]:
        """The nodes the cluster's GCS lists as alive: ``{"node_id", "resources"}`` each."""
        from ray._raylet import GcsClient

        client = GcsClient(address=self.address)
        out = []
        for node_id, info in client.get_all_node_info(timeout=10).items():
            if info.state == 0:  # ALIVE
                out.append({"node_id": node_id.hex(), "resources": dict(info.resources_total)})
        return out

    def wait_for(self, until, timeout: float = 120) -> list[dict]:
        """Poll the alive nodes until ``until(nodes)`` holds; returns them."""
        t0 = time.monotonic()
        while True:
            try:
                alive = self.alive_nodes()
                if until(alive):
                    return alive
            except Exception:  # the GCS still starting
                if time.monotonic() - t0 > timeout:
                    raise
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"cluster at {self.address}: nodes {alive} after {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Kill every process of every node (workers first, the head last) and remove the temp dirs."""
        for node in reversed(self.nodes):
            for _ in range(3):  # a raylet may start a worker while the others are being killed
                if not node.kill():
                    break
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
