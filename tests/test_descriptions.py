"""Descriptions: the validator's messages, and agreement with the upstream CRD schemas.

The first half checks what a user sees for every kind of bad payload. The second half
builds an independent oracle from the upstream CRDs (their ``openAPIV3Schema`` read as
JSON Schema draft 4 by ``jsonschema``) and shows that the validator accepts and rejects
exactly what the oracle does, on the upstream examples, on our own bad cases and on
random mutations of valid documents, and that the generated CRDs are sound.
"""

from __future__ import annotations

import copy
import functools
import json
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema
import kubernetes_validate
import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlsysops.descriptions import (
    KINDS,
    NAME_FIELDS,
    SUBJECT_KINDS,
    DescriptionResult,
    crd_manifests,
    schema_of,
    validate_payload,
)
from mlsysops.descriptions.__main__ import main
from mlsysops.descriptions.checking import Findings, check
from mlsysops.wire import DescReply
from tests.requirements import need_upstream

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROJECT_EXAMPLES = [
    ("app", "demo-app", "app.yaml"),
    ("cluster", "demo-cluster", "cluster.yaml"),
    ("node", "node-a", "node-a.yaml"),
    ("node", "node-b", "node-b.yaml"),
]


# --------------------------------------------------------------------------- helpers
def run(kind: str, name: str, document: Any, **limits: int) -> DescriptionResult:
    """Validate ``document`` (bytes, text, or data sent as JSON) as ``kind``/``name``."""
    if isinstance(document, str):
        document = document.encode()
    elif not isinstance(document, bytes):
        document = json.dumps(document).encode()
    return validate_payload(kind, name, document, **limits)


def error_paths(result: DescriptionResult) -> set[str]:
    return {e.path for e in result.errors}


def messages(result: DescriptionResult, path: str | None = None) -> str:
    return " | ".join(e.message for e in result.errors if path is None or e.path == path)


def example(file: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / file).read_text())
    assert isinstance(data, dict)
    return data


def demo_app() -> dict[str, Any]:
    """The fields of the project's example application (a fresh copy)."""
    fields = example("app.yaml")["MLSysOpsApp"]
    assert isinstance(fields, dict)
    return fields


def app_doc(**changes: Any) -> dict[str, Any]:
    """The demo application with top-level fields replaced (``None`` deletes)."""
    fields = demo_app()
    for key, value in changes.items():
        fields.pop(key) if value is None else fields.__setitem__(key, value)
    return {"MLSysOpsApp": fields}


def with_component(**changes: Any) -> dict[str, Any]:
    """The demo application with fields of its first component replaced."""
    fields = demo_app()
    fields["components"][0].update(changes)
    return {"MLSysOpsApp": fields}


