"""A real three-master Redis Cluster on loopback ports, owned by one test (no replicas).

Each node is a `redis-server --cluster-enabled yes` in its own temporary directory; the cluster is
created with `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`, as an operator
would. A test may kill one master (SIGKILL) to see how clients behave when a slot range is gone.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from redis_process import find_redis


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int) -> list[int]:
    """n free ports whose cluster-bus ports (port + 10000) are free too."""
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < n:
        p = rng.randrange(20000, 55000)
        if p not in ports and _bindable(p) and _bindable(p + 10000):
            ports.append(p)
    return ports




class RedisClusterProcess:
    """Start three masters, join them into a cluster, stop (or kill) them."""

    def __init__(self, *, masters: int = 3) -> None:
        binaries = find_redis()  # the same redis-server (PATH or embedded) as every other test's
        if binaries.cli is None:
            raise RuntimeError(f"redis-cli is needed next to {binaries.server} (Debian package: redis-server)")
        self.binary, self.cli = str(binaries.server), str(binaries.cli)
        self.ports = cluster_ports(masters)
        self.dir = Path(tempfile.mkdtemp(prefix="polarity-cluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The service's cluster URL: every master as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> RedisClusterProcess:
        for port in self.ports:
            (self.dir / str(port)).mkdir()
            self._spawn(port)
        for port in self.ports:
            self._wait(lambda p=port: self.command(p, "PING").strip() == "PONG", f"node {port} did not start")
        created = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        for port in self.ports:
            self._wait(lambda p=port: "cluster_state:ok" in self.command(p, "CLUSTER", "INFO"),
                       f"node {port} never saw cluster_state:ok")
        return self

    def command(self, port: int, *args: str) -> str:
        """redis-cli -p PORT ARGS...: its stdout."""
        done = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return done.stdout

    def _spawn(self, port: int) -> None:
        node_dir = self.dir / str(port)
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000", "--save", "",
             "--appendonly", "no", "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def restart(self, port: int) -> None:
        """Start a killed master again: same port and nodes.conf, so it takes its slots back (empty:
        no persistence), and wait until every node reports cluster_state:ok."""
        self._spawn(port)
        self._wait(lambda: self.command(port, "PING").strip() == "PONG", f"node {port} did not restart")
        for p in self.ports:
            self._wait(lambda p=p: "cluster_state:ok" in self.command(p, "CLUSTER", "INFO"),
                       f"node {p} never saw cluster_state:ok after the restart", timeout=30)

    def slots_of(self, port: int) -> list[tuple[int, int]]:
        """Slot ranges served by the master on `port`."""
        out = []
        for line in self.command(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if fields[1].startswith(f"127.0.0.1:{port}@"):
                out += [tuple(int(x) for x in r.split("-")) if "-" in r else (int(r), int(r))
                        for r in fields[8:] if not r.startswith("[")]
        return out  # type: ignore[return-value]

    def kill(self, port: int) -> None:
        """SIGKILL one master: its slots stop answering (no replica to fail over to)."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    @staticmethod
    def _wait(check: object, message: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise RuntimeError(message)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
