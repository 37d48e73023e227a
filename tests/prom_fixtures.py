"""Real Prometheus and node exporter processes for tests, on free ports and temp dirs.

The Debian packages ``prometheus`` and ``prometheus-node-exporter`` install system services;
these fixtures never use them. They start their own node exporter, and a Prometheus
scraping it every second with its TSDB in a temp dir, both on free ports of 127.0.0.1.

The processes are shared by the test session, because Prometheus scrapes nothing during
its first ~5 s (its discovery manager batches target updates). The ``node_exporter`` and
``prometheus`` fixtures yield a :class:`Daemon`, a handle whose ``stop()`` and ``start()``
stop and start the process again on the same port and data (to test outages), and they
start it again for the next test if a test left it stopped. The handle is synchronous and
``start()`` waits until the server is ready (Prometheus: until it has fresh data); from an
async test call it through ``asyncio.to_thread`` so that the event loop keeps running.

``tests/conftest.py`` imports them (``from tests.prom_fixtures import *`` brings the four
fixtures and :class:`Daemon`). Missing binaries skip the test locally and fail it in CI.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.requirements import need_binary

__all__ = [
    "Daemon",
    "node_exporter",
    "node_exporter_process",
    "prometheus",
    "prometheus_process",
    "prometheus_query",
]

STARTUP_TIMEOUT = 30.0
SCRAPE_INTERVAL = "1s"


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """A server process the test can stop and start again (same port, same data)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        url: str,
        *,
        ready_path: str,
        log_path: Path,
        ready_check: Callable[[Daemon], bool] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.url = url
        self.ready_path = ready_path
        self.log_path = log_path
        self._ready_check = ready_check
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """``host:port``, as Prometheus names a scrape target in the ``instance`` label."""
        return urllib.parse.urlsplit(self.url).netloc

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the process and wait until it is ready (and has data, for Prometheus)."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if not self.running:
                self._fail(f"exited with status {self._returncode()} while starting")
            if time.monotonic() > deadline:
                self.stop()
                self._fail(f"not ready after {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s); no-op when stopped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str, timeout: float = 2.0) -> bytes:
        """GET ``path`` from the server (raises ``OSError`` when it does not answer 200)."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return bytes(response.read())

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _ready(self) -> bool:
        try:
            self.get(self.ready_path)
        except OSError:
            return False
        return self._ready_check is None or self._ready_check(self)

    def _returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def _fail(self, why: str) -> None:
        raise RuntimeError(f"{self.name} {why}; {' '.join(self.argv)}\n{self.log_tail()}")


def prometheus_query(daemon: Daemon, query: str) -> list[dict[str, object]]:
    """Result of an instant query against a Prometheus daemon (empty on any failure)."""
    try:
        body = daemon.get("/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        result = json.loads(body)["data"]["result"]
    except (OSError, ValueError, KeyError):
        return []
    return list(result) if isinstance(result, list) else []


def _has_fresh_node_data(daemon: Daemon) -> bool:
    """Prometheus has scraped the node exporter within the last few seconds."""
    return bool(prometheus_query(daemon, 'time() - timestamp(node_load1{job="node"}) < 3'))


@pytest.fixture(scope="session")
def node_exporter_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The session's node exporter (use :func:`node_exporter`, which ensures it runs)."""
    binary = need_binary("prometheus-node-exporter", "/usr/bin")
    port = free_port()
    daemon = Daemon(
        "node exporter",
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        f"http://127.0.0.1:{port}",
        ready_path="/metrics",
        log_path=tmp_path_factory.mktemp("node-exporter") / "node-exporter.log",
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def prometheus_process(
    node_exporter_process: Daemon, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """The session's Prometheus (use :func:`prometheus`, which ensures it runs)."""
    binary = need_binary("prometheus", "/usr/bin")
    port = free_port()
    home = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}\n"
        "scrape_configs:\n"
        "  - job_name: node\n"
        "    static_configs:\n"
        f"      - targets: ['{node_exporter_process.target}']\n"
    )
    daemon = Daemon(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"http://127.0.0.1:{port}",
        ready_path="/-/ready",
        log_path=home / "prometheus.log",
        ready_check=_has_fresh_node_data,
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def node_exporter(node_exporter_process: Daemon) -> Daemon:
    """A running node exporter on a free port of 127.0.0.1: ``.url``, ``.target``, ``.stop()``."""
    node_exporter_process.start()  # again, if an earlier test stopped it
    return node_exporter_process


@pytest.fixture
def prometheus(prometheus_process: Daemon, node_exporter: Daemon) -> Daemon:
    """A ready Prometheus scraping ``node_exporter`` every second (job ``node``), with data
    no older than 3 s.

    ``.url`` is the base URL for ``PrometheusSource``; ``.stop()`` / ``.start()`` simulate an
    outage (``start`` blocks until ready again: use ``asyncio.to_thread`` in async tests).
    """
    prometheus_process.start()  # again, if an earlier test stopped it
    return prometheus_process
