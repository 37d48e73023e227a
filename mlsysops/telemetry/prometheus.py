"""Telemetry from a Prometheus server: any PromQL expression a policy writes.

``prometheus-api-client`` is synchronous (requests), so a whole batch of queries runs in a
worker thread and the event loop never blocks. Its own retries are switched off: while
Prometheus is down the collector backs off (with tenacity) and reports the outage once,
which it can only do if a failed request fails at once.

Prometheus tells a wrong query from a broken server in the JSON body of an error
(``errorType`` ``bad_data``, ``execution``, ...): those become a :class:`QueryError` for
that query alone; anything else (connection refused, timeout, 503 while starting, a page
that is not the Prometheus API) raises :class:`SourceUnavailable`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import re
from collections.abc import Mapping
from typing import Any, cast

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from mlsysops.errors import BadInput
from mlsysops.telemetry.source import Queries, SourceUnavailable, query_error
from mlsysops.wire import QueryError, Sample

# errorType values of the Prometheus HTTP API that are about the query, not the server
_QUERY_ERROR_TYPES = frozenset({"bad_data", "execution", "timeout", "canceled"})
_STATUS = re.compile(r"^HTTP Status Code (\d+) \((.*)\)$", re.DOTALL)
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>: ")


class PrometheusSource:
    """Instant queries against the Prometheus at ``url`` (each request bounded by ``timeout``)."""

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        *,
        name: str = "prometheus",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not url:
            raise BadInput("a Prometheus URL is required", path="prometheus_url")
        self.name = name
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client = PrometheusConnect(
            url=self.url,
            headers=dict(headers) if headers else None,
            retry=Retry(total=0, raise_on_status=False),
            timeout=cast(Any, timeout),
        )

    async def collect(self, queries: Queries) -> tuple[list[Sample], list[QueryError]]:
        batch = {query: frozenset(policies) for query, policies in queries.items()}
        return await asyncio.to_thread(self._collect_batch, batch)

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()

    # -- in the worker thread ----------------------------------------------------------
    def _collect_batch(
        self, queries: Mapping[str, frozenset[str]]
    ) -> tuple[list[Sample], list[QueryError]]:
        samples: list[Sample] = []
        errors: list[QueryError] = []
        for query in sorted(queries):
            result, message = self._query(query)
            if message is None:
                message = _to_samples(query, result, samples)
            if message is not None:
                errors.append(query_error(query, message, queries[query]))
        return _unique(samples), errors

    def _query(self, query: str) -> tuple[Any, str | None]:
        """The raw result of ``query``, or why Prometheus refused it; raises if it is down."""
        try:
            return self._client.custom_query(query, params={"timeout": f"{self.timeout:g}"}), None
        except PrometheusApiClientException as exc:
            error_type, message = api_error(str(exc))
            if error_type in _QUERY_ERROR_TYPES:
                return None, message
            raise SourceUnavailable(f"Prometheus at {self.url} failed: {message}") from exc
        except requests.Timeout as exc:
            raise SourceUnavailable(
                f"Prometheus at {self.url} did not answer within {self.timeout}s"
            ) from exc
        except requests.RequestException as exc:
            raise SourceUnavailable(
                f"Prometheus at {self.url} is unreachable: {_reason(exc)}"
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceUnavailable(
                f"{self.url} does not answer like the Prometheus HTTP API: {exc!r}"
            ) from exc


def api_error(text: str) -> tuple[str, str]:
    """``(errorType, message)`` from a ``PrometheusApiClientException`` message.

    The client only keeps ``"HTTP Status Code 400 (b'{...json...}')"``; the JSON body of
    the Prometheus API says whether the query or the server is at fault. ``errorType`` is
    ``""`` when the body is not a Prometheus error (a proxy page, "Service Unavailable").
    """
    match = _STATUS.match(text)
    if match is None:
        return "", text
    status, body = match.groups()
    try:
        raw = ast.literal_eval(body)
        doc = json.loads(raw)
        return str(doc["errorType"]), f"{doc['errorType']}: {doc['error']}"
    except (ValueError, SyntaxError, TypeError, KeyError):
        return "", f"HTTP {status}: {body[:200]}"


def _to_samples(query: str, result: Any, out: list[Sample]) -> str | None:
    """Append the samples of one query result to ``out``; the reason it has none usable."""
    if _is_point(result):  # scalar or string result: [ts, "value"]
        value = _number(result[1])
        if value is None:
            return f"returns the string {result[1]!r}, not a number"
        if math.isfinite(value):
            out.append(Sample(metric=query, value=value, ts=float(result[0])))
        return None
    for item in result:
        if "value" not in item:
            return (
                "returns a range vector; ask for an instant value instead, e.g. "
                "rate(...[1m]) or last_over_time(...[1m])"
            )
        labels = {str(k): str(v) for k, v in item.get("metric", {}).items()}
        metric = labels.pop("__name__", query)
        value = _number(item["value"][1])
        if value is not None and math.isfinite(value):
            out.append(
                Sample(metric=metric, value=value, labels=labels, ts=float(item["value"][0]))
            )
    return None


def _unique(samples: list[Sample]) -> list[Sample]:
    """Samples without repeats: two queries may select the same series (``x``, ``x{job="a"}``)."""
    seen: set[tuple[str, frozenset[tuple[str, str]]]] = set()
    out: list[Sample] = []
    for sample in samples:
        key = (sample.metric, frozenset(sample.labels.items()))
        if key not in seen:
            seen.add(key)
            out.append(sample)
    return out


def _is_point(result: Any) -> bool:
    return (
        isinstance(result, list)
        and len(result) == 2
        and isinstance(result[0], int | float)
        and isinstance(result[1], str)
    )


def _number(raw: Any) -> float | None:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    """The innermost readable reason of a requests error (not urllib3's wrapping)."""
    reason: object = exc
    if exc.args and isinstance(exc.args[0], MaxRetryError) and exc.args[0].reason is not None:
        reason = exc.args[0].reason
    return _OBJECT_REPR.sub("", str(reason))