def as_object(kind_name: str, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes custom-object shape of a description."""
    return {"apiVersion": "mlsysops.eu/v1", "kind": kind_name, "metadata": {"name": name}, **fields}


# --------------------------------------------------------------------------- examples
@pytest.mark.parametrize(("kind", "name", "file"), PROJECT_EXAMPLES)
def test_project_examples_are_valid(kind: str, name: str, file: str) -> None:
    result = validate_payload(kind, name, (EXAMPLES / file).read_bytes())
    assert result.accepted, result.errors
    assert (result.errors, result.warnings, result.deleted) == ([], [], False)
    assert result.spec is not None
    assert result.spec[NAME_FIELDS[SUBJECT_KINDS[kind]]] == name


def test_spec_is_normalised_plain_data() -> None:
    spec = validate_payload("app", "demo-app", (EXAMPLES / "app.yaml").read_bytes()).spec
    assert spec is not None
    assert spec["name"] == "demo-app"
    web, load = spec["components"]
    assert web["node_placement"] == {"node": "node-a"}
    assert "node_placement" not in load  # absent fields stay absent
    assert "single_node" not in spec
    assert web["qos_metrics"][0]["target"] == 200.0  # a number field holds a float
    assert isinstance(web["qos_metrics"][0]["target"], float)
    env = load["containers"][0]["env"][1]
    assert env["value_from"] == {"field_ref": {"field_path": "metadata.name"}}
    assert msgspec.json.decode(msgspec.json.encode(spec)) == spec


def test_reply_carries_the_verdict() -> None:
    result = run("app", "demo-app", with_component(restart_policy="sometimes"))
    reply = result.reply(revision=7)
    assert isinstance(reply, DescReply)
    assert (reply.accepted, reply.kind, reply.name, reply.revision) == (False, "app", "demo-app", 7)
    assert reply.errors == result.errors


# --------------------------------------------------------------------------- delete
@pytest.mark.parametrize("payload", [b"", b"   ", b"\n\t \r\n"])
def test_empty_payload_deletes(payload: bytes) -> None:
    result = validate_payload("node", "node-a", payload)
    assert (result.accepted, result.deleted, result.spec, result.errors) == (True, True, None, [])
    assert (result.kind, result.name) == ("node", "node-a")


def test_a_null_document_is_not_a_delete() -> None:
    result = run("node", "node-a", "# nothing here\n")
    assert not result.accepted and not result.deleted
    assert "must be a mapping; got null" in messages(result)


# --------------------------------------------------------------------------- payload level
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"MLSysOpsApp: [", "not valid YAML or JSON"),
        (b"a: 1\n\tb: 2\n", "line 2, column 1"),
        (b"a: 1\n---\nb: 2\n", "expected a single document"),
        (b"\xff\xfeMLSysOpsApp: {}", "not UTF-8"),
        (b"a: \x07", "control characters are not allowed"),
        (b"- MLSysOpsApp\n", "must be a mapping; got a list"),
        (b"42", "must be a mapping; got the number 42"),
        (b'"MLSysOpsApp"', "must be a mapping; got the string 'MLSysOpsApp'"),
        (b"name: demo-app\ncomponents: []\n", "expected one top-level key naming the kind"),
        (b"MLSysOpsApp: [1, 2]\n", "must be a mapping of fields; got a list"),
        (b"a: !!python/object:os.system ls\n", "could not determine a constructor"),
        (b'{"MLSysOpsApp": {"name": 1e999}}', "not acceptable"),
    ],
)
def test_unreadable_payloads_are_rejected_with_a_reason(payload: bytes, expected: str) -> None:
    result = validate_payload("app", "demo-app", payload)
    assert not result.accepted and result.spec is None
    assert expected in messages(result)


def test_oversized_payload() -> None:
    payload = (EXAMPLES / "app.yaml").read_bytes()
    result = validate_payload("app", "demo-app", payload, max_bytes=100)
    assert not result.accepted
    assert f"the payload is {len(payload)} bytes; the limit is 100" in messages(result)
    assert validate_payload("app", "demo-app", payload, max_bytes=len(payload)).accepted


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 40 + b"]" * 40,  # JSON
        b"MLSysOpsApp:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 40)),  # block YAML
        b"a: " + b"[" * 100_000,  # would blow the recursion limit if composed
    ],
)
def test_too_deep_payload_is_rejected_naming_the_depth_limit(payload: bytes) -> None:
    # Whichever refuses first (our event screen, or PyYAML's own flow-level limit since
    # 6.0.3), the user reads one message that names the limit.
    result = validate_payload("app", "demo-app", payload)
    assert not result.accepted
    assert "nested deeper than the limit of 32 levels" in messages(result)


def test_depth_limit_is_a_parameter() -> None:
    payload = (EXAMPLES / "app.yaml").read_bytes()
    assert "nested deeper than the limit of 5" in messages(
        validate_payload("app", "demo-app", payload, max_depth=5)
    )


def test_aliases_are_refused_so_no_expansion_bomb() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    result = run("app", "demo-app", "\n".join(lines))
    assert "aliases (*name) are not accepted" in messages(result)
    assert "line 2" in messages(result)


def test_json_is_read_as_json() -> None:
    document = app_doc(global_satisfaction={"threshold": 0.7, "relation": "greater_than"})
    text = json.dumps(document, indent="\t")  # tabs: not YAML; 7e-1: a string to PyYAML
    result = run("app", "demo-app", text.replace('"threshold": 0.7', '"threshold": 7e-1'))
    assert result.accepted, result.errors
    assert result.spec is not None
    assert result.spec["global_satisfaction"]["threshold"] == 0.7


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"MLSysOpsNode": {}}, "the document is an MLSysOpsNode description but the subject "
                               "takes MLSysOpsApp descriptions"),
        ({"MLSysOpsContinuum": {"continuum_id": "c", "clusters": []}}, "MLSysOpsContinuum"),
        (as_object("MLSysOpsCluster", "demo-app", {}), "an MLSysOpsCluster description"),
        ({"MLSysOpsApp": {}, "MLSysOpsNode": {}}, "got the kinds MLSysOpsApp, MLSysOpsNode"),
        ({"kind": "Deployment", "apiVersion": "apps/v1"}, "got the string 'Deployment'"),
    ],
)
def test_wrong_kind_names_both(document: dict[str, Any], expected: str) -> None:
    result = run("app", "demo-app", document)
    assert not result.accepted
    assert expected in messages(result)
    assert "MLSysOpsApp" in messages(result)


def test_unknown_subject_kind_is_a_rejection_not_an_exception() -> None:
    result = validate_payload("policy", "x", b"a: 1")
    assert not result.accepted
    assert "unknown description kind 'policy'" in messages(result)


# --------------------------------------------------------------------------- the name
@pytest.mark.parametrize(
    ("kind", "document", "path"),
    [
        ("app", app_doc(name="other-app"), "$.name"),
        ("app", as_object("MLSysOpsApp", "other-app", demo_app()), "$.name"),
        ("cluster", {"MLSysOpsCluster": {"cluster_id": "other-app", "nodes": []}}, "$.cluster_id"),
        ("node", {"MLSysOpsNode": {"name": "other-app"}}, "$.name"),
    ],
)
def test_name_mismatch_names_both(kind: str, document: dict[str, Any], path: str) -> None:
    name = "demo-app" if kind == "app" else "subject-name"
    if "apiVersion" in document:  # metadata says other-app, the fields say demo-app
        path = "$.metadata.name"
    result = run(kind, name, document)
    assert not result.accepted
    assert f"names the {kind} 'other-app' but the subject names {name!r}" in messages(result, path)


def test_invalid_subject_name() -> None:
    result = run("app", "demo.app", app_doc(name="demo.app"))
    assert not result.accepted
    assert error_paths(result) == {"$"}
    assert "'demo.app' is not a valid subject token" in messages(result)


def test_invalid_name_in_the_document() -> None:
    result = run("app", "demo-app", app_doc(name="demo app"))
    assert "is not a valid subject token" in messages(result, "$.name")
    assert "names the app 'demo app'" in messages(result, "$.name")


def test_name_of_wrong_type_is_a_type_error() -> None:
    result = run("app", "demo-app", app_doc(name=12))
    assert messages(result, "$.name") == "must be a string; got the number 12"


@pytest.mark.parametrize(
    ("kind", "document", "field"),
    [
        ("app", app_doc(name=None), "name"),
        ("app", as_object("MLSysOpsApp", "demo-app", app_doc(name=None)["MLSysOpsApp"]), "name"),
        ("cluster", {"MLSysOpsCluster": {"nodes": ["node-a"]}}, "cluster_id"),
        ("node", {"MLSysOpsNode": {**example("node-a.yaml")["MLSysOpsNode"], "name": None}},
         "name"),
    ],
)
def test_missing_name_is_filled_from_the_subject(
    kind: str, document: dict[str, Any], field: str
) -> None:
    name = {"app": "demo-app", "cluster": "demo-cluster", "node": "node-a"}[kind]
    result = run(kind, name, document)
    assert result.accepted, result.errors
    assert result.spec is not None and result.spec[field] == name


# --------------------------------------------------------------------------- fields
@pytest.mark.parametrize(
    ("document", "path", "message"),
    [
        (app_doc(cluster_placement={"instances": 2.5}), "$.cluster_placement.instances",
         "must be an integer; got the number 2.5"),
        (app_doc(cluster_placement={"instances": "2"}), "$.cluster_placement.instances",
         "must be an integer; got the string '2'"),
        (app_doc(cluster_placement={"instances": True}), "$.cluster_placement.instances",
         "must be an integer; got the boolean true"),
        (app_doc(cluster_placement={"instances": 2.0}), "$.cluster_placement.instances",
         "must be an integer; got the number 2.0"),
        (app_doc(cluster_placement={"instances": 2**64}), "$.cluster_placement.instances",
         "must be an integer that fits in 64 bits"),
        (app_doc(global_satisfaction={"threshold": "0.5"}), "$.global_satisfaction.threshold",
         "must be a number; got the string '0.5'"),
        (app_doc(global_satisfaction={"threshold": False}), "$.global_satisfaction.threshold",
         "must be a number; got the boolean false"),
        (with_component(host_network="True"), "$.components[0].host_network",
         "must be a boolean (true or false); got the string 'True'"),
        (with_component(host_network=1), "$.components[0].host_network",
         "must be a boolean (true or false); got the number 1"),
        (with_component(depends_on="web"), "$.components[0].depends_on",
         "must be a list; got the string 'web'"),
        (with_component(depends_on=[1]), "$.components[0].depends_on[0]",
         "must be a string; got the number 1"),
        (with_component(node_placement="node-a"), "$.components[0].node_placement",
         "must be a mapping of fields; got the string 'node-a'"),
        (with_component(metadata={"name": 7}), "$.components[0].metadata.name",
         "must be a string; got the number 7"),
        (with_component(restart_policy="on_failure"), "$.components[0].restart_policy",
         "must be one of Always, OnFailure, Never; got 'on_failure'"),
        (with_component(restart_policy=["Always"]), "$.components[0].restart_policy",
         "must be a string; got a list"),
        (app_doc(permitted_actions=["acceleration", "teleport"]), "$.permitted_actions[1]",
         "must be one of component_relocation, traffic_redirection, change_container_image, "
         "change_container_runtime_class, change_container_cpu_set, "
         "change_container_resource_requirements, acceleration, *; got 'teleport'"),
        (app_doc(components=None), "$.components", "is required but missing"),
        (app_doc(components=[{"metadata": {"name": "x"}}]), "$.components[0].containers",
         "is required but missing"),
        (with_component(containers=None), "$.components[0].containers", "is required; got null"),
        (with_component(storage={"buckets": [{"reduncancy": "one"}]}),
         "$.components[0].storage.buckets[0].bucket_id", "is required but missing"),
    ],
)
def test_field_errors_say_what_was_expected_and_found(
    document: dict[str, Any], path: str, message: str
) -> None:
    result = run("app", "demo-app", document)
    assert not result.accepted and result.spec is None
    assert error_paths(result) == {path}
    assert message in messages(result, path)


def test_number_accepts_integers() -> None:
    result = run("app", "demo-app", app_doc(global_satisfaction={"threshold": 1}))
    assert result.accepted, result.errors
    assert result.spec is not None and result.spec["global_satisfaction"] == {"threshold": 1.0}


@pytest.mark.parametrize("text", ["threshold: .inf", "threshold: .nan"])
def test_number_must_be_finite(text: str) -> None:
    payload = f"MLSysOpsApp:\n  components: []\n  global_satisfaction:\n    {text}\n"
    result = run("app", "demo-app", payload)
    assert "must be a finite number" in messages(result, "$.global_satisfaction.threshold")


def test_missing_required_fields_of_a_node() -> None:
    result = run("node", "node-x", {"MLSysOpsNode": {"name": "node-x"}})
    assert error_paths(result) == {"$.continuum_layer", "$.environment", "$.hardware"}


def test_several_errors_are_all_reported() -> None:
    document = with_component(restart_policy="on_failure", host_network="yes")
    document["MLSysOpsApp"]["components"][1]["containers"][0]["ports"] = [{"container_port": "80"}]
    document["MLSysOpsApp"]["components"].append({"metadata": {}})
    document["MLSysOpsApp"]["cluster_placement"]["location"] = {"country": ["gr"]}
    result = run("app", "demo-app", document)
    assert error_paths(result) == {
        "$.components[0].restart_policy",
        "$.components[0].host_network",
        "$.components[1].containers[0].ports[0].container_port",
        "$.components[2].containers",
        "$.cluster_placement.location.country[0]",
    }


def test_unknown_fields_are_warned_and_pruned() -> None:
    document = with_component(replicas=3, node_placement={"node": "node-a", "mobility": True})
    document["MLSysOpsApp"]["owner"] = {"team": "x"}
    document["status"] = "ignored too"
    result = run("app", "demo-app", document)
    assert result.accepted, result.errors
    assert {w.path for w in result.warnings} == {
        "$.components[0].replicas",
        "$.components[0].node_placement.mobility",
        "$.owner",
        "$.status",
    }
    assert "unknown field 'mobility' ignored" in " ".join(w.message for w in result.warnings)
    assert result.spec is not None
    assert "owner" not in result.spec and "replicas" not in result.spec["components"][0]
    assert result.spec["components"][0]["node_placement"] == {"node": "node-a"}


def test_null_optional_fields_are_dropped_with_a_warning() -> None:
    result = run("app", "demo-app", with_component(depends_on=None, os=None))
    assert result.accepted, result.errors
    assert {w.path for w in result.warnings} == {
        "$.components[0].depends_on", "$.components[0].os"
    }
    assert result.spec is not None and "os" not in result.spec["components"][0]


def test_odd_keys_get_readable_paths() -> None:
    result = run("app", "demo-app", "MLSysOpsApp:\n  components: []\n  1: x\n  my key: y\n")
    assert result.accepted
    assert {w.path for w in result.warnings} == {'$["1"]', '$["my key"]'}


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(("kind", "name", "file"), PROJECT_EXAMPLES)
def test_both_shapes_give_the_same_spec(kind: str, name: str, file: str) -> None:
    document = example(file)
    [(kind_name, fields)] = document.items()
    as_document = run(kind, name, document)
    as_k8s = run(kind, name, as_object(kind_name, name, fields))
    assert as_document.accepted and as_k8s.accepted, (as_document.errors, as_k8s.errors)
    assert as_document.spec == as_k8s.spec


def test_kubernetes_shape_checks_api_version_and_metadata() -> None:
    document = as_object("MLSysOpsApp", "demo-app", demo_app())
    document["apiVersion"] = "mlsysops.eu/v2"
    document["metadata"] = {"name": 5}
    result = run("app", "demo-app", document)
    assert messages(result, "$.apiVersion") == (
        "must be 'mlsysops.eu/v1'; got the string 'mlsysops.eu/v2'"
    )
    assert messages(result, "$.metadata.name") == "must be a string; got the number 5"


def test_kubernetes_shape_has_no_spec() -> None:
    document = as_object("MLSysOpsApp", "demo-app", {"spec": demo_app()})
    result = run("app", "demo-app", document)
    assert "no spec" in " ".join(w.message for w in result.warnings if w.path == "$.spec")
    assert error_paths(result) == {"$.components"}


# --------------------------------------------------------------------------- YAML 1.1 words
BUCKET_APP = """
MLSysOpsApp:
  name: demo-app
  components:
    - metadata: {{name: store}}
      host_network: {flag}
      storage:
        buckets:
          - bucket_id: b1
            server_side_encryption: {sse}
      containers:
        - image: busybox
          env:
            - name: FEATURE
              value: {env}
"""


@pytest.mark.parametrize(
    ("flag", "sse", "env", "spec_flag"),
    [
        ("yes", "on", "on", True),
        ("no", "off", "off", False),
        ("On", "on", "Yes", True),
        ("false", "off", "'true'", False),
    ],
)
def test_yaml_boolean_words_follow_the_schema(
    flag: str, sse: str, env: str, spec_flag: bool
) -> None:
    result = run("app", "demo-app", BUCKET_APP.format(flag=flag, sse=sse, env=env))
    assert result.accepted, result.errors
    assert result.spec is not None
    component = result.spec["components"][0]
    assert component["host_network"] is spec_flag
    assert component["storage"]["buckets"][0]["server_side_encryption"] == sse
    assert component["containers"][0]["env"][0]["value"] == env.strip("'")


@pytest.mark.parametrize(
    ("flag", "sse", "env", "path", "message"),
    [
        ("'yes'", "on", "x", "$.components[0].host_network", "got the string 'yes'"),
        ("yes", "ON", "x", "$.components[0].storage.buckets[0].server_side_encryption",
         "must be one of on, off; got 'ON'"),
        ("yes", "true", "x", "$.components[0].storage.buckets[0].server_side_encryption",
         "must be a string; got the boolean true"),
        ("yes", "on", "true", "$.components[0].containers[0].env[0].value",
         "must be a string; got the boolean true"),
    ],
)
def test_yaml_booleans_still_checked(
    flag: str, sse: str, env: str, path: str, message: str
) -> None:
    result = run("app", "demo-app", BUCKET_APP.format(flag=flag, sse=sse, env=env))
    assert error_paths(result) == {path}
    assert message in messages(result, path)


def test_yaml_word_where_a_number_is_wanted() -> None:
    payload = "MLSysOpsApp:\n  components: []\n  cluster_placement: {instances: on}\n"
    result = run("app", "demo-app", payload)
    assert "must be an integer; got the boolean true (written on)" in messages(result)


def test_dates_stay_strings() -> None:
    payload = BUCKET_APP.format(flag="yes", sse="on", env="2024-05-01")
    result = run("app", "demo-app", payload)
    assert result.accepted, result.errors
    assert result.spec is not None
    assert result.spec["components"][0]["containers"][0]["env"][0]["value"] == "2024-05-01"


@settings(max_examples=200, deadline=None)
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_no_payload_raises(payload: bytes) -> None:
    for kind in SUBJECT_KINDS:
        result = validate_payload(kind, "x", payload)
        assert result.accepted or result.errors
        assert not any(e.message.startswith("internal error") for e in result.errors)


# --------------------------------------------------------------------------- CRDs and CLI
@pytest.mark.parametrize("crd", crd_manifests(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_generated_crds_are_valid_kubernetes_objects(crd: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(crd, "1.30", strict=True) == "1.30"


def test_cli_prints_the_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == crd_manifests()  # on/off enum values survive as strings


def test_cli_checks_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["check", "app", "demo-app", str(EXAMPLES / "app.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_component(restart_policy="on_failure")))
    assert main(["check", "app", "demo-app", str(bad)]) == 1
    assert "$.components[0].restart_policy: must be one of" in capsys.readouterr().out


# =========================================================================== upstream
def upstream_crds() -> dict[str, dict[str, Any]]:
    """The upstream CRDs by kind."""
    crds = [yaml.safe_load(p.read_text()) for p in (need_upstream() / "crds").glob("*.yaml")]
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema node as JSON Schema (draft 4, which OpenAPI 3.0 schemas follow).

    The keywords used (type, properties, items, enum, required, description) mean the same
    in both. One repair: PyYAML read the unquoted ``on``/``off`` of a string enum as YAML
    1.1 booleans; in a ``type: string`` enum they can only mean the strings.
    """
    out = dict(schema)
    if "enum" in out:
        assert out["type"] == "string"
        out["enum"] = [{True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
                       for v in out["enum"]]
    if "properties" in out:
        out["properties"] = {k: as_json_schema(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = as_json_schema(out["items"])
    return out


def prune_nulls(value: Any) -> Any:
    """What the API server does first: drop null fields (no field here is nullable)."""
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


class Oracle:
    """Validation by ``jsonschema`` against one schema per kind, reporting error paths."""

    def __init__(self, schemas: dict[str, dict[str, Any]]) -> None:
        for schema in schemas.values():
            jsonschema.Draft4Validator.check_schema(schema)
        self.validators = {k: jsonschema.Draft4Validator(s) for k, s in schemas.items()}

    @classmethod
    def from_crds(cls, crds: list[dict[str, Any]]) -> Oracle:
        return cls({
            crd["spec"]["names"]["kind"]: as_json_schema(
                crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            )
            for crd in crds
        })

    def error_paths(self, kind_name: str, fields: dict[str, Any], name: str = "") -> set[str]:
        """Paths of the errors in ``fields``, written like ours (``$.a[0].b``).

        The name is filled in from the subject when absent, as our validator does.
        """
        fields = prune_nulls(fields)
        if kind_name in NAME_FIELDS and name:
            fields.setdefault(NAME_FIELDS[kind_name], name)
        return {p for e in self.validators[kind_name].iter_errors(fields) for p in _paths(e)}


def _paths(error: jsonschema.ValidationError) -> Iterator[str]:
    path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    if error.validator == "required":  # reported on the object; ours on the missing field
        required, instance = cast(list[str], error.validator_value), cast(dict, error.instance)
        yield from (f"{path}.{r}" for r in required if r not in instance)
    else:
        yield path


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle.from_crds(list(upstream_crds().values()))


@pytest.fixture(scope="module")
def upstream_examples() -> dict[str, dict[str, Any]]:
    files = sorted((need_upstream() / "examples").glob("*.yaml"))
    return {p.name: yaml.safe_load(p.read_text()) for p in files}


def our_error_paths(kind_name: str, name: str, fields: dict[str, Any]) -> set[str]:
    """Our validator's error paths: through validate_payload for the subject kinds."""
    subject = {v: k for k, v in SUBJECT_KINDS.items()}.get(kind_name)
    if subject is not None:
        return error_paths(run(subject, name, {kind_name: fields}))
    found = Findings()  # continuum and datacenter have no subject: check the fields directly
    check(fields, schema_of(kind_name), "$", found)
    return {e.path for e in found.errors}


def name_of(kind_name: str, fields: dict[str, Any]) -> str:
    name = fields.get(NAME_FIELDS.get(kind_name, ""))
    return name if isinstance(name, str) else "subject-name"


def test_generated_schemas_are_the_upstream_schemas() -> None:
    """Same fields, types, enums and required fields, ignoring descriptions and order."""

    def shape(schema: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": schema["type"]}
        if "enum" in schema:
            out["enum"] = sorted(schema["enum"])
        if "required" in schema:
            out["required"] = sorted(schema["required"])
        if "properties" in schema:
            out["properties"] = {k: shape(v) for k, v in schema["properties"].items()}
        if "items" in schema:
            out["items"] = shape(schema["items"])
        return out

    upstream = upstream_crds()
    assert set(upstream) == set(KINDS)
    for kind_name, crd in upstream.items():
        theirs = as_json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        assert shape(schema_of(kind_name)) == shape(theirs), kind_name


def test_generated_crd_names_are_the_upstream_names() -> None:
    ours = {crd["spec"]["names"]["kind"]: crd for crd in crd_manifests()}
    for kind_name, theirs in upstream_crds().items():
        mine = ours[kind_name]
        assert mine["metadata"] == theirs["metadata"]
        for key in ("group", "names", "scope"):
            assert mine["spec"][key] == theirs["spec"][key], (kind_name, key)
        version = {k: v for k, v in theirs["spec"]["versions"][0].items() if k != "schema"}
        assert {k: v for k, v in mine["spec"]["versions"][0].items() if k != "schema"} == version


def test_upstream_examples_agree_with_the_oracle(
    oracle: Oracle, upstream_examples: dict[str, dict[str, Any]]
) -> None:
    assert len(upstream_examples) == 5
    for file, document in upstream_examples.items():
        [(kind_name, fields)] = document.items()
        name = name_of(kind_name, fields)
        expected = oracle.error_paths(kind_name, fields, name)
        assert our_error_paths(kind_name, name, fields) == expected, file
        assert not expected or file == "app.yaml"


def test_upstream_app_example_is_rejected_for_its_two_mistakes(
    oracle: Oracle, upstream_examples: dict[str, dict[str, Any]]
) -> None:
    payload = (need_upstream() / "examples" / "app.yaml").read_bytes()
    result = validate_payload("app", "test-application", payload)
    assert not result.accepted
    # restart_policy: on_failure (in both components) and gpu.memory: "2"
    gpu = "$.components[1].containers[0].platform_requirements.gpu.memory"
    policies = {f"$.components[{i}].restart_policy" for i in (0, 1)}
    assert error_paths(result) == policies | {gpu}
    for path in policies:
        assert messages(result, path) == "must be one of Always, OnFailure, Never; got 'on_failure'"
    assert messages(result, gpu) == "must be an integer; got the string '2'"
    fields = upstream_examples["app.yaml"]["MLSysOpsApp"]
    assert oracle.error_paths("MLSysOpsApp", fields) == policies | {gpu}


OWN_BAD_CASES = [
    app_doc(cluster_placement={"instances": 2.5, "cloud_provider": "ovh"}),
    app_doc(cluster_placement={"instances": "2", "location": {"city": ["paris"]}}),
    app_doc(global_satisfaction={"threshold": "high", "achievement_weights": [{"weight": True}]}),
    app_doc(components=None, single_node=[{"scaling": {"scaling_mode": "auto", "instances": 1.5}}]),
    with_component(host_network="True", restart_policy="on_failure", depends_on="web"),
    with_component(containers=[{"ports": [{"container_port": "80", "protocol": "tcp"}]}]),
    with_component(storage={"buckets": [{"server_side_encryption": True}]}),
    with_component(metadata=None, sensors=[{"camera": {"resolution": "640x480"}}]),
    {"MLSysOpsCluster": {"cluster_id": "c1", "nodes": "node-a", "datacenter_id": 3}},
    {"MLSysOpsNode": {"name": "n1", "continuum_layer": "fog", "environment": [], "hardware": {
        "memory": 4.5, "cpu": {"frequency": ["fast"]}}}},
    {"MLSysOpsNode": {"name": "n1", "continuum_layer": "edge", "environment": {}, "hardware": {},
                      "acceleration_api": [{"call_name": "image_inference"}],
                      "network_resources": {"redirection_interface": [{"mode": "mesh"}]}}},
    {"MLSysOpsContinuum": {"continuum_id": 1}},
    {"MLSysOpsDatacenter": {"datacenter_id": "d", "cluster_id": "c", "continuum": "edge",
                            "nodes": [], "continent": "Europe", "location": ["north"]}},
]


@pytest.mark.parametrize("document", OWN_BAD_CASES)
def test_own_bad_cases_agree_with_the_oracle(oracle: Oracle, document: dict[str, Any]) -> None:
    [(kind_name, fields)] = document.items()
    name = name_of(kind_name, fields)
    expected = oracle.error_paths(kind_name, fields, name)
    assert expected, "a bad case must be bad"
    assert our_error_paths(kind_name, name, fields) == expected


# --------------------------------------------------------------------------- mutations
DATACENTER = {"datacenter_id": "dc1", "cluster_id": "demo-cluster", "continuum": "edge",
              "nodes": ["node-a"], "continent": "europe", "country": "pt", "city": "porto",
              "location": [-8.6, 41.1], "cloud_provider": "private"}


VALID_DOCUMENTS = [
    *(file for _, _, file in PROJECT_EXAMPLES),
    *(f"upstream/{f}" for f in ("cluster.yaml", "continuum.yaml", "node1.yaml", "node2.yaml")),
    "upstream/app.yaml mended",
    "datacenter",
]


@functools.cache
def valid_document(which: str) -> tuple[str, dict[str, Any]]:
    """A valid (kind, fields): ours, upstream's valid ones, upstream's app mended, a datacenter."""
    if which == "datacenter":
        return "MLSysOpsDatacenter", DATACENTER
    if not which.startswith("upstream/"):
        return next(iter(example(which).items()))
    path = need_upstream() / "examples" / which.split("/")[1].split()[0]
    [(kind_name, fields)] = yaml.safe_load(path.read_text()).items()
    if which.endswith("mended"):
        for component in fields["components"]:
            component["restart_policy"] = "OnFailure"
        fields["components"][1]["containers"][0]["platform_requirements"]["gpu"]["memory"] = 2
    return kind_name, fields


def locations(value: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every position inside ``value`` (keys of mappings, indexes of lists)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield (*here, key)
        yield from locations(item, (*here, key))


# One value of each JSON type, to put where a value of another type is.
SAMPLES: dict[type, Any] = {
    str: "2", int: 2, float: 2.5, bool: True, type(None): None, list: ["x"], dict: {"x": 1},
}
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=2),
    st.dictionaries(st.sampled_from(["name", "model", "x"]), st.integers(), max_size=2),
)


def _replacement(draw: st.DrawFn, how: str, current: Any) -> Any:
    if how == "misspell" and isinstance(current, str):  # out of the enum, if it has one
        return draw(st.sampled_from([current.upper(), current + "_", "zzz", ""]))
    if how == "anything":
        return draw(ANY_VALUE)
    others = [value for kind, value in SAMPLES.items() if kind is not type(current)]
    return copy.deepcopy(draw(st.sampled_from(others)))  # later mutations may change it


@st.composite
def mutated(draw: st.DrawFn, kind_name: str, valid: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with 1-3 values retyped, misspelt or deleted (never its name)."""
    fields = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        spots = [s for s in locations(fields) if s != (NAME_FIELDS.get(kind_name),)]
        if not spots:
            break
        *to_parent, key = draw(st.sampled_from(spots))
        parent = functools.reduce(operator.getitem, to_parent, fields)
        how = draw(st.sampled_from(["retype", "misspell", "delete", "anything"]))
        if how == "delete":
            del parent[key]
        else:
            parent[key] = _replacement(draw, how, parent[key])
    return fields


@pytest.mark.parametrize("which", VALID_DOCUMENTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutations_agree_with_the_oracle(oracle: Oracle, which: str, data: st.DataObject) -> None:
    kind_name, valid = valid_document(which)
    fields = data.draw(mutated(kind_name, valid), label="mutated fields")
    name = name_of(kind_name, fields)
    assert our_error_paths(kind_name, name, fields) == oracle.error_paths(kind_name, fields, name)


def test_upstream_examples_are_valid_under_the_generated_crds(
    upstream_examples: dict[str, dict[str, Any]]
) -> None:
    ours = Oracle.from_crds(crd_manifests())
    upstream = Oracle.from_crds(list(upstream_crds().values()))
    for file, document in upstream_examples.items():
        [(kind_name, fields)] = document.items()
        assert ours.error_paths(kind_name, fields) == upstream.error_paths(kind_name, fields), file
    for _, _, file in PROJECT_EXAMPLES:
        [(kind_name, fields)] = example(file).items()
        assert ours.error_paths(kind_name, fields) == set(), file
