"""A 3-master Redis Cluster on loopback ports for the tests: `redis-server --cluster-enabled yes` ×3 in a
temporary folder, joined by `redis-cli --cluster create`, stopped (and its folder removed) by `stop()`.

`RR_TEST_REDIS_CLUSTER=1` makes the whole test session use one (tests/conftest.py `servers`), which is how
tests/test_redis_cluster.py runs the money tests on a cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from shared.embedded import free_port

__all__ = ["RedisClusterServers"]


class RedisClusterServers:
    def __init__(self, masters: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rr-cluster-"))
        self.ports = [free_port() for _ in range(masters)]
        self.processes: list[subprocess.Popen] = []
        for port in self.ports:
            node = self.dir / str(port)
            node.mkdir()
            self.processes.append(subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf",
                 # The bus port is the data port + 10000 by default: past 65535 for a high free port.
                 "--cluster-port", str(free_port()), "--save", "", "--appendonly", "no", "--dir", str(node)],
                stdout=(node / "log").open("wb"), stderr=subprocess.STDOUT))
        self._wait(lambda: all(self._cli(port, "ping").strip() == "PONG" for port in self.ports), "start")
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self._wait(lambda: all("cluster_state:ok" in self._cli(port, "cluster", "info") for port in self.ports),
                   "agree on the slots")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _cli(self, port: int, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return done.stdout

    def _wait(self, condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Redis Cluster did not {what} within {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
