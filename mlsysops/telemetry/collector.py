"""The Monitor's periodic, adaptive collection loop over one telemetry source.

There is a single Monitor and its configuration changes at runtime: :meth:`Collector.update`
replaces what is collected and how often, and takes effect at once (a sleeping loop wakes
and collects the new set; queries no policy asks for any more are simply not asked again).

A source outage must neither stop the loop nor flood operators: the loop retries with
exponential backoff (tenacity, capped at ``backoff_max``), reports the outage once when it
starts and once when it ends ("recovered after 12s"). A query that fails on a healthy
source is reported to the policies that asked, once per distinct message, not every tick.

Time is injected (``clock`` for durations, ``sleep`` for waiting, ``wall`` for record
timestamps) so that tests run the loop without sleeping for real.

Snapshot ids are ``f"{source}-{seq}-{collected_at_ms}"``: ``seq`` counts this collector's
snapshots from 1, ``collected_at_ms`` is the wall-clock collection time in milliseconds.
The id is fixed before publishing (a retried publish keeps it, so JetStream deduplicates
it) and differs after a restart (the time differs even when ``seq`` starts over).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Set
from typing import Any

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from mlsysops.telemetry.source import Source, SourceUnavailable
from mlsysops.telemetry.view import telemetry_view
from mlsysops.wire import ErrorEvent, QueryError, Sample, Telemetry, now

log = structlog.get_logger(__name__)

Publish = Callable[[Telemetry], Awaitable[None]]
Report = Callable[[ErrorEvent], Awaitable[None]]


class Collector:
    """Collect ``source`` forever at the asked interval, publish snapshots, report trouble."""

    def __init__(
        self,
        source: Source,
        publish: Publish,
        report: Report,
        *,
        default_interval: float = 5.0,
        history: int = 60,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        wall: Callable[[], float] = now,
        backoff_initial: float = 1.0,
        backoff_max: float = 10.0,
    ) -> None:
        if default_interval <= 0:
            raise ValueError(f"default_interval must be positive, not {default_interval!r}")
        self.source = source
        self._publish = publish
        self._report = report
        self._default_interval = default_interval
        self._history = history
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._queries: dict[str, frozenset[str]] = {}
        self._interval = default_interval
        self._changed = asyncio.Event()
        self._snapshots: deque[Telemetry] = deque(maxlen=max(history, 0))
        self._seq = 0
        self._attempt_started = 0.0
        self._state = "unknown"  # -> "up" | "down"
        self._since = wall()
        self._down_at = 0.0
        self._last_error = ""
        self._retry_in: float | None = None
        self._last_collected_at: float | None = None
        self._told: dict[str, tuple[str, frozenset[str]]] = {}  # query -> (message, policies)
        self._query_errors: dict[str, str] = {}
        self._publish_failing = False

    # -- configuration -----------------------------------------------------------------
    def update(self, queries: Mapping[str, Set[str]], interval: float | None) -> None:
        """Collect ``queries`` every ``interval`` seconds (None: the default) from now on.

        ``queries`` is ``{query: policies asking}`` as :func:`desired_queries` returns it.
        A change wakes a sleeping loop (or a backoff pause) so it applies at once; the same
        configuration again is a no-op. Call it from the event loop's thread.
        """
        if interval is not None and interval <= 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        new_queries = {q: frozenset(p) for q, p in queries.items()}
        new_interval = self._default_interval if interval is None else float(interval)
        if new_queries == self._queries and new_interval == self._interval:
            return
        self._queries = new_queries
        self._interval = new_interval
        self._told = {q: told for q, told in self._told.items() if q in new_queries}
        self._query_errors = {q: m for q, m in self._query_errors.items() if q in new_queries}
        self._changed.set()

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Collect, publish and wait, forever (cancel the task to stop it)."""
        while True:
            self._attempt_started = self._clock()
            if self._queries:
                await self.tick()
            else:
                self._changed.clear()  # nothing to collect: sleep until asked
            # the period runs from the start of the successful attempt, not of an outage
            await self._pause(self._interval - (self._clock() - self._attempt_started))

    async def tick(self) -> Telemetry:
        """One collection: wait out an outage, then publish and return the snapshot.

        :meth:`run` calls it; call it yourself only when ``run`` is not running.
        """
        samples, errors = await self._collect()
        collected_at = self._wall()
        self._seq += 1
        telemetry = Telemetry(
            id=f"{self.source.name}-{self._seq}-{int(collected_at * 1000)}",
            source=self.source.name,
            collected_at=collected_at,
            samples=samples,
            errors=errors,
        )
        self._last_collected_at = collected_at
        self._snapshots.append(telemetry)
        await self._report_query_errors(errors)
        await self._publish_snapshot(telemetry)
        return telemetry

    async def _collect(self) -> tuple[list[Sample], list[QueryError]]:
        result: tuple[list[Sample], list[QueryError]] = ([], [])
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=self._backoff_initial, max=self._backoff_max),
            sleep=self._pause,
            before_sleep=self._on_failure,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                result = await self.source.collect(self._take_queries())
        await self._on_success()
        return result

    def _take_queries(self) -> dict[str, frozenset[str]]:
        """The queries to ask now; an update after this point wakes the next pause."""
        self._changed.clear()
        self._attempt_started = self._clock()
        return dict(self._queries)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if :meth:`update` changes something meanwhile."""
        if self._changed.is_set():
            return
        if delay <= 0:
            await asyncio.sleep(0)
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    # -- outages -----------------------------------------------------------------------
    async def _on_failure(self, retry_state: RetryCallState) -> None:
        assert retry_state.outcome is not None
        exc = retry_state.outcome.exception()
        self._last_error = _describe(exc)
        self._retry_in = retry_state.upcoming_sleep
        if self._state == "down":
            log.debug(
                "telemetry source still down", source=self.source.name, error=self._last_error
            )
            return
        self._state = "down"
        self._since = self._wall()
        self._down_at = self._clock()
        log.warning("telemetry source down", source=self.source.name, error=self._last_error)
        tb = "" if isinstance(exc, SourceUnavailable) or exc is None else _traceback(exc)
        await self._send(self._event(f"{self.source.name} unavailable: {self._last_error}", tb))

    async def _on_success(self) -> None:
        self._retry_in = None
        if self._state == "up":
            return
        was_down = self._state == "down"
        self._state = "up"
        self._since = self._wall()
        if was_down:
            seconds = self._clock() - self._down_at
            log.info("telemetry source recovered", source=self.source.name, after=seconds)
            await self._send(self._event(f"recovered after {seconds:.0f}s"))

    def _event(self, message: str, tb: str = "") -> ErrorEvent:
        return ErrorEvent(
            kind="telemetry",
            name=self.source.name,
            message=message,
            traceback=tb,
            at=self._wall(),
            details={"source": self.source.name, "state": self._state},
        )

    # -- per-query errors and publishing -------------------------------------------------
    async def _report_query_errors(self, errors: list[QueryError]) -> None:
        """Tell each asking policy about a failing query once per distinct message."""
        failing = {e.query for e in errors}
        self._told = {q: told for q, told in self._told.items() if q in failing}
        self._query_errors = {e.query: e.message for e in errors}
        for error in errors:
            asked = frozenset(error.policies) or self._queries.get(error.query, frozenset())
            message, told = self._told.get(error.query, ("", frozenset()))
            if message != error.message:
                told = frozenset()
            for policy in sorted(asked - told):
                await self._send(self._query_event(policy, error))
            self._told[error.query] = (error.message, asked)

    def _query_event(self, policy: str, error: QueryError) -> ErrorEvent:
        return ErrorEvent(
            kind="policy",
            name=policy,
            message=f"telemetry query {error.query!r} failed on {self.source.name}: "
            f"{error.message}",
            at=self._wall(),
            details={"source": self.source.name, "query": error.query},
        )

    async def _publish_snapshot(self, telemetry: Telemetry) -> None:
        try:
            await self._publish(telemetry)
        except Exception as exc:
            log.warning("publishing telemetry failed", id=telemetry.id, error=_describe(exc))
            if not self._publish_failing:
                self._publish_failing = True
                await self._send(self._event(f"publishing telemetry failed: {_describe(exc)}"))
            return
        self._publish_failing = False

    async def _send(self, event: ErrorEvent) -> None:
        """Report ``event``; a failing reporter is logged, never allowed to stop the loop."""
        try:
            await self._report(event)
        except Exception as exc:
            log.warning("reporting failed", report=event.message, error=_describe(exc))

    # -- read side ---------------------------------------------------------------------
    def snapshots(self) -> list[Telemetry]:
        """The last ``history`` snapshots, oldest first."""
        return list(self._snapshots)

    def view(self) -> dict[str, Any]:
        """What policies receive (see :func:`mlsysops.telemetry.telemetry_view`)."""
        return telemetry_view(self.snapshots(), self._history)

    def status(self) -> dict[str, Any]:
        """State for ``status`` and health endpoints (plain JSON data)."""
        return {
            "source": self.source.name,
            "state": self._state,
            "since": self._since,
            "last_error": self._last_error,
            "retry_in": self._retry_in,
            "queries": {q: sorted(p) for q, p in sorted(self._queries.items())},
            "query_errors": dict(self._query_errors),
            "interval": self._interval,
            "last_collected_at": self._last_collected_at,
            "snapshots": self._seq,
        }


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, SourceUnavailable):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
