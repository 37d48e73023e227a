"""Durable pull consumers shared by the replicas of a service.

:func:`consume` creates (or binds to, updating its ack wait) a durable consumer and feeds
each message to a handler with at most ``concurrency`` in flight. It fetches only as many
messages as it has free slots, so no message waits in this process unattended, and it
keeps every message it holds alive with in-progress acks every ``ack_wait / 4`` until the
handler returns: a long handler needs no keep-alive of its own, and the ack wait can stay
short, so that a message whose process died is redelivered within seconds. A handler
acks, naks or terminates the message itself; if it raises, the message is left for
redelivery after ``ack_wait``. The loop survives broker restarts and NATS leader elections
by fetching again (binding again after an error other than a timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.api as api
import nats.js.errors as jserr
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from mlsysops import http, logs
from mlsysops.bus import Bus

log = logs.get(__name__)
LAG_EVERY = 5.0  # seconds between consumer lag readings
MAX_BATCH = 64  # messages asked for in one fetch, at most
LAG_TIMEOUT = 1.0  # seconds a lag reading may take
# seconds one pull request waits for messages: also how long a pull request lost with a
# consumer's leader (a NATS node died) holds up the consumer
FETCH_WINDOW = 2.0


class _Slots:
    """Free handler slots; unlike a semaphore it says how many are free."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._freed = asyncio.Event()

    async def wait(self) -> int:
        """Wait for at least one free slot; return how many are free."""
        while self.free <= 0:
            self._freed.clear()
            await self._freed.wait()
        return self.free

    def take(self) -> None:
        self.free -= 1

    def give(self) -> None:
        self.free += 1
        self._freed.set()


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
    slots = _Slots(concurrency)
    running: set[asyncio.Future[None]] = set()
    held: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, when it was taken)
    ticker = asyncio.ensure_future(_keep_held_alive(held, ack_wait / 4))
    try:
        await _loop(bus, durable, stream, config, handler, family, slots, running, held)
    finally:
        ticker.cancel()
        for task in running:  # stopping: unacked messages come back to another replica
            task.cancel()
        await asyncio.gather(ticker, *running, return_exceptions=True)


async def _subscribe(bus: Bus, durable: str, stream: str,
                     config: api.ConsumerConfig) -> JetStreamContext.PullSubscription:
    """Bind to the durable, first updating an existing one made with other timers.

    ``pull_subscribe`` leaves an existing durable as it is, so a store kept across an
    upgrade would keep its old ack wait for ever.
    """
    try:
        info = await bus.js.consumer_info(stream, durable)
    except jserr.NotFoundError:
        info = None
    if info is not None and (
            abs((info.config.ack_wait or 0) - (config.ack_wait or 0)) > 0.001
            or info.config.max_ack_pending != config.max_ack_pending):
        try:
            await bus.js.add_consumer(stream, config)  # create-or-update: same name
            log.info("consumer updated", consumer=durable, ack_wait=config.ack_wait,
                     max_ack_pending=config.max_ack_pending)
        except Exception as exc:
            log.warning("could not update the consumer; using it as it is", consumer=durable,
                        error=repr(exc))
    return await bus.js.pull_subscribe("", durable=durable, stream=stream, config=config)


async def _loop(bus: Bus, durable: str, stream: str, config: api.ConsumerConfig,
                handler: Callable[[Msg], Awaitable[None]], family: str, slots: _Slots,
                running: set[asyncio.Future[None]], held: dict[int, tuple[Msg, float]]) -> None:
    sub = None
    lag_due = 0.0
    while True:
        free = await slots.wait()  # fetch only what can start now: nothing waits unattended
        try:
            if sub is None:
                sub = await _subscribe(bus, durable, stream, config)
            if time.monotonic() >= lag_due:
                lag_due = time.monotonic() + LAG_EVERY
                await _read_lag(bus.service, durable, sub)
            batch = await sub.fetch(min(free, MAX_BATCH), timeout=FETCH_WINDOW)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("fetch failed; retrying", consumer=durable, error=repr(exc))
            sub = None
            await asyncio.sleep(0.5)
            continue
        # nats.py may hand back more than asked (late deliveries of an earlier pull):
        # those start too, over the limit for a moment, rather than wait unattended
        for msg in batch:
            slots.take()
            held[id(msg)] = (msg, time.monotonic())
            task = asyncio.ensure_future(_run(bus.service, family, handler, msg, slots, held))
            running.add(task)
            task.add_done_callback(running.discard)


async def _read_lag(service: str, durable: str,
                    sub: JetStreamContext.PullSubscription) -> None:
    """Update the lag gauge; never holds up fetching for long (a consumer whose leader
    is being elected answers nothing: the next reading tries again)."""
    try:
        info = await asyncio.wait_for(sub.consumer_info(), LAG_TIMEOUT)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.debug("consumer lag not read", consumer=durable, error=repr(exc))
        return
    http.LAG.labels(service, durable).set(info.num_pending or 0)


async def _run(service: str, kind: str, handler: Callable[[Msg], Awaitable[None]], msg: Msg,
               slots: _Slots, held: dict[int, tuple[Msg, float]]) -> None:
    started = time.perf_counter()
    try:
        await handler(msg)
        http.MESSAGES.labels(service, kind).inc()
    except Exception as exc:
        http.ERRORS.labels(service, kind).inc()
        log.error("handler failed; message left for redelivery", kind=kind, error=repr(exc),
                  exc_info=exc)
    finally:
        held.pop(id(msg), None)
        slots.give()
        http.LATENCY.labels(service, kind).observe(time.perf_counter() - started)


async def _keep_held_alive(held: dict[int, tuple[Msg, float]], every: float) -> None:
    """Every ``every`` s, an in-progress ack for each held message older than half that.

    A message is thus heard from at least every ``every`` s (a quarter of the ack wait)
    for as long as its handler runs, and is redelivered only if this process stops.
    """
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        for msg, since in list(held.values()):
            if now - since < every / 2 or msg.is_acked:
                continue  # just taken, or already acked by its handler
            try:
                await msg.in_progress()
            except Exception as exc:  # disconnected: the next round tries again
                log.debug("in-progress ack failed", error=repr(exc))
