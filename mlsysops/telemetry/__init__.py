"""Telemetry: what the single, adaptive Monitor collects, from where, and how policies see it.

The Monitor runs once per agent and its configuration changes at runtime: each policy
declares in its context which metrics it needs and how often, and the Monitor follows the
union of those wishes. This package is the part of the Monitor that does not talk to NATS:

- :func:`desired_queries` turns every policy's ``{"telemetry": {...}}`` section into one
  set of queries (with the policies that asked each) and one period (the smallest asked);
- a *source* answers queries: :class:`PrometheusSource` (any PromQL expression, through
  ``prometheus-api-client``) or :class:`HostSource` (a built-in stand-in for a laptop
  without Prometheus, serving the node exporter's metric names for the local host);
- :class:`Collector` drives one source forever: collect, publish a :class:`~mlsysops.wire.
  Telemetry` snapshot, sleep; it backs off while the source is down and reports an outage
  once, and its recovery once;
- :func:`telemetry_view` builds the dict handed to policies from recent snapshots.

What a policy declares (in its context)::

    {"telemetry": {"metrics": ["node_load1", "rate(node_cpu_seconds_total[1m])"],
                   "system_scrape_interval": "5s"}}

What a policy receives (public API for policy authors; every key is always present)::

    {
      "latest": {                    # the newest snapshot of each source, merged
        "node_load1": [              # metric name: Prometheus' __name__ label when the
          {"value": 0.42,            #   result has one, else the query text itself, e.g.
           "labels": {"instance": "node1:9100", "job": "node"},  # "rate(node_cpu_...[1m])"
           "ts": 1732280000.123},    # sample time, Unix seconds
          ...
        ],
        ...
      },
      "history": [                   # recent snapshots, oldest first, at most `history`
        {"collected_at": 1732279995.0, "source": "prometheus",
         "metrics": {"node_load1": [{"value": ..., "labels": {...}, "ts": ...}, ...]}},
        ...
      ],
      "collected_at": 1732280000.2,  # when the newest snapshot was taken (None: no data)
      "errors": {"rate(node_load1[": "bad_data: ..."},  # queries of the newest snapshots
    }                                                    # that failed, with why

Conventions worth knowing as a policy author:

- labels are kept as the source gives them; Prometheus adds ``instance`` and ``job``, the
  built-in host source gives ``instance`` and ``node`` (both the host name);
- a scalar result (``time()``, ``scalar(...)``) is one sample named by the query text with
  no labels; an expression that matches nothing gives no samples and no error;
- NaN and infinite values are dropped (JSON cannot carry them);
- a query that failed (bad PromQL, not served by the host source) is missing from
  ``latest``, listed in ``errors``, and reported once to the policies that asked.
"""

from __future__ import annotations

from mlsysops.telemetry.collector import Collector
from mlsysops.telemetry.host import HostSource
from mlsysops.telemetry.prometheus import PrometheusSource
from mlsysops.telemetry.queries import MIN_INTERVAL, desired_queries
from mlsysops.telemetry.source import Queries, Source, SourceUnavailable
from mlsysops.telemetry.view import telemetry_view

__all__ = [
    "MIN_INTERVAL",
    "Collector",
    "HostSource",
    "PrometheusSource",
    "Queries",
    "Source",
    "SourceUnavailable",
    "desired_queries",
    "telemetry_view",
]
