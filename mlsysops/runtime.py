"""How every service process starts and stops.

As in kopf's ``main()``: parse settings, configure logs, connect, then run the service's
root tasks together with the HTTP endpoint and a heartbeat; if any root task dies, all
are stopped and the process exits non-zero, so that a supervisor (``mlsysops up``,
Kubernetes) restarts it. SIGTERM and SIGINT stop everything cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from mlsysops import http, logs, settings, subjects, wire
from mlsysops.bus import Bus
from mlsysops.errors import BadInput, PermanentError

HEARTBEAT_EVERY = 5.0
HEARTBEAT_TTL = 15.0


class Service(Protocol):
    name: str

    def tasks(self) -> list[Awaitable[None]]: ...

    def ready(self) -> bool: ...

    def role(self) -> str: ...


def main(name: str, build: Callable[[Bus], Service], argv: Sequence[str] | None = None) -> int:
    """Entry point of one service: ``mlsysops-<name>`` and ``python -m services.<name>``."""
    try:
        cfg = settings.parse(argv, f"mlsysops {name} service")
    except BadInput as exc:
        print(f"mlsysops-{name}: {exc}", file=sys.stderr)
        return 2
    bus = Bus(cfg, name)
    logs.configure(cfg.log_format, cfg.log_level, service=name, instance=bus.instance)
    try:
        return asyncio.run(run(bus, build))
    except KeyboardInterrupt:
        return 0


async def run(bus: Bus, build: Callable[[Bus], Service]) -> int:
    log = logs.get(bus.service)
    log.info("starting", settings=bus.settings.redacted())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connecting = asyncio.ensure_future(bus.connect())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():  # SIGTERM while the server is unreachable
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await bus.close()
        log.info("stopped before connecting")
        return 0
    stopping.cancel()
    try:
        connecting.result()
    except PermanentError as exc:  # refused credentials, missing permissions
        log.error("cannot start", error=str(exc))
        print(f"mlsysops-{bus.service}: {exc}", file=sys.stderr)
        await bus.close()
        return 3
    service = build(bus)
    port = bus.settings.http_port
    if port < 0:
        port = http.DEFAULT_PORTS.get(bus.service, 0)
    server = None
    if port or bus.settings.http_port == -1:
        server = await http.serve(bus.settings.http_host, port,
                                  lambda: bus.is_connected and service.ready())
    roots = [asyncio.ensure_future(t) for t in service.tasks()]
    roots.append(asyncio.ensure_future(heartbeat(bus, service)))
    stopper = asyncio.ensure_future(stop.wait())
    code = 0
    try:
        done, _ = await asyncio.wait([*roots, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                log.error("root task died; stopping", error=repr(task.exception()),
                          exc_info=task.exception())
                code = 1
    finally:
        for task in [*roots, stopper]:
            task.cancel()
        # a task that does not end promptly on cancellation must not hold the shutdown
        await asyncio.wait([*roots, stopper], timeout=5)
        if server is not None:
            server.close()
            await server.wait_closed()
        close = getattr(service, "close", None)
        if close is not None:
            close()
        await bus.close()
    log.info("stopped", code=code)
    return code


async def heartbeat(bus: Bus, service: Service) -> None:
    """Keep ``svc.<service>.<instance>`` alive in the leases bucket for ``mlsysops status``."""
    started = wire.now()
    key = f"svc.{bus.service}.{bus.instance.replace('.', '_')}"
    while True:
        beat = wire.ServiceHeartbeat(service=bus.service, instance=bus.instance,
                                     started_at=started, updated_at=wire.now(),
                                     role=service.role())
        try:
            await bus.put_with_ttl(subjects.BUCKET_LEASES, key, wire.encode(beat), HEARTBEAT_TTL)
        except Exception as exc:
            logs.get(bus.service).debug("heartbeat failed", error=str(exc))
        await asyncio.sleep(HEARTBEAT_EVERY)
