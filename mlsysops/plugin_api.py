"""The public API of plugins: the only module of this package a plugin may import.

A policy or mechanism plugin is a plain Python file. It needs nothing from here to work
(the seed examples import nothing), but may use:

- :func:`get_logger` for a structured logger (the loader also injects ``logger`` into a
  plugin module that does not define one);
- :data:`descriptions`, a read-only view of the accepted application, cluster and node
  descriptions, kept current by the service that hosts the plugin;
- :func:`setting` to read a deployment setting (``MLSYSOPS_<NAME>`` in the environment);
- :class:`MechanismError` to fail an ``apply`` with a clear message;
- ``strategies`` and ``strategy_inputs``: the placement and scaling strategies
  (:mod:`mlsysops.strategies`) and the helpers that turn policy arguments into their
  inputs, imported on first use (they bring SciPy, which services without such a policy
  should not pay for).
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any

import structlog

__all__ = ["DescriptionView", "MechanismError", "descriptions", "get_logger", "setting"]

_LAZY = {"strategies": "mlsysops.strategies", "strategy_inputs": "mlsysops.strategies.inputs"}


def __getattr__(name: str) -> Any:
    """``strategies`` and ``strategy_inputs``, imported on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return importlib.import_module(_LAZY[name])


class MechanismError(Exception):
    """Raised by a mechanism's ``apply`` for a command it refuses; the message is reported."""


def get_logger(name: str) -> Any:
    """A structlog logger bound to the plugin name."""
    return structlog.get_logger(plugin=name)


def setting(name: str, default: str = "") -> str:
    """A deployment setting: the environment variable ``MLSYSOPS_<NAME>``, else ``default``."""
    return os.environ.get("MLSYSOPS_" + name.upper(), default)


class DescriptionView:
    """Accepted descriptions by kind and name, as plain dicts (copies; changing them is safe).

    Application entries have the shape policies receive: ``{"name": ..., "spec": {...}}``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, dict[str, dict[str, Any]]] = {"app": {}, "cluster": {}, "node": {}}

    # -- read side (plugins) ----------------------------------------------------------
    def app(self, name: str) -> dict[str, Any] | None:
        return self._get("app", name)

    def apps(self) -> list[str]:
        with self._lock:
            return sorted(self._docs["app"])

    def cluster(self, name: str | None = None) -> dict[str, Any] | None:
        """The named cluster, or the only/first one when no name is given."""
        if name is None:
            with self._lock:
                names = sorted(self._docs["cluster"])
            if not names:
                return None
            name = names[0]
        return self._get("cluster", name)

    def node(self, name: str) -> dict[str, Any] | None:
        return self._get("node", name)

    def known_nodes(self) -> list[str]:
        """Nodes listed by any cluster description plus nodes described on their own."""
        with self._lock:
            names = set(self._docs["node"])
            for cluster in self._docs["cluster"].values():
                names.update(str(n) for n in cluster.get("spec", {}).get("nodes", []))
        return sorted(names)

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            doc = self._docs[kind].get(name)
        return copy.deepcopy(doc) if doc is not None else None

    # -- write side (the hosting service) ---------------------------------------------
    def set(self, kind: str, name: str, spec: dict[str, Any] | None) -> None:
        with self._lock:
            if spec is None:
                self._docs[kind].pop(name, None)
            else:
                self._docs[kind][name] = {"name": name, "spec": spec}

    def clear(self) -> None:
        with self._lock:
            for docs in self._docs.values():
                docs.clear()


descriptions = DescriptionView()
