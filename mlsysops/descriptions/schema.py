"""The schema of each description kind, derived from its struct, and the CRDs built from it.

The structs are the single source: :func:`schema_of` turns one into the structural
OpenAPI v3 schema Kubernetes wants (``type``, ``properties``, ``items``, ``enum``,
``required``, ``description``), the validator walks that same schema, and
:func:`crd_manifests` wraps it into CustomResourceDefinitions for the Helm chart.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.structs

from mlsysops.descriptions.app import MLSysOpsApp
from mlsysops.descriptions.system import (
    MLSysOpsCluster,
    MLSysOpsContinuum,
    MLSysOpsDatacenter,
    MLSysOpsNode,
)

GROUP = "mlsysops.eu"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Kind:
    """A description kind: its struct and its Kubernetes resource names."""

    name: str
    struct: type[msgspec.Struct]
    plural: str
    short_name: str

    @property
    def singular(self) -> str:
        return self.name.lower()


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("MLSysOpsApp", MLSysOpsApp, "mlsysopsapps", "mlsapp"),
        Kind("MLSysOpsCluster", MLSysOpsCluster, "mlsysopsclusters", "mlscluster"),
        Kind("MLSysOpsNode", MLSysOpsNode, "mlsysopsnodes", "mlsnode"),
        Kind("MLSysOpsContinuum", MLSysOpsContinuum, "mlsysopscontinuums", "mlscontinuum"),
        Kind("MLSysOpsDatacenter", MLSysOpsDatacenter, "mlsysopsdatacenters", "mlsdatacenter"),
    )
}

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


@functools.cache
def shared_schema(kind: str) -> dict[str, Any]:
    """The schema of ``kind``, built once and shared: read it, never change it."""
    return _schema(KINDS[kind].struct)


def schema_of(kind: str) -> dict[str, Any]:
    """The OpenAPI v3 schema of description kind ``kind`` (e.g. ``"MLSysOpsApp"``); a copy."""
    return copy.deepcopy(shared_schema(kind))


def _schema(tp: Any) -> dict[str, Any]:
    """The schema of one field type, from its annotation (enums keep their declared order)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _optional(args)
    if origin is list:
        return {"type": "array", "items": _schema(args[0])}
    if origin is typing.Literal and all(isinstance(v, str) for v in args):
        return {"type": "string", "enum": list(args)}
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _object(tp)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    raise TypeError(f"no CRD schema for description field type {tp!r}")


def _optional(args: tuple[Any, ...]) -> dict[str, Any]:
    """``X | None``: an optional field of type X (absent and null mean the same)."""
    present = [t for t in args if t is not type(None)]
    if len(present) != 1:
        raise TypeError(f"description fields are 'X | None', not unions of {present!r}")
    return _schema(present[0])


def _object(cls: type[msgspec.Struct]) -> dict[str, Any]:
    fields = msgspec.structs.fields(cls)
    out: dict[str, Any] = {"type": "object"}
    if cls.__doc__:
        out["description"] = inspect.cleandoc(cls.__doc__).split("\n\n")[0]
    out["properties"] = {f.encode_name: _schema(f.type) for f in fields}
    required = [f.encode_name for f in fields if f.required]
    if required:
        out["required"] = required
    return out


def crd_manifest(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of one description kind."""
    k = KINDS[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{k.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": k.plural,
                "singular": k.singular,
                "kind": k.name,
                "shortNames": [k.short_name],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema_of(kind)},
                }
            ],
        },
    }


def crd_manifests() -> list[dict[str, Any]]:
    """The five CustomResourceDefinitions of the description kinds, generated from the structs."""
    return [crd_manifest(kind) for kind in KINDS]
