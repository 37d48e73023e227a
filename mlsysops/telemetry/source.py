"""The one interface every telemetry source implements, and the error that means "down".

A source answers a batch of queries. A query it cannot answer is data (a
:class:`~mlsysops.wire.QueryError` naming the policies that asked); a source it cannot
reach at all is an exception (:class:`SourceUnavailable`), so that the collector can tell
"this expression is wrong" (report it to the policy) from "try again later" (back off).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Protocol

from mlsysops.errors import TemporaryError
from mlsysops.wire import QueryError, Sample

Queries = Mapping[str, Set[str]]
"""``{query: policies that asked for it}``."""


class SourceUnavailable(TemporaryError):
    """The whole source is unreachable, too slow or answers nonsense; retry later."""


class Source(Protocol):
    """A telemetry source: ``name`` names it in snapshots, status and error reports."""

    name: str

    async def collect(self, queries: Queries) -> tuple[list[Sample], list[QueryError]]:
        """Samples of every query it could answer and one error per query it could not.

        Raises :class:`SourceUnavailable` when nothing can be answered now.
        """
        ...


def query_error(query: str, message: str, policies: Set[str]) -> QueryError:
    """A :class:`QueryError` with the asking policies in a stable order."""
    return QueryError(query=query, message=message, policies=sorted(policies))
