"""Validate a description published on ``<prefix>.desc.<kind>.<name>``.

:func:`validate_payload` never raises for anything in the payload: it returns a
:class:`DescriptionResult` listing every error and warning with its path. Two document
shapes are accepted:

- the MLSysOps shape, one top-level key naming the kind: ``{"MLSysOpsApp": {fields}}``;
- the Kubernetes shape: ``{"apiVersion": "mlsysops.eu/v1", "kind": "MLSysOpsApp",
  "metadata": {"name": ...}, fields}`` (the CRDs have no ``spec``: fields sit at the root).

Paths of field errors are relative to the fields in both shapes (``$.components[0]``).

The name of the description (``name`` of an app or node, ``cluster_id`` of a cluster,
``metadata.name`` of a Kubernetes object) must equal the subject's name wherever it is
given. When the fields omit it, the subject's name is filled in (``metadata.name``, if
any, has been checked equal to it), so ``spec`` always carries the name, and a cluster
may be published without repeating its ``cluster_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from mlsysops.descriptions.checking import Findings, check, child, show
from mlsysops.descriptions.loading import load_document
from mlsysops.descriptions.schema import API_VERSION, KINDS, shared_schema
from mlsysops.errors import BadInput
from mlsysops.subjects import check_token
from mlsysops.wire import DescReply, FieldError

SUBJECT_KINDS = {"app": "MLSysOpsApp", "cluster": "MLSysOpsCluster", "node": "MLSysOpsNode"}
NAME_FIELDS = {"MLSysOpsApp": "name", "MLSysOpsCluster": "cluster_id", "MLSysOpsNode": "name"}
_KUBERNETES_FIELDS = ("apiVersion", "kind", "metadata")


class DescriptionResult(msgspec.Struct):
    """The verdict on one published description; ``spec`` is set only when accepted."""

    accepted: bool
    kind: str
    name: str
    spec: dict[str, Any] | None = None
    errors: list[FieldError] = []
    warnings: list[FieldError] = []
    deleted: bool = False

    def reply(self, revision: int = 0) -> DescReply:
        """The reply sent to the publisher."""
        return DescReply(
            accepted=self.accepted, kind=self.kind, name=self.name, errors=self.errors,
            warnings=self.warnings, deleted=self.deleted, revision=revision,
        )


@dataclass(frozen=True)
class _Subject:
    kind: str  # app | cluster | node
    name: str

    @property
    def kind_name(self) -> str:
        return SUBJECT_KINDS[self.kind]


def validate_payload(
    kind: str,
    subject_name: str,
    payload: bytes,
    *,
    max_bytes: int = 1_048_576,
    max_depth: int = 32,
) -> DescriptionResult:
    """Check the description ``payload`` published for ``kind``/``subject_name``.

    ``kind`` is a subject kind: ``app``, ``cluster`` or ``node``. An empty (or blank)
    payload deletes the description.
    """
    found = Findings()
    spec: dict[str, Any] | None = None
    try:
        subject = _subject(kind, subject_name)
        if not payload or payload.isspace():
            return DescriptionResult(accepted=True, kind=kind, name=subject_name, deleted=True)
        spec = _validate(subject, payload, max_bytes, max_depth, found)
    except BadInput as exc:
        found.error(exc.path, exc.message)
    except Exception as exc:  # a bug here must reject one description, not stop a service
        found.error("$", f"internal error while validating: {exc!r}")
    accepted = not found.errors
    return DescriptionResult(
        accepted=accepted, kind=kind, name=subject_name, spec=spec if accepted else None,
        errors=found.errors, warnings=found.warnings,
    )


def _subject(kind: str, name: str) -> _Subject:
    if kind not in SUBJECT_KINDS:
        raise BadInput(f"unknown description kind {kind!r}: use one of {', '.join(SUBJECT_KINDS)}")
    try:
        check_token(kind, name)
    except BadInput as exc:
        raise BadInput(f"subject: {exc.message}") from None
    return _Subject(kind, name)


def _validate(
    subject: _Subject, payload: bytes, max_bytes: int, max_depth: int, found: Findings
) -> dict[str, Any] | None:
    data = load_document(payload, max_bytes=max_bytes, max_depth=max_depth)
    fields, metadata_name = _unwrap(data, subject.kind_name, found)
    fields = _settle_name(fields, subject, metadata_name, found)
    normalised = check(fields, shared_schema(subject.kind_name), "$", found)
    if found.errors:
        return None
    return _build(subject.kind_name, normalised)


def _build(kind_name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields through the kind's struct: numbers as floats, absent fields left out."""
    try:
        return msgspec.to_builtins(msgspec.convert(fields, KINDS[kind_name].struct))
    except msgspec.ValidationError as exc:  # the schema walk should have caught it
        raise BadInput(str(exc)) from None


