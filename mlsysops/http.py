"""Prometheus metrics and Kubernetes probes on one small HTTP endpoint per service.

``/metrics`` (prometheus-client exposition), ``/healthz`` (the process loop answers) and
``/readyz`` (connected to NATS and the service says it is ready). A hand-written asyncio
handler keeps the footprint small; it only ever answers these three GET paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from mlsysops import logs

log = logs.get(__name__)

DEFAULT_PORTS = {"monitor": 9101, "analyzer": 9102, "planner": 9103, "scheduler": 9104,
                 "executor": 9105}

MESSAGES = Counter("mlsysops_messages_total", "Messages handled", ["service", "kind"])
ERRORS = Counter("mlsysops_errors_total", "Errors while handling", ["service", "kind"])
LATENCY = Histogram(
    "mlsysops_handling_seconds", "Time to handle one message or evaluation",
    ["service", "kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
LAG = Gauge("mlsysops_consumer_lag", "Messages pending for a durable consumer",
            ["service", "consumer"])


async def serve(host: str, port: int, ready: Callable[[], bool]) -> asyncio.AbstractServer:
    """Start the endpoint; returns the server (its sockets tell the bound port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n",
                                                                              b""):
                    pass
            except ValueError:  # a request or header line longer than the stream limit
                status, ctype, body, method = "400 Bad Request", "text/plain", b"bad request\n", ""
            else:
                parts = line.decode("latin-1").split()
                method = parts[0] if parts else ""
                path = parts[1] if len(parts) > 1 else "/"
                status, ctype, body = _route(method, path, ready)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("http endpoint", port=server.sockets[0].getsockname()[1])
    return server


def _route(method: str, path: str, ready: Callable[[], bool]) -> tuple[str, str, bytes]:
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
    path = path.split("?", 1)[0]
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
    if path == "/healthz":
        return "200 OK", "text/plain", b"ok\n"
    if path == "/readyz":
        try:
            ok = bool(ready())
        except Exception as exc:  # a failing readiness check means "not ready", not no answer
            log.warning("readiness check failed", error=f"{type(exc).__name__}: {exc}")
            ok = False
        return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (
            b"ready\n" if ok else b"not ready\n")
    return "404 Not Found", "text/plain", b"not found\n"
