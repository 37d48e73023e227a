"""Strategies by name: the built-in ones, drop-in files, installed entry points.

- Built-in strategies register themselves with :func:`register` when
  :mod:`mlsysops.strategies` is imported.
- A *drop-in* is a Python file in a strategy directory: every :class:`PlacementStrategy`
  or :class:`ScalingStrategy` subclass with a ``name`` defined in it is registered.
  :func:`discover` loads the files of the given directories and reloads a file when it
  changes; a broken file is reported, never fatal.
- An installed package adds strategies with an entry point in the group
  ``mlsysops.strategies`` that names a strategy class (or a module holding some).

Names are unique per kind: a second class claiming a name that another source holds is
refused (a file reloaded after an edit replaces its own registrations).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from mlsysops.strategies.base import PlacementStrategy, ScalingStrategy, Strategy
from mlsysops.strategies.options import StrategyError

ENTRY_POINT_GROUP = "mlsysops.strategies"
KINDS = ("placement", "scaling")

S = TypeVar("S", bound=type[Strategy])


@dataclass
class _Entry:
    cls: type[Strategy]
    source: str  # "builtin", a file path, or "entry point <name>"


_lock = threading.RLock()
_registry: dict[str, dict[str, _Entry]] = {kind: {} for kind in KINDS}
_files: dict[Path, float] = {}  # drop-in file -> mtime it was loaded at
_entry_points_loaded = False
_errors: dict[str, str] = {}  # source -> last load error


def _kind_of(cls: type) -> str | None:
    if inspect.isabstract(cls):
        return None
    if issubclass(cls, PlacementStrategy):
        return "placement"
    if issubclass(cls, ScalingStrategy):
        return "scaling"
    return None


def register(cls: S, *, source: str = "builtin") -> S:
    """Register a strategy class under its ``name`` (usable as a class decorator)."""
    _add(cls, source)
    return cls


def _add(cls: type, source: str) -> None:
    kind = _kind_of(cls)
    name = getattr(cls, "name", "")
    if kind is None:
        raise StrategyError(f"{cls.__qualname__} is not a concrete PlacementStrategy or "
                            "ScalingStrategy subclass")
    if not isinstance(name, str) or not name:
        raise StrategyError(f"{cls.__qualname__} has no name (set the class attribute 'name')")
    with _lock:
        held = _registry[kind].get(name)
        if held is not None and held.source != source:
            raise StrategyError(f"{kind} strategy name {name!r} is already taken by "
                                f"{held.cls.__qualname__} from {held.source}")
        _registry[kind][name] = _Entry(cls, source)


def unregister(kind: str, name: str) -> None:
    with _lock:
        _registry[kind].pop(name, None)


def names(kind: str) -> list[str]:
    """Registered strategy names of ``kind`` ("placement" or "scaling"), sorted."""
    with _lock:
        return sorted(_registry[_check_kind(kind)])


def describe() -> dict[str, dict[str, dict[str, str]]]:
    """Every registered strategy: kind -> name -> {source, description}."""
    with _lock:
        return {kind: {name: {"source": e.source, "description": e.cls.description}
                       for name, e in sorted(entries.items())}
                for kind, entries in _registry.items()}


def errors() -> dict[str, str]:
    """Load errors of drop-in files and entry points, by source."""
    with _lock:
        return dict(_errors)


def get(kind: str, name: str) -> type[Strategy]:
    with _lock:
        entry = _registry[_check_kind(kind)].get(name)
        if entry is None:
            known = ", ".join(sorted(_registry[kind])) or "none"
            raise StrategyError(f"unknown {kind} strategy {name!r} (known: {known})")
        return entry.cls


def create_placement(name: str, options: Mapping[str, Any] | None = None) -> PlacementStrategy:
    cls = get("placement", name)
    assert issubclass(cls, PlacementStrategy)
    return cls(options)


def create_scaling(name: str, options: Mapping[str, Any] | None = None) -> ScalingStrategy:
    cls = get("scaling", name)
    assert issubclass(cls, ScalingStrategy)
    return cls(options)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise StrategyError(f"unknown strategy kind {kind!r} (known: {', '.join(KINDS)})")
    return kind


# --------------------------------------------------------------------------- discovery
def discover(directories: Iterable[str | Path] = (), *, entry_points: bool = True) -> None:
    """Load (or reload, when changed) drop-in files of ``directories``, and entry points
    once. Errors are kept in :func:`errors`, never raised."""
    global _entry_points_loaded
    with _lock:
        for directory in directories:
            path = Path(directory)
            if path.is_dir():
                for file in sorted(path.glob("*.py")):
                    if not file.name.startswith(("_", ".")):
                        _load_file(file)
        if entry_points and not _entry_points_loaded:
            _entry_points_loaded = True
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                _load_entry_point(ep)


def _load_file(file: Path) -> None:
    source = str(file.resolve())
    try:
        mtime = file.stat().st_mtime
    except OSError:
        return
    if _files.get(file) == mtime:
        return
    _files[file] = mtime
    for kind in KINDS:  # an edited file replaces what it registered before
        for name in [n for n, e in _registry[kind].items() if e.source == source]:
            del _registry[kind][name]
    module_name = f"mlsysops_strategy_{file.stem.replace('-', '_')}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise StrategyError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(module_name, None)
        found = _register_module(module, source)
        if not found:
            raise StrategyError(f"{file.name} defines no strategy class with a name")
    except Exception as exc:
        _errors[source] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        return
    _errors.pop(source, None)


def _register_module(module: ModuleType, source: str) -> int:
    found = 0
    for value in vars(module).values():
        if (inspect.isclass(value) and value.__module__ == module.__name__
                and _kind_of(value) is not None and getattr(value, "name", None)):
            _add(value, source)
            found += 1
    return found


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    source = f"entry point {ep.name} ({ep.value})"
    try:
        loaded = ep.load()
        if inspect.isclass(loaded):
            _add(loaded, source)
        elif inspect.ismodule(loaded):
            if not _register_module(loaded, source):
                raise StrategyError(f"module {loaded.__name__} defines no strategy class")
        else:
            raise StrategyError(f"{ep.value} is neither a strategy class nor a module")
    except Exception as exc:
        _errors[source] = f"{type(exc).__name__}: {exc}"
        return
    _errors.pop(source, None)


def _reset_for_tests() -> None:
    """Forget drop-ins and entry points (built-ins stay)."""
    global _entry_points_loaded
    with _lock:
        for kind in KINDS:
            for name in [n for n, e in _registry[kind].items() if e.source != "builtin"]:
                del _registry[kind][name]
        _files.clear()
        _errors.clear()
        _entry_points_loaded = False
