"""The per-service HTTP endpoint: /metrics, /healthz, /readyz and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from mlsysops import http


@dataclass
class Endpoint:
    port: int
    ready: bool = True
    raises: bool = False

    def is_ready(self) -> bool:
        if self.raises:
            raise RuntimeError("readiness check broke")
        return self.ready


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    state = Endpoint(port=0)
    server = await http.serve("127.0.0.1", 0, state.is_ready)
    state.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    assert state.port > 0
    yield state
    server.close()
    await server.wait_closed()


async def request(port: int, raw: bytes) -> Response:
    """Send raw bytes, read until the server closes, parse the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Response(status, headers, body)


async def get(port: int, path: str, method: str = "GET") -> Response:
    return await request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def test_metrics(endpoint: Endpoint) -> None:
    http.MESSAGES.labels(service="test-http", kind="probe").inc()
    r = await get(endpoint.port, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert int(r.headers["content-length"]) == len(r.body)
    text = r.body.decode()
    assert "# TYPE mlsysops_messages_total counter" in text
    assert 'mlsysops_messages_total{kind="probe",service="test-http"}' in text
    for name in ("mlsysops_errors_total", "mlsysops_handling_seconds",
                 "mlsysops_consumer_lag"):
        assert name in text


async def test_healthz(endpoint: Endpoint) -> None:
    endpoint.ready = False  # liveness does not depend on readiness
    r = await get(endpoint.port, "/healthz")
    assert (r.status, r.body) == (200, b"ok\n")
    assert r.headers["connection"] == "close"
    r = await get(endpoint.port, "/healthz?verbose=1")
    assert r.status == 200


async def test_readyz_follows_the_callback(endpoint: Endpoint) -> None:
    r = await get(endpoint.port, "/readyz")
    assert (r.status, r.body) == (200, b"ready\n")
    endpoint.ready = False
    r = await get(endpoint.port, "/readyz")
    assert (r.status, r.body) == (503, b"not ready\n")
    endpoint.ready = True
    assert (await get(endpoint.port, "/readyz")).status == 200


async def test_readyz_is_503_when_the_callback_raises(endpoint: Endpoint) -> None:
    endpoint.raises = True
    r = await get(endpoint.port, "/readyz")
    assert (r.status, r.body) == (503, b"not ready\n")
    # The endpoint keeps serving.
    assert (await get(endpoint.port, "/healthz")).status == 200


@pytest.mark.parametrize(
    "path", ["/", "/metric", "/metrics/", "/metrics/x", "/healthz/..", "/HEALTHZ", "/favicon.ico",
             "healthz", "*"],
)
async def test_other_paths_are_404(endpoint: Endpoint, path: str) -> None:
    r = await get(endpoint.port, path)
    assert (r.status, r.body) == (404, b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_only_get_is_answered(endpoint: Endpoint, method: str) -> None:
    r = await get(endpoint.port, "/healthz", method)
    assert r.status == 405


async def test_head_has_no_body(endpoint: Endpoint) -> None:
    r = await get(endpoint.port, "/healthz", "HEAD")
    assert r.status == 200 and r.body == b""
    assert r.headers["content-length"] == "3"


@pytest.mark.parametrize(
    "raw",
    [b"", b"\r\n", b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"\xff\xfe /x HTTP/1.1\r\n\r\n",
     b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
     b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n"],
)
async def test_malformed_requests_do_not_break_the_endpoint(endpoint: Endpoint,
                                                            raw: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    try:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:  # the server may close on a request it will not read in full
        data = b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert data == b"" or data.startswith(b"HTTP/1.1 ")
    assert not data.startswith(b"HTTP/1.1 200")
    assert (await get(endpoint.port, "/healthz")).status == 200


async def test_a_silent_client_does_not_block_others(endpoint: Endpoint) -> None:
    _, silent = await asyncio.open_connection("127.0.0.1", endpoint.port)
    try:
        results = await asyncio.gather(*(get(endpoint.port, p)
                                         for p in ("/healthz", "/readyz", "/metrics") * 5))
        assert [r.status for r in results] == [200] * 15
    finally:
        silent.close()
        await silent.wait_closed()


async def test_urllib_client(endpoint: Endpoint) -> None:
    """A real HTTP client (as a probe or Prometheus would be), in a thread."""
    base = f"http://127.0.0.1:{endpoint.port}"

    def fetch(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    status, body = await asyncio.to_thread(fetch, "/metrics")
    assert status == 200 and b"mlsysops_messages_total" in body
    assert await asyncio.to_thread(fetch, "/healthz") == (200, b"ok\n")
    assert await asyncio.to_thread(fetch, "/readyz") == (200, b"ready\n")
    endpoint.ready = False
    assert await asyncio.to_thread(fetch, "/readyz") == (503, b"not ready\n")
    assert await asyncio.to_thread(fetch, "/nothing") == (404, b"not found\n")


def test_default_ports_are_distinct() -> None:
    assert set(http.DEFAULT_PORTS) == {"monitor", "analyzer", "planner", "scheduler", "executor"}
    assert len(set(http.DEFAULT_PORTS.values())) == 5
