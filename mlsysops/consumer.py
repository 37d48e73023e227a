"""Durable pull consumers shared by the replicas of a service.

:func:`consume` creates (or binds to) a durable consumer and feeds each message to a
handler with at most ``concurrency`` in flight. A handler acks, naks or terminates the
message itself; if it raises, the message is left for redelivery after ``ack_wait``.
The loop survives broker restarts by fetching again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.api as api
from nats.aio.msg import Msg

from mlsysops import http, logs
from mlsysops.bus import Bus

log = logs.get(__name__)
LAG_EVERY = 5.0  # seconds between consumer lag readings


async def consume(
    bus: Bus,
    family: str,
    durable: str,
    handler: Callable[[Msg], Awaitable[None]],
    *,
    concurrency: int = 16,
    ack_wait: float = 30.0,
    max_ack_pending: int = 1000,
) -> None:
    stream = bus.subjects.stream(family)
    config = api.ConsumerConfig(
        durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait,
        max_ack_pending=max_ack_pending, deliver_policy=api.DeliverPolicy.ALL,
    )
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Future[None]] = set()
    try:
        await _loop(bus, durable, stream, config, handler, family, concurrency, slots, running)
    finally:
        for task in running:  # stopping: unacked messages come back to another replica
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _loop(bus: Bus, durable: str, stream: str, config: api.ConsumerConfig,
                handler: Callable[[Msg], Awaitable[None]], family: str, concurrency: int,
                slots: asyncio.Semaphore, running: set[asyncio.Future[None]]) -> None:
    sub = None
    lag_due = 0.0
    while True:
        try:
            if sub is None:
                sub = await bus.js.pull_subscribe("", durable=durable, stream=stream,
                                                  config=config)
            if time.monotonic() >= lag_due:
                lag_due = time.monotonic() + LAG_EVERY
                info = await sub.consumer_info()
                http.LAG.labels(bus.service, durable).set(info.num_pending or 0)
            batch = await sub.fetch(min(concurrency, 64), timeout=5)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("fetch failed; retrying", consumer=durable, error=repr(exc))
            sub = None
            await asyncio.sleep(0.5)
            continue
        for msg in batch:
            await slots.acquire()
            task = asyncio.ensure_future(_run(bus.service, family, handler, msg, slots))
            running.add(task)
            task.add_done_callback(running.discard)


async def _run(service: str, kind: str, handler: Callable[[Msg], Awaitable[None]], msg: Msg,
               slots: asyncio.Semaphore) -> None:
    started = time.perf_counter()
    try:
        await handler(msg)
        http.MESSAGES.labels(service, kind).inc()
    except Exception as exc:
        http.ERRORS.labels(service, kind).inc()
        log.error("handler failed; message left for redelivery", kind=kind, error=repr(exc),
                  exc_info=exc)
    finally:
        slots.release()
        http.LATENCY.labels(service, kind).observe(time.perf_counter() - started)


async def keep_alive(msg: Msg, every: float) -> None:
    """Tell JetStream, every ``every`` s, that ``msg`` is still being worked on.

    Run it as a task beside a long handler: the ack wait can then stay short, so that a
    message whose handler died is redelivered soon.
    """
    while True:
        await asyncio.sleep(every)
        try:
            await msg.in_progress()
        except Exception:
            return