# --------------------------------------------------------------------------- shapes
def _unwrap(data: Any, expected: str, found: Findings) -> tuple[dict[Any, Any], str | None]:
    """The description's fields, and the Kubernetes ``metadata.name`` if there is one."""
    if not isinstance(data, dict):
        raise BadInput(f"a description must be a mapping; got {show(data)}")
    if "kind" in data or "apiVersion" in data:
        return _unwrap_object(data, expected, found)
    return _unwrap_document(data, expected, found), None


def _unwrap_document(data: dict[Any, Any], expected: str, found: Findings) -> dict[Any, Any]:
    kinds = [key for key in data if key in KINDS]
    if len(kinds) != 1:
        got = f"the kinds {', '.join(kinds)}" if kinds else f"the keys {_keys(data)}"
        raise BadInput(
            f"expected one top-level key naming the kind ({{{expected}: {{...}}}}) or a "
            f"Kubernetes object with apiVersion and kind; got {got}"
        )
    kind = kinds[0]
    _same_kind(kind, expected, child("$", kind))
    for key in data:
        if key != kind:
            found.warn(child("$", key), f"unknown top-level key {str(key)!r} ignored")
    fields = data[kind]
    if not isinstance(fields, dict):
        raise BadInput(f"must be a mapping of fields; got {show(fields)}", path=child("$", kind))
    return fields


def _unwrap_object(
    data: dict[Any, Any], expected: str, found: Findings
) -> tuple[dict[Any, Any], str | None]:
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise BadInput(f"must be one of {', '.join(KINDS)}; got {show(kind)}", path="$.kind")
    _same_kind(kind, expected, "$.kind")
    if data.get("apiVersion") != API_VERSION:
        found.error("$.apiVersion", f"must be {API_VERSION!r}; got {show(data.get('apiVersion'))}")
    fields = {key: value for key, value in data.items() if key not in _KUBERNETES_FIELDS}
    if "spec" in fields:
        fields.pop("spec")
        found.warn("$.spec", "ignored: MLSysOps kinds have no spec, their fields sit at the top")
    return fields, _metadata_name(data.get("metadata"), found)


def _metadata_name(metadata: Any, found: Findings) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return found.wrong("$.metadata", "a mapping", metadata)
    name = metadata.get("name")
    if name is not None and not isinstance(name, str):
        return found.wrong("$.metadata.name", "a string", name)
    return name


def _same_kind(kind: str, expected: str, path: str) -> None:
    if kind != expected:
        raise BadInput(
            f"the document is an {kind} description but the subject takes {expected} "
            "descriptions",
            path=path,
        )


def _keys(data: dict[Any, Any], limit: int = 5) -> str:
    keys = [str(key) for key in data]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "(none)"


# --------------------------------------------------------------------------- the name
def _settle_name(
    fields: dict[Any, Any], subject: _Subject, metadata_name: str | None, found: Findings
) -> dict[Any, Any]:
    """The fields with the name filled in from the subject if absent; mismatches reported."""
    field = NAME_FIELDS[subject.kind_name]
    if metadata_name is not None:
        _agree(metadata_name, subject, "$.metadata.name", found)
    given = fields.get(field)
    if given is None:
        return {**fields, field: subject.name}
    if isinstance(given, str):
        _agree(given, subject, child("$", field), found)
    return fields


def _agree(name: str, subject: _Subject, path: str, found: Findings) -> None:
    if name == subject.name:
        return
    found.error(path, f"names the {subject.kind} {name!r} but the subject names {subject.name!r}")
    try:
        check_token(subject.kind, name)
    except BadInput as exc:
        found.error(path, exc.message)
