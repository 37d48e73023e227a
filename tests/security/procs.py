"""A nats-server started from a configuration file, and services run as real processes.

Services get their settings from flags or from ``MLSYSOPS_*`` variables, as an operator
gives them; their output (structlog, stderr) is kept per service for the secret checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import NatsServer, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SERVICES = ("monitor", "analyzer", "planner", "scheduler", "executor")


def configured_server(tmp_path: Path, config: str, env: dict[str, str] | None = None,
                      name: str = "server") -> NatsServer:
    """Start nats-server with ``config`` (JetStream, port and store come from flags)."""
    conf = tmp_path / f"{name}.conf"
    conf.write_text(config)
    server = NatsServer(free_port(), tmp_path / f"{name}-js",
                        extra=("-c", str(conf), "-l", str(tmp_path / f"{name}.log")))
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # the server reads $VARIABLES of its config from here
    try:
        server.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return server


def base_env(**settings: str) -> dict[str, str]:
    """The environment of a service: no inherited MLSYSOPS_* variables, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSYSOPS_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update({"MLSYSOPS_HTTP_PORT": "0", "MLSYSOPS_STORAGE": "memory"})
    env.update(settings)
    return env


class Services:
    """Service processes with their own flags and environment; output kept per service."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, env: dict[str, str], args: tuple[str, ...] = (),
              label: str | None = None) -> subprocess.Popen[bytes]:
        label = label or name
        with open(self.logdir / f"{label}.log", "ab") as log:  # the child keeps its own fd
            proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", *args],
                                    env=env, stdout=log, stderr=log, cwd=str(ROOT))
        self.procs[label] = proc
        return proc

    def log(self, label: str) -> str:
        path = self.logdir / f"{label}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {label}\n{self.log(label)[-3000:]}" for label in self.procs)

    def wait_exit(self, label: str, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.procs[label].poll()
            if code is not None:
                return code
            time.sleep(0.05)
        return None

    def stop(self, grace: float = 8) -> None:
        """SIGTERM, then SIGKILL what is still running after ``grace`` seconds."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # e.g. still connecting: SIGTERM is not heard
                proc.kill()
                proc.wait(5)
        self.procs.clear()
