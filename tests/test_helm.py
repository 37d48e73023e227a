"""The Helm chart (deploy/helm/mlsysops), the image recipe and their agreement with the code.

Everything runs offline with the Helm v4 library (``helm_python``, no helm binary): the
chart is linted and rendered with its default values and with every values file under
``deploy/helm/mlsysops/ci/``; every rendered object is validated against the Kubernetes
schemas of ``kubernetes-validate`` (objects whose schema it does not ship, such as the
Prometheus Operator's ServiceMonitor, are checked explicitly). Then the properties an
operator relies on are asserted: replicas, RBAC, tokens, probes, secrets, namespaces,
plugins, the bundled NATS (started for real from the rendered configuration) and the
``helm test`` round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from mlsysops import settings as settings_mod
from tests.requirements import need_binary

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "mlsysops"
CI_DIR = CHART / "ci"
KUBE_VERSION = "1.30.0"
RELEASE = "rel"
NAMESPACE = "mlsysops-test"
COMPONENTS = ("monitor", "analyzer", "planner", "scheduler", "executor")
POLICY_USERS = ("monitor", "analyzer", "planner")
MECHANISM_USERS = ("scheduler", "executor")
FULLNAME = f"{RELEASE}-mlsysops"
EXECUTOR_SA = f"{FULLNAME}-executor"
# What the Fluidity mechanism does in its namespace (plugins/mechanisms/fluidity.py): list
# then watch Deployments and Services (its informer), get a name before creating it,
# server-side apply (a patch, authorized as create too when it creates), delete.
FLUIDITY_VERBS = {"create", "delete", "get", "list", "patch", "watch"}
FLUIDITY_RULES = {("apps", "deployments"): FLUIDITY_VERBS, ("", "services"): FLUIDITY_VERBS}
# And cluster-wide, read-only: the Nodes it checks before placing (a ClusterRole of its own).
NODE_RULES = {("", "nodes"): {"get", "list", "watch"}}
# Kinds kubernetes-validate has no schema for; each gets an explicit check below.
NOT_IN_KUBE_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "Pod")
# Settings a plugin reads itself (plugin_api.setting) rather than the Settings table.
PLUGIN_SETTINGS = {"FLUIDITY_NAMESPACE"}

SCENARIOS = ["default", *sorted(p.name for p in CI_DIR.glob("*-values.yaml"))]


# ------------------------------------------------------------------------------ helpers
@dataclass
class Rendered:
    """The objects of one rendering (NOTES.txt apart), with lookups."""

    objects: list[dict[str, Any]]
    notes: str
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def deployment(self, component: str) -> dict[str, Any]:
        return self.get("Deployment", f"{FULLNAME}-{component}")

    def workloads(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(object, pod spec) of every Deployment, StatefulSet, Job and Pod."""
        for obj in self.objects:
            if obj["kind"] == "Pod":
                yield obj, obj["spec"]
            elif obj["kind"] in WORKLOAD_KINDS:
                yield obj, obj["spec"]["template"]["spec"]


def ci_values(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    loaded = yaml.safe_load((CI_DIR / name).read_text())
    return loaded or {}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(
    chart: helm_python.Chart, values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> Rendered:
    values = values or {}
    manifests = chart.render(values, name=RELEASE, namespace=namespace)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes, chart.merge_values(values))


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def component_of(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def is_mlsysops_container(container: dict[str, Any]) -> bool:
    return container["name"] in COMPONENTS or container["name"] in ("round-trip", "init")


def check_service_monitor(obj: dict[str, Any]) -> None:
    """ServiceMonitor (monitoring.coreos.com/v1): the fields the Prometheus Operator needs."""
    assert obj["metadata"]["name"]
    spec = obj["spec"]
    selector = spec["selector"]
    assert all(isinstance(v, str) for v in selector.get("matchLabels", {}).values())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] in ("In", "NotIn", "Exists", "DoesNotExist")
        assert isinstance(expr["key"], str)
        assert all(isinstance(v, str) for v in expr.get("values", []))
    duration = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert isinstance(endpoint["port"], str)
        assert endpoint["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert duration.match(endpoint[key]), f"{key}: {endpoint[key]!r}"
        for key in ("relabelings", "metricRelabelings"):
            assert isinstance(endpoint.get(key, []), list)


def validate_object(obj: dict[str, Any]) -> None:
    if (obj["apiVersion"], obj["kind"]) in NOT_IN_KUBE_SCHEMAS:
        check_service_monitor(obj)
        return
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def shipped_files(directory: Path) -> dict[str, bytes]:
    """The files deploy/helm/sync-plugins.sh copies: regular, top level, not hidden or .pyc."""
    if not directory.is_dir():
        return {}
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".pyc")
    }


def render_error(chart: helm_python.Chart, values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(caught.value)


# ------------------------------------------------------------------------------ lint, schemas
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_is_clean(scenario: str) -> None:
    report = helm_python.lint(CHART, ci_values(scenario), strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid_kubernetes(chart: helm_python.Chart,
                                                   scenario: str) -> None:
    rendered = render(chart, ci_values(scenario))
    assert rendered.objects
    failures = []
    for obj in rendered.objects:
        try:
            validate_object(obj)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            failures.append(f"{obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_ci_values_cover_the_documented_setups() -> None:
    names = set(SCENARIOS)
    for needed in ("external-nats", "bundled-nats", "autoscaling", "tls", "credentials"):
        assert any(n.startswith(needed) for n in names), f"no ci/{needed}*-values.yaml"


def test_chart_crds_are_valid_kubernetes(chart: helm_python.Chart) -> None:
    crds = [doc for f in chart.crds for doc in yaml.safe_load_all(f["data"]) if doc]
    if not crds:
        pytest.fail("deploy/helm/mlsysops/crds/ is empty: run deploy/helm/generate-crds.sh")
    for crd in crds:
        assert crd["kind"] == "CustomResourceDefinition"
        kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)


def test_chart_crds_match_the_description_types() -> None:
    from mlsysops.descriptions import crd_manifests

    expected = crd_manifests()
    if isinstance(expected, str):
        expected = [doc for doc in yaml.safe_load_all(expected) if doc]
    path = CHART / "crds" / "mlsysops-crds.yaml"
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run deploy/helm/generate-crds.sh"
    shipped = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    normalise = lambda docs: json.loads(json.dumps(docs, sort_keys=True))  # noqa: E731
    assert normalise(shipped) == normalise(expected), (
        "the chart's CRDs differ from mlsysops.descriptions.crd_manifests(): "
        "run deploy/helm/generate-crds.sh")


BAD_VALUES = [
    ({"planner": {"replicas": -1}}, ["/planner/replicas", "minimum"]),
    ({"scheduler": {"replicas": "two"}}, ["/scheduler/replicas", "want integer"]),
    ({"config": {"logFormat": "xml"}}, ["/config/logFormat", "json", "console"]),
    ({"config": {"httpPort": 70000}}, ["/config/httpPort", "maximum"]),
    ({"planer": {"replicas": 2}}, ["planer", "not allowed"]),
    ({"executor": {"replica": 2}}, ["/executor", "replica", "not allowed"]),
    ({"nats": {"url": "http://nats:4222"}}, ["/nats/url", "pattern"]),
    ({"nats": {"auth": {"type": "kerberos"}}}, ["/nats/auth/type", "userPassword"]),
    ({"nats": {"auth": {"password": "hunter2"}}}, ["/nats/auth", "password", "not allowed"]),
    ({"analyzer": {"autoscaling": {"enabled": "yes"}}},
     ["/analyzer/autoscaling/enabled", "want boolean"]),
    ({"monitor": {"podAntiAffinityPreset": "medium"}}, ["/monitor/podAntiAffinityPreset"]),
    ({"plugins": {"policies": {"extra": {"policy.py": 3}}}},
     ["/plugins/policies/extra/policy.py", "want string"]),
    ({"plugins": {"policies": {"extra": {"dir/policy.py": "x"}}}}, ["dir/policy.py", "pattern"]),
    ({"tests": {"descriptions": [{"kind": "pod", "file": "/app/x.yaml"}]}},
     ["/tests/descriptions/0/kind"]),
    ({"nats": {"cluster": {"replicas": 1}}}, ["/nats/cluster/replicas", "minimum"]),
    ({"nats": {"streamReplicas": 7}}, ["/nats/streamReplicas", "maximum"]),
    ({"nats": {"leafnodes": {"service": {"type": "Ingress"}}}},
     ["/nats/leafnodes/service/type"]),
    ({"nats": {"leafnodes": {"tls": {"password": "x"}}}}, ["/nats/leafnodes/tls", "not allowed"]),
    ({"init": {"backoffLimit": -1}}, ["/init/backoffLimit", "minimum"]),
]


@pytest.mark.parametrize(("values", "fragments"), BAD_VALUES,
                         ids=[json.dumps(v, sort_keys=True) for v, _ in BAD_VALUES])
def test_schema_refuses_bad_values_with_a_clear_message(
    chart: helm_python.Chart, values: dict[str, Any], fragments: list[str]
) -> None:
    message = render_error(chart, values)
    assert "schema" in message
    for fragment in fragments:
        assert fragment in message, message
    report = helm_python.lint(CHART, values, namespace=NAMESPACE)
    assert any(fragments[0] in e for e in report["errors"]), report


BAD_COMBINATIONS = [
    ({"nats": {"url": ""}}, "nats.url"),
    ({"nats": {"auth": {"type": "token"}}}, "nats.auth.existingSecret"),
    ({"nats": {"tls": {"enabled": True}}}, "nats.tls.existingSecret"),
    ({"nats": {"tls": {"enabled": True, "existingSecret": "s", "caKey": ""}}}, "nats.tls"),
    ({"nats": {"bundled": {"enabled": True},
               "tls": {"enabled": True, "existingSecret": "s"}}}, "nats.tls.enabled"),
    ({"nats": {"bundled": {"enabled": True},
               "auth": {"type": "creds", "existingSecret": "s"}}}, "nats.auth.type=creds"),
    ({"config": {"extra": {"nats_password": "hunter2"}}}, "config.extra.nats_password"),
    ({"config": {"extra": {"policy_dir": "/x"}}}, "config.extra.policy_dir"),
    ({"config": {"extra": {"stream_replicas": 3}}}, "config.extra.stream_replicas"),
    ({"nats": {"bundled": {"enabled": True}, "cluster": {"replicas": 4}}},
     "nats.cluster.replicas: use an odd number of servers, at least 3 (got 4)"),
    ({"nats": {"bundled": {"enabled": True}, "cluster": {"enabled": False},
               "streamReplicas": 3}}, "nats.streamReplicas: 3 replicas need as many"),
    ({"nats": {"bundled": {"enabled": True}, "leafnodes": {"enabled": True, "auth": {
        "existingSecret": "leaf"}}}}, "nats.leafnodes.tls.existingSecret"),
    ({"nats": {"bundled": {"enabled": True}, "leafnodes": {"enabled": True, "tls": {
        "existingSecret": "leaf-tls"}}}}, "nats.leafnodes.auth.existingSecret"),
    ({"nats": {"leafnodes": {"enabled": True, "insecure": True}}},
     "nats.leafnodes.enabled: the leaf node port is opened on the bundled NATS"),
    ({"planner": {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}},
     "planner.autoscaling: minReplicas (4) is greater than maxReplicas (2)"),
    ({"executor": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}},
     "executor.autoscaling"),
    ({"scheduler": {"pdb": {"create": True, "minAvailable": 1, "maxUnavailable": 1}}},
     "scheduler.pdb"),
]


@pytest.mark.parametrize(("values", "fragment"), BAD_COMBINATIONS,
                         ids=[json.dumps(v, sort_keys=True) for v, _ in BAD_COMBINATIONS])
def test_invalid_combinations_fail_naming_the_value(
    chart: helm_python.Chart, values: dict[str, Any], fragment: str
) -> None:
    assert fragment in render_error(chart, values)


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a comment above it, or sits inside a value whose
    ``# --`` comment documents it as a whole (a resources or probe block)."""
    key = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):")
    stack: list[tuple[int, bool]] = []
    comment: str | None = None
    undocumented = []
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            comment = None
            continue
        if text.startswith("#"):
            comment = comment or text
            continue
        match = key.match(line)
        if text.startswith("- ") or not match:
            comment = None
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inherited = bool(stack) and stack[-1][1]
        if comment is None and not inherited:
            undocumented.append(f"values.yaml:{number}: {text}")
        stack.append((indent, inherited or bool(comment and comment.startswith("# --"))))
        comment = None
    assert not undocumented, "\n".join(undocumented)


def test_schema_knows_every_default_value(chart: helm_python.Chart) -> None:
    """additionalProperties is false: a value in values.yaml missing from the schema would
    make the defaults themselves invalid."""
    chart.validate_schema(chart.values)


# ------------------------------------------------------------------------------ replicas
def test_default_replicas_one_each_and_an_active_plus_standby_scheduler(
    chart: helm_python.Chart,
) -> None:
    rendered = render(chart)
    replicas = {c: rendered.deployment(c)["spec"]["replicas"] for c in COMPONENTS}
    assert replicas == {"monitor": 1, "analyzer": 1, "planner": 1, "scheduler": 2,
                        "executor": 1}
    assert rendered.of_kind("HorizontalPodAutoscaler") == []
    strategy = rendered.deployment("scheduler")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0  # a standby is always there


def test_replicas_come_from_values(chart: helm_python.Chart) -> None:
    wanted = {"monitor": 0, "analyzer": 4, "planner": 5, "scheduler": 3, "executor": 7}
    rendered = render(chart, {c: {"replicas": n} for c, n in wanted.items()})
    assert {c: rendered.deployment(c)["spec"]["replicas"] for c in COMPONENTS} == wanted


def test_autoscaling_replaces_fixed_replicas(chart: helm_python.Chart) -> None:
    values = ci_values("autoscaling-values.yaml")
    rendered = render(chart, values)
    hpas = {h["metadata"]["name"]: h for h in rendered.of_kind("HorizontalPodAutoscaler")}
    scaled = {c for c in COMPONENTS if values.get(c, {}).get("autoscaling", {}).get("enabled")}
    assert set(hpas) == {f"{FULLNAME}-{c}" for c in scaled}
    for component in COMPONENTS:
        spec = rendered.deployment(component)["spec"]
        if component not in scaled:
            assert "replicas" in spec
            continue
        assert "replicas" not in spec  # the HPA owns it
        cfg = rendered.values[component]["autoscaling"]
        hpa = hpas[f"{FULLNAME}-{component}"]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": f"{FULLNAME}-{component}"}
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (cfg["minReplicas"],
                                                            cfg["maxReplicas"])
        targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"]
                   for m in hpa["metrics"]}
        expected = {name: cfg[key] for name, key in
                    (("cpu", "targetCPUUtilizationPercentage"),
                     ("memory", "targetMemoryUtilizationPercentage")) if cfg.get(key)}
        assert targets == expected
        assert hpa.get("behavior", {}) == cfg["behavior"]


def test_pod_disruption_budgets_when_asked(chart: helm_python.Chart) -> None:
    assert render(chart).of_kind("PodDisruptionBudget") == []
    rendered = render(chart, ci_values("external-nats-values.yaml"))
    pdbs = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("PodDisruptionBudget")}
    assert pdbs[f"{FULLNAME}-scheduler"]["minAvailable"] == 1
    assert pdbs[f"{FULLNAME}-executor"]["maxUnavailable"] == 1
    for spec in pdbs.values():
        assert not ("minAvailable" in spec and "maxUnavailable" in spec)


# ------------------------------------------------------------------------------ RBAC, tokens
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_the_executor_can_talk_to_kubernetes(chart: helm_python.Chart,
                                                  scenario: str) -> None:
    rendered = render(chart, ci_values(scenario))
    for obj, pod in rendered.workloads():
        name = obj["metadata"]["name"]
        if component_of(obj) == "executor":
            assert pod["serviceAccountName"] == EXECUTOR_SA, name
            assert pod["automountServiceAccountToken"] is True, name
        else:
            assert pod.get("automountServiceAccountToken") is False, name
            assert pod.get("serviceAccountName") != EXECUTOR_SA, name
    for sa in rendered.of_kind("ServiceAccount"):
        if sa["metadata"]["name"] != EXECUTOR_SA:
            assert sa["automountServiceAccountToken"] is False
    bindings = rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding")
    assert bindings, "the executor needs its binding"
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": EXECUTOR_SA, "namespace": NAMESPACE}]


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def nodes_role_of(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ClusterRole reading Nodes and its binding (checked), by the chart's name."""
    name = f"{NAMESPACE}-{FULLNAME}-executor-nodes"
    role = rendered.get("ClusterRole", name)
    binding = rendered.get("ClusterRoleBinding", name)
    assert "namespace" not in role["metadata"] and "namespace" not in binding["metadata"]
    assert rules_of(role) == NODE_RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": name}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": EXECUTOR_SA, "namespace": NAMESPACE}]
    for obj in (role, binding):
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "executor"
    return role, binding


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_executor_may_read_nodes_only(chart: helm_python.Chart, scenario: str) -> None:
    """Nodes are cluster-scoped: a ClusterRole of their own, get/list/watch on nodes only,
    bound to the executor's account, whether or not the other rules are cluster-wide."""
    rendered = render(chart, ci_values(scenario))
    nodes_role_of(rendered)
    for role in rendered.of_kind("Role") + rendered.of_kind("ClusterRole"):
        rules = rules_of(role)  # no other role mentions Nodes, this one nothing else
        assert (("", "nodes") in rules) == (rules == NODE_RULES), role["metadata"]["name"]


def test_executor_role_is_exactly_what_fluidity_needs(chart: helm_python.Chart) -> None:
    rendered = render(chart)
    nodes_role, nodes_binding = nodes_role_of(rendered)
    assert rendered.of_kind("ClusterRole") == [nodes_role]
    assert rendered.of_kind("ClusterRoleBinding") == [nodes_binding]
    (role,) = rendered.of_kind("Role")
    (binding,) = rendered.of_kind("RoleBinding")
    assert rules_of(role) == FLUIDITY_RULES
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    executor = rendered.deployment("executor")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(executor)["MLSYSOPS_FLUIDITY_NAMESPACE"]["value"] == NAMESPACE


def test_executor_role_lives_in_the_fluidity_namespace(chart: helm_python.Chart) -> None:
    rendered = render(chart, ci_values("external-nats-values.yaml"))
    (role,) = rendered.of_kind("Role")
    (binding,) = rendered.of_kind("RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "workloads"
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert NAMESPACE in role["metadata"]["name"]  # unique per release in a shared namespace
    assert rules_of(role) == FLUIDITY_RULES
    nodes_role_of(rendered)  # Nodes are not in the Fluidity namespace: cluster-wide
    for component in MECHANISM_USERS:
        container = rendered.deployment(component)["spec"]["template"]["spec"]["containers"][0]
        assert env_of(container)["MLSYSOPS_FLUIDITY_NAMESPACE"]["value"] == "workloads"


def test_cluster_wide_rbac_when_configured(chart: helm_python.Chart) -> None:
    rendered = render(chart, ci_values("cluster-wide-rbac-values.yaml"))
    assert rendered.of_kind("Role") == [] and rendered.of_kind("RoleBinding") == []
    nodes_role, nodes_binding = nodes_role_of(rendered)  # kept separate, the same
    (role,) = [r for r in rendered.of_kind("ClusterRole") if r is not nodes_role]
    (binding,) = [b for b in rendered.of_kind("ClusterRoleBinding") if b is not nodes_binding]
    assert role["metadata"]["name"] == f"{NAMESPACE}-{FULLNAME}-executor"
    assert "namespace" not in role["metadata"]
    assert rules_of(role) == {**FLUIDITY_RULES, ("", "configmaps"): {"get", "list"}}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    # with serviceAccount.create=false the others use "default", still without a token
    for component in ("monitor", "analyzer", "planner", "scheduler"):
        pod = rendered.deployment(component)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "default"
        assert pod["automountServiceAccountToken"] is False


def test_no_rbac_when_disabled(chart: helm_python.Chart) -> None:
    rendered = render(chart, {"executor": {"rbac": {"create": False}}})
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert rendered.of_kind(kind) == []


# ------------------------------------------------------------------------------ probes, metrics
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_point_at_the_health_endpoints(chart: helm_python.Chart, scenario: str) -> None:
    rendered = render(chart, ci_values(scenario))
    port = rendered.values["config"]["httpPort"]
    for component in COMPONENTS:
        (container,) = rendered.deployment(component)["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [f"mlsysops-{component}"]
        assert container["ports"] == [{"name": "http", "containerPort": port,
                                       "protocol": "TCP"}]
        assert env_of(container)["MLSYSOPS_HTTP_PORT"]["value"] == str(port)
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                            ("startupProbe", "/healthz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_probes_can_be_tuned_or_disabled(chart: helm_python.Chart) -> None:
    rendered = render(chart, {"planner": {"startupProbe": {"enabled": False},
                                          "livenessProbe": {"periodSeconds": 42}}})
    container = rendered.deployment("planner")["spec"]["template"]["spec"]["containers"][0]
    assert "startupProbe" not in container
    assert container["livenessProbe"]["periodSeconds"] == 42
    assert "enabled" not in container["livenessProbe"]


def test_every_service_is_scraped_by_prometheus(chart: helm_python.Chart) -> None:
    rendered = render(chart, {"config": {"httpPort": 9200}})
    for component in COMPONENTS:
        annotations = rendered.deployment(component)["spec"]["template"]["metadata"][
            "annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9200"
        assert annotations["prometheus.io/path"] == "/metrics"
        service = rendered.get("Service", f"{FULLNAME}-{component}")
        assert service["spec"]["ports"] == [{"name": "http", "port": 9200, "targetPort": "http",
                                             "protocol": "TCP"}]
    assert rendered.of_kind("ServiceMonitor") == []  # off by default
    off = render(chart, {"metrics": {"podAnnotations": False}})
    for component in COMPONENTS:
        metadata = off.deployment(component)["spec"]["template"]["metadata"]
        assert "prometheus.io/scrape" not in metadata.get("annotations", {})


def test_service_monitor_selects_exactly_the_five_services(chart: helm_python.Chart) -> None:
    rendered = render(chart, ci_values("external-nats-values.yaml"))
    (monitor,) = rendered.of_kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]

    def selected(labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in selector["matchLabels"].items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"])

    services = {s["metadata"]["name"] for s in rendered.of_kind("Service")
                if selected(s["metadata"]["labels"])}
    assert services == {f"{FULLNAME}-{c}" for c in COMPONENTS}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http",
                                                                               "/metrics")]


# ------------------------------------------------------------------------------ conventions
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_object_hard_codes_a_namespace(chart: helm_python.Chart, scenario: str) -> None:
    values = ci_values(scenario)
    fluidity = values.get("executor", {}).get("fluidity", {}).get("namespace")
    for namespace in ("ns-one", "ns-two"):
        rendered = render(chart, values, namespace=namespace)
        for obj in rendered.objects:
            where = obj["metadata"].get("namespace", namespace)
            allowed = {namespace}
            if obj["kind"] in ("Role", "RoleBinding") and fluidity:
                allowed = {fluidity}
            assert where in allowed, f"{obj['kind']} {obj['metadata']['name']} in {where}"
            for subject in obj.get("subjects", []):
                assert subject["namespace"] == namespace


def test_templates_contain_no_literal_namespace() -> None:
    literal = re.compile(r"^\s*namespace:\s*[\"']?[a-z0-9]", re.M)
    for template in (CHART / "templates").rglob("*.yaml"):
        assert not literal.search(template.read_text()), template


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_standard_labels_and_selectors(chart: helm_python.Chart, scenario: str) -> None:
    values = ci_values(scenario)
    rendered = render(chart, values)
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "mlsysops"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "mlsysops"
        assert labels["helm.sh/chart"] == "mlsysops-0.1.0"
        assert labels["app.kubernetes.io/version"]
        for key, value in values.get("commonLabels", {}).items():
            assert labels[key] == value
    for obj, _ in rendered.workloads():
        if obj["kind"] in ("Pod", "Job"):  # a Job selects its pods itself
            continue
        selector = obj["spec"]["selector"]["matchLabels"]
        pod_labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert selector["app.kubernetes.io/component"] == component_of(obj)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_containers_run_locked_down(chart: helm_python.Chart, scenario: str) -> None:
    rendered = render(chart, ci_values(scenario))
    for obj, pod in rendered.workloads():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in containers(pod):
            where = f"{obj['metadata']['name']}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "resources" in container, where


def test_image_reference(chart: helm_python.Chart) -> None:
    rendered = render(chart)
    image = rendered.deployment("planner")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "mlsysops:0.1.0"  # appVersion by default
    rendered = render(chart, {"image": {"registry": "ghcr.io", "repository": "org/mlsysops",
                                        "tag": "1.2.3"}})
    image = rendered.deployment("planner")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "ghcr.io/org/mlsysops:1.2.3"
    rendered = render(chart, ci_values("cluster-wide-rbac-values.yaml"))
    for _, pod in rendered.workloads():
        assert pod["containers"][0]["image"].startswith(
            "registry.example.com/platform/mlsysops@sha256:")
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]


# ------------------------------------------------------------------------------ NATS settings
def test_services_connect_to_the_configured_nats(chart: helm_python.Chart) -> None:
    values = ci_values("external-nats-values.yaml")
    rendered = render(chart, values)
    for component in COMPONENTS:
        container = rendered.deployment(component)["spec"]["template"]["spec"]["containers"][0]
        env = env_of(container)
        assert env["MLSYSOPS_NATS_URL"]["value"] == values["nats"]["url"]
        assert env["MLSYSOPS_PROMETHEUS_URL"]["value"] == values["config"]["prometheusUrl"]
        assert env["MLSYSOPS_LOG_LEVEL"]["value"] == "debug"
        assert env["MLSYSOPS_EXEC_TIMEOUT"]["value"] == "45s"
        assert env["MLSYSOPS_QUARANTINE_AFTER"]["value"] == "3"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_setting_the_chart_sets_exists(chart: helm_python.Chart, scenario: str) -> None:
    known = {settings_mod.env_name(f) for f in settings_mod.Settings.__dataclass_fields__}
    known |= {f"MLSYSOPS_{name}" for name in PLUGIN_SETTINGS}
    rendered = render(chart, ci_values(scenario))
    for _, pod in rendered.workloads():
        for container in containers(pod):
            for name in env_of(container):
                if name.startswith("MLSYSOPS_"):
                    assert name in known, f"{container['name']}: {name} is no setting"
            names = [e["name"] for e in container.get("env", [])]
            assert len(names) == len(set(names)), f"duplicate env in {container['name']}"


SECRET_SCENARIOS = {
    "credentials-userpass-values.yaml": {"MLSYSOPS_NATS_USER": "username",
                                         "MLSYSOPS_NATS_PASSWORD": "password"},
    "bundled-nats-values.yaml": {"MLSYSOPS_NATS_USER": "user",
                                 "MLSYSOPS_NATS_PASSWORD": "password"},
    "bundled-nats-emptydir-values.yaml": {"MLSYSOPS_NATS_TOKEN": "token"},
}


@pytest.mark.parametrize("scenario", sorted(SECRET_SCENARIOS))
def test_nats_credentials_come_from_the_secret_only(chart: helm_python.Chart,
                                                    scenario: str) -> None:
    values = ci_values(scenario)
    secret = values["nats"]["auth"]["existingSecret"]
    rendered = render(chart, values)
    assert rendered.of_kind("Secret") == []  # the chart never holds a credential
    for obj, pod in rendered.workloads():
        for container in containers(pod):
            if not is_mlsysops_container(container):
                continue
            env = env_of(container)
            for name, key in SECRET_SCENARIOS[scenario].items():
                assert "value" not in env[name], f"{obj['metadata']['name']}: {name} in clear"
                assert env[name]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}


@pytest.mark.parametrize(("scenario", "setting", "key"), [
    ("credentials-creds-values.yaml", "MLSYSOPS_NATS_CREDS", "mlsysops.creds"),
    ("credentials-nkey-values.yaml", "MLSYSOPS_NATS_NKEY_SEED", "nkey.seed"),
])
def test_nats_credential_files_are_mounted(chart: helm_python.Chart, scenario: str,
                                           setting: str, key: str) -> None:
    values = ci_values(scenario)
    rendered = render(chart, values)
    for obj, pod in rendered.workloads():
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["nats-auth"]["secret"]["secretName"] == values["nats"]["auth"][
            "existingSecret"]
        assert volumes["nats-auth"]["secret"]["items"] == [{"key": key, "path": key}]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "nats-auth"]
        assert mount["readOnly"] is True
        assert env_of(container)[setting]["value"] == f"{mount['mountPath']}/{key}", obj


def test_nats_tls_files_are_mounted(chart: helm_python.Chart) -> None:
    values = ci_values("tls-values.yaml")
    tls = values["nats"]["tls"]
    rendered = render(chart, values)
    for _, pod in rendered.workloads():
        (container,) = pod["containers"]
        volume = {v["name"]: v for v in pod["volumes"]}["nats-tls"]["secret"]
        assert volume["secretName"] == tls["existingSecret"]
        paths = {i["key"]: i["path"] for i in volume["items"]}
        assert paths == {k: k for k in (tls["caKey"], tls["certKey"], tls["keyKey"])}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "nats-tls"]
        env = env_of(container)
        for setting, key in (("MLSYSOPS_NATS_TLS_CA", "caKey"), ("MLSYSOPS_NATS_TLS_CERT",
                                                                 "certKey"),
                             ("MLSYSOPS_NATS_TLS_KEY", "keyKey")):
            assert env[setting]["value"] == f"{mount['mountPath']}/{tls[key]}"
        assert env["MLSYSOPS_NATS_URL"]["value"].startswith("tls://")


# ------------------------------------------------------------------------------ bundled NATS
BUNDLED = ["bundled-nats-values.yaml", "bundled-nats-emptydir-values.yaml",
           "bundled-nats-leafnodes-values.yaml"]


def member_host(index: int, namespace: str = NAMESPACE) -> str:
    """The stable DNS name of bundled NATS server ``index`` (its pod in the headless Service)."""
    return f"{FULLNAME}-nats-{index}.{FULLNAME}-nats-headless.{namespace}.svc"


@pytest.mark.parametrize("scenario", BUNDLED)
def test_bundled_nats_runs_the_configured_servers(chart: helm_python.Chart,
                                                  scenario: str) -> None:
    """Clustered (the default): N servers routing to every member by its stable name, a
    claim each, a PDB letting one go at a time, the services listing every member and
    keeping streams R3. Single-node: one server behind its Service, streams R1."""
    values = ci_values(scenario)
    rendered = render(chart, values)
    clustered = rendered.values["nats"]["cluster"]["enabled"]
    servers = rendered.values["nats"]["cluster"]["replicas"] if clustered else 1
    nats = rendered.get("StatefulSet", f"{FULLNAME}-nats")
    assert nats["spec"]["replicas"] == servers
    assert nats["spec"]["serviceName"] == f"{FULLNAME}-nats-headless"
    pod = nats["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("docker.io/nats:")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    volumes = {v["name"]: v for v in pod["volumes"]}
    persistence = rendered.values["nats"]["bundled"]["persistence"]
    if persistence["enabled"]:  # one claim per pod
        (claim,) = nats["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data" and "data" not in volumes
        assert claim["spec"]["resources"]["requests"]["storage"] == persistence["size"]
        assert claim["spec"].get("storageClassName", "") == persistence["storageClass"]
    else:
        assert "volumeClaimTemplates" not in nats["spec"]
        assert volumes["data"] == {"name": "data", "emptyDir": {}}
    service = rendered.get("Service", f"{FULLNAME}-nats")
    assert service["spec"]["ports"][0]["port"] == 4222
    headless = rendered.get("Service", f"{FULLNAME}-nats-headless")["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    conf = rendered.get("ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    pdbs = [p for p in rendered.of_kind("PodDisruptionBudget") if component_of(p) == "nats"]
    if clustered:
        port = rendered.values["nats"]["cluster"]["port"]
        assert {"name": "cluster", "port": port, "targetPort": "cluster", "protocol": "TCP",
                "appProtocol": "tcp"} in headless["ports"]
        routes = re.findall(r"nats://[^\s\]]+:" + str(port), conf)
        assert routes == [f"nats://{member_host(i)}:{port}" for i in range(servers)]
        url = ",".join(f"nats://{member_host(i)}:4222" for i in range(servers))
        replicas = "3"
        (pdb,) = pdbs
        assert pdb["spec"] == {"maxUnavailable": 1,
                               "selector": nats["spec"]["selector"]}
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
            nats["spec"]["selector"]["matchLabels"]
    else:
        assert "cluster {" not in conf and pdbs == []
        url, replicas = f"nats://{FULLNAME}-nats.{NAMESPACE}.svc:4222", "1"
    for obj, spec in rendered.workloads():
        for c in containers(spec):
            if is_mlsysops_container(c):
                env = env_of(c)
                assert env["MLSYSOPS_NATS_URL"]["value"] == url, obj["metadata"]["name"]
                assert env["MLSYSOPS_STREAM_REPLICAS"]["value"] == replicas
    assert "bundled" in rendered.notes
    assert render(chart).of_kind("StatefulSet") == []  # external NATS by default


def test_stream_replicas_follow_the_server_and_the_value(chart: helm_python.Chart) -> None:
    def replicas(values: dict[str, Any]) -> str:
        container = render(chart, values).deployment("planner")["spec"]["template"]["spec"][
            "containers"][0]
        return str(env_of(container)["MLSYSOPS_STREAM_REPLICAS"]["value"])

    assert replicas({}) == "1"  # an external NATS: unknown, R1 unless told
    assert replicas({"nats": {"streamReplicas": 3}}) == "3"
    assert replicas({"nats": {"bundled": {"enabled": True}}}) == "3"
    assert replicas({"nats": {"bundled": {"enabled": True}, "cluster": {"replicas": 5}}}) == "3"
    assert replicas({"nats": {"bundled": {"enabled": True}, "streamReplicas": 5,
                              "cluster": {"replicas": 5}}}) == "5"
    assert replicas({"nats": {"bundled": {"enabled": True},
                              "cluster": {"enabled": False}}}) == "1"


def test_leafnode_port_is_off_by_default(chart: helm_python.Chart) -> None:
    rendered = render(chart, ci_values("bundled-nats-values.yaml"))
    conf = rendered.get("ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    assert "leafnodes" not in conf
    assert all("leafnodes" not in s["metadata"]["name"] for s in rendered.of_kind("Service"))
    container = rendered.get("StatefulSet", f"{FULLNAME}-nats")["spec"]["template"]["spec"][
        "containers"][0]
    assert [p["name"] for p in container["ports"]] == ["nats", "monitor", "cluster"]


def test_leafnode_port_with_tls_and_credentials(chart: helm_python.Chart) -> None:
    values = ci_values("bundled-nats-leafnodes-values.yaml")
    leaf = values["nats"]["leafnodes"]
    rendered = render(chart, values)
    service = rendered.get("Service", f"{FULLNAME}-nats-leafnodes")["spec"]
    assert service["type"] == "NodePort"
    assert service["ports"] == [{"name": "leafnodes", "port": 7422, "targetPort": "leafnodes",
                                 "protocol": "TCP", "appProtocol": "tcp", "nodePort": 30422}]
    nats = rendered.get("StatefulSet", f"{FULLNAME}-nats")
    assert service["selector"] == nats["spec"]["selector"]["matchLabels"]
    pod = nats["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "leafnodes", "containerPort": 7422, "protocol": "TCP"} in container["ports"]
    conf = rendered.get("ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    block = conf[conf.index("leafnodes {"):]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "leafnodes-tls"]
    assert mount["readOnly"] is True
    for key, option in (("tls.crt", "cert_file"), ("tls.key", "key_file"),
                        ("ca.crt", "ca_file")):
        assert f'{option}: "{mount["mountPath"]}/{key}"' in block
    assert "verify: true" in block  # a CA given: leaves present client certificates
    secret = {v["name"]: v for v in pod["volumes"]}["leafnodes-tls"]["secret"]
    assert secret["secretName"] == leaf["tls"]["existingSecret"]
    assert {i["key"] for i in secret["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    assert "user: $NATS_LEAF_USER" in block and "password: $NATS_LEAF_PASSWORD" in block
    env = env_of(container)
    for name, key in (("NATS_LEAF_SECRET_USER", "leaf-user"),
                      ("NATS_LEAF_SECRET_PASSWORD", "leaf-password")):
        assert env[name]["valueFrom"] == {"secretKeyRef": {
            "name": leaf["auth"]["existingSecret"], "key": key}}
    assert rendered.of_kind("Secret") == []
    # insecure: neither TLS nor credentials, said so explicitly
    rendered = render(chart, {"nats": {"bundled": {"enabled": True}, "leafnodes": {
        "enabled": True, "insecure": True, "service": {"type": "ClusterIP"}}}})
    conf = rendered.get("ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    block = conf[conf.index("leafnodes {"):]
    assert "tls {" not in block and "authorization" not in block
    assert rendered.get("Service", f"{FULLNAME}-nats-leafnodes")["spec"]["type"] == "ClusterIP"


# ------------------------------------------------------------------------------ the init Job
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_init_job_runs_mlsysops_init_as_a_hook_with_the_services_settings(
    chart: helm_python.Chart, scenario: str
) -> None:
    rendered = render(chart, ci_values(scenario))
    job = rendered.get("Job", f"{FULLNAME}-init")
    annotations = job["metadata"]["annotations"]
    bundled = rendered.values["nats"]["bundled"]["enabled"]
    # the bundled servers exist only once the release is applied; an external one before
    assert annotations["helm.sh/hook"] == ("post-install,post-upgrade" if bundled
                                           else "pre-install,pre-upgrade")
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = job["spec"]
    assert spec["backoffLimit"] == rendered.values["init"]["backoffLimit"]
    assert spec["activeDeadlineSeconds"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["args"] == ["mlsysops", "init"]
    planner = rendered.deployment("planner")["spec"]["template"]["spec"]
    (service,) = planner["containers"]
    assert container["image"] == service["image"]
    shared = {k: v for k, v in env_of(service).items()
              if k not in ("MLSYSOPS_POLICY_DIR", "MLSYSOPS_FLUIDITY_NAMESPACE")}
    assert env_of(container) == shared  # NATS, credentials, prefix, replicas, limits
    service_volumes = [v for v in planner["volumes"] if v["name"] != "policies"]
    assert pod["volumes"] == service_volumes
    assert container["volumeMounts"] == [m for m in service["volumeMounts"]
                                         if m["name"] != "policies"]
    if not bundled and rendered.values["serviceAccount"]["create"]:
        # pre-install runs before the chart's own account exists
        assert pod["serviceAccountName"] == "default"
    assert pod["automountServiceAccountToken"] is False
    assert render(chart, {"init": {"enabled": False}}).of_kind("Job") == []


def test_init_job_carries_the_stream_settings(chart: helm_python.Chart) -> None:
    rendered = render(chart, {"nats": {"streamReplicas": 3}, "config": {
        "streamMaxBytes": 10_000_000, "kvMaxBytes": 5_000_000,
        "extra": {"stream_max_age": "2d", "max_payload": 2_000_000}}})
    (container,) = rendered.get("Job", f"{FULLNAME}-init")["spec"]["template"]["spec"][
        "containers"]
    env = resolve_env(container, {})
    cfg = settings_mod.load(env=env)
    assert (cfg.stream_replicas, cfg.stream_max_age, cfg.stream_max_bytes,
            cfg.kv_max_bytes, cfg.max_payload) == (3, 2 * 86400.0, 10_000_000, 5_000_000,
                                                   2_000_000)


@pytest.mark.parametrize("scenario", BUNDLED)
def test_the_layout_fits_in_the_bundled_store(chart: helm_python.Chart, scenario: str) -> None:
    """JetStream reserves each stream's and bucket's byte limit in the server's store and
    refuses what does not fit: the limits the chart hands the services must add up to no
    more than the bundled store (the services' 1 GiB defaults would not)."""
    from mlsysops import layout

    rendered = render(chart, ci_values(scenario))
    (container,) = rendered.get("Job", f"{FULLNAME}-init")["spec"]["template"]["spec"][
        "containers"]
    plain = [e for e in container["env"] if "value" in e]  # no credentials needed here
    cfg = settings_mod.load(env=resolve_env({"env": plain}, {}))
    reserved = sum(max(c.max_bytes or 0, 0) for c in layout.streams(cfg))
    reserved += sum(max(b.max_bytes or 0, 0) for _, b in layout.buckets(cfg))
    store = rendered.values["nats"]["bundled"]["jetstream"]["maxFileStore"]
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number = re.fullmatch(r"(\d+)([KMGT]?)B?", store)
    assert number, store
    assert 0 < reserved <= int(number.group(1)) * units.get(number.group(2), 1)
    unbounded = render(chart, {"nats": {"bundled": {"enabled": True}},
                               "config": {"streamMaxBytes": -1}}).deployment("planner")
    env = env_of(unbounded["spec"]["template"]["spec"]["containers"][0])
    assert env["MLSYSOPS_STREAM_MAX_BYTES"]["value"] == "-1"  # the value wins
    external = env_of(render(chart).deployment("planner")["spec"]["template"]["spec"][
        "containers"][0])
    assert "MLSYSOPS_STREAM_MAX_BYTES" not in external  # the services' default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_env(container: dict[str, Any], secrets: dict[str, dict[str, str]],
                pod: str = f"{RELEASE}-pod-0") -> dict[str, str]:
    """The environment Kubernetes would give the container, with these Secrets."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)),
                                       item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = pod
    return env


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail(f"nats-server exited: {proc.stderr.read() if proc.stderr else b''!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class LocalNats:
    """The bundled NATS's servers, run here from the rendered configuration."""

    procs: list[subprocess.Popen[bytes]]
    client_ports: list[int]
    monitor_ports: list[int]
    leaf_ports: list[int]

    def url(self, *members: int) -> str:
        chosen = members or range(len(self.procs))
        return ",".join(f"nats://127.0.0.1:{self.client_ports[i]}" for i in chosen)

    def stop(self, index: int) -> None:
        proc = self.procs[index]
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def local_url(self, rendered_url: str) -> str:
        """A URL of the chart (the Service or member names) with each member made local."""
        if "-nats-headless." not in rendered_url:
            return self.url()
        indices = [int(m) for m in re.findall(r"-nats-(\d+)\.", rendered_url)]
        return self.url(*indices)


def meta_cluster_complete(monitor_port: int, servers: int) -> bool:
    """Whether the JetStream meta group has a leader that sees every server online."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/jsz", timeout=2) as r:
            meta = json.load(r).get("meta_cluster") or {}
    except OSError:
        return False
    peers = meta.get("replicas") or []
    return bool(meta.get("leader")) and meta.get("cluster_size") == servers and \
        len(peers) == servers - 1 and all(p.get("current") and not p.get("offline")
                                          for p in peers)


@contextlib.contextmanager
def run_bundled(rendered: Rendered, secrets: dict[str, dict[str, str]], workdir: Path,
                files: dict[str, Path] | None = None) -> Iterator[LocalNats]:
    """Start every server of the rendered StatefulSet as a local nats-server: the rendered
    nats.conf and the container's environment, with only the pod's addresses (its stable
    name in the headless Service, the route and leaf ports) and volumes (the JetStream
    store, the pid file, mounted Secret files in ``files``) mapped to loopback and
    ``workdir``. Waits until every server reports healthy (JetStream current)."""
    server = need_binary("nats-server", str(ROOT / ".venv" / "bin"))
    conf = rendered.get("ConfigMap", f"{FULLNAME}-nats-config")["data"]["nats.conf"]
    statefulset = rendered.get("StatefulSet", f"{FULLNAME}-nats")
    count = statefulset["spec"]["replicas"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    nats_values = rendered.values["nats"]
    route_port, leaf_port = nats_values["cluster"]["port"], nats_values["leafnodes"]["port"]
    clients, monitors, routes, leaves = ([free_port() for _ in range(count)] for _ in range(4))
    for mount, where in (files or {}).items():
        conf = conf.replace(mount, str(where))
    for i in range(count):
        conf = conf.replace(f"nats://{member_host(i)}:{route_port}",
                            f"nats://127.0.0.1:{routes[i]}")
    local = LocalNats([], clients, monitors, leaves)
    try:
        for i in range(count):
            text = conf
            for line, path in (("store_dir: /data", workdir / f"js-{i}"),
                               ("pid_file: /var/run/nats/nats.pid", workdir / f"nats-{i}.pid")):
                assert line in text
                text = text.replace(line, f"{line.split(':')[0]}: {json.dumps(str(path))}")
            for port, mine in ((route_port, routes[i]), (leaf_port, leaves[i])):
                text = text.replace(f"\n  port: {port}\n", f"\n  port: {mine}\n  host: 127.0.0.1\n")
            path = workdir / f"nats-{i}.conf"
            path.write_text(text)
            env = resolve_env(container, secrets, pod=f"{FULLNAME}-nats-{i}")
            check = subprocess.run([server, "-c", str(path), "-t"], env=env,
                                   capture_output=True, text=True, check=False)
            assert check.returncode == 0, check.stderr
            local.procs.append(subprocess.Popen(
                [server, "-c", str(path), "-a", "127.0.0.1", "-p", str(clients[i]),
                 "-m", str(monitors[i])], env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE))
        for i in range(count):
            wait_for_port(clients[i], local.procs[i])
        deadline = time.monotonic() + 45
        while not (all(http_status(f"http://127.0.0.1:{m}/healthz") == 200 for m in monitors)
                   and (count == 1 or any(meta_cluster_complete(m, count) for m in monitors))):
            assert time.monotonic() < deadline, "the NATS servers did not become healthy"
            time.sleep(0.2)
        yield local
    finally:
        for i in range(len(local.procs)):
            local.stop(i)
        for proc in local.procs:
            if proc.stderr:
                proc.stderr.close()


def raw_connect(port: int, options: dict[str, Any]) -> str:
    """One client handshake in the NATS protocol; the server's answer to CONNECT + PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        connect = json.dumps({"verbose": False, "pedantic": False, **options})
        sock.sendall(f"CONNECT {connect}\r\nPING\r\n".encode())
        answer = reader.readline().decode().strip()
        reader.close()
        return answer


async def use_jetstream(url: str, **auth: str) -> int:
    import nats

    nc = await nats.connect(servers=url.split(","), allow_reconnect=False, connect_timeout=5,
                            **auth)
    try:
        info = await nc.jetstream().account_info()
        return int(info.streams)
    finally:
        await nc.close()


@pytest.mark.parametrize(("scenario", "secret"), [
    ("bundled-nats-values.yaml", {"user": "12345", "password": "p@ss word!#$x;{}1"}),
    ("bundled-nats-emptydir-values.yaml", {"token": "4242"}),
])
def test_bundled_nats_accepts_the_services_credentials(
    chart: helm_python.Chart, tmp_path: Path, scenario: str, secret: dict[str, str]
) -> None:
    """Runs the rendered servers (three routed ones, or one) with the container's
    environment (Secret values that look like numbers or carry config syntax included),
    then connects to each with the credentials the services get and uses JetStream."""
    rendered = render(chart, ci_values(scenario))
    auth = rendered.values["nats"]["auth"]
    with run_bundled(rendered, {auth["existingSecret"]: secret}, tmp_path) as servers:
        # what the services get: the raw Secret values, as MLSYSOPS_NATS_* settings
        if auth["type"] == "userPassword":
            creds = {"user": secret[auth["userKey"]], "password": secret[auth["passwordKey"]]}
            wire = {"user": creds["user"], "pass": creds["password"]}
        else:
            creds = {"token": secret[auth["tokenKey"]]}
            wire = {"auth_token": creds["token"]}
        for i, port in enumerate(servers.client_ports):
            assert raw_connect(port, wire) == "PONG"
            assert "Authorization Violation" in raw_connect(port, {"user": "intruder",
                                                                   "pass": "x"})
            assert "Authorization Violation" in raw_connect(port, {})
            assert asyncio.run(use_jetstream(servers.url(i), **creds)) == 0


async def stream_replicas(url: str, **auth: str) -> dict[str, int]:
    """Every stream (buckets included) on the server, with its number of copies."""
    import nats

    nc = await nats.connect(servers=url.split(","), allow_reconnect=False, connect_timeout=5,
                            **auth)
    try:
        js = nc.jetstream()
        out = {}
        for info in await js.streams_info():
            peers = info.cluster.replicas if info.cluster and info.cluster.replicas else []
            assert all(p.current for p in peers), info.config.name
            out[str(info.config.name)] = 1 + len(peers)
        return out
    finally:
        await nc.close()


async def write_to_bucket(url: str, bucket: str, **auth: str) -> int:
    import nats

    nc = await nats.connect(servers=url.split(","), connect_timeout=5, **auth)
    try:
        kv = await nc.jetstream().key_value(bucket)
        return int(await kv.put("probe", b"{}"))
    finally:
        await nc.close()


def run_init_job(rendered: Rendered, secrets: dict[str, dict[str, str]],
                 servers: LocalNats) -> subprocess.CompletedProcess[str]:
    """The rendered init Job's command with its environment, against the local servers."""
    (container,) = rendered.get("Job", f"{FULLNAME}-init")["spec"]["template"]["spec"][
        "containers"]
    env = resolve_env(container, secrets)
    env["MLSYSOPS_NATS_URL"] = servers.local_url(env["MLSYSOPS_NATS_URL"])
    command = [str(ROOT / ".venv" / "bin" / container["args"][0]), *container["args"][1:]]
    return subprocess.run(command, env={**env, "PATH": str(ROOT / ".venv" / "bin")},
                          capture_output=True, text=True, timeout=120, check=False)


def test_bundled_cluster_keeps_r3_streams_through_the_loss_of_a_server(
    chart: helm_python.Chart, tmp_path: Path
) -> None:
    """The rendered cluster forms; the rendered init Job creates every stream and bucket
    on three servers, reports it, finds nothing to change the second time; with one
    server stopped (a drain, as the PDB allows) the streams still take writes."""
    rendered = render(chart, ci_values("bundled-nats-values.yaml"))
    auth = rendered.values["nats"]["auth"]
    secret = {"user": "mlsysops", "password": "s3cret"}
    secrets = {auth["existingSecret"]: secret}
    creds = {"user": "mlsysops", "password": "s3cret"}
    with run_bundled(rendered, secrets, tmp_path) as servers:
        first = run_init_job(rendered, secrets, servers)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "created" in first.stdout and "change(s)" in first.stdout
        copies = asyncio.run(stream_replicas(servers.url(), **creds))
        assert "MLSYSOPS_DESCRIPTIONS" in copies and "KV_mlsysops-desc" in copies
        assert set(copies.values()) == {3}, copies
        again = run_init_job(rendered, secrets, servers)
        assert again.returncode == 0 and "as the settings say" in again.stdout, again.stdout
        servers.stop(0)
        revision = asyncio.run(write_to_bucket(servers.url(1, 2), "mlsysops-desc", **creds))
        assert revision >= 1


# ------------------------------------------------------------------------------ plugins
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_plugins_are_mounted_where_each_service_loads_them(chart: helm_python.Chart,
                                                           scenario: str) -> None:
    values = ci_values(scenario)
    rendered = render(chart, values)
    for component in COMPONENTS:
        kind = "policies" if component in POLICY_USERS else "mechanisms"
        deployment = rendered.deployment(component)
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = env_of(container)
        setting = "MLSYSOPS_POLICY_DIR" if kind == "policies" else "MLSYSOPS_MECHANISM_DIR"
        other = "MLSYSOPS_MECHANISM_DIR" if kind == "policies" else "MLSYSOPS_POLICY_DIR"
        assert other not in env
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == kind]
        assert env[setting]["value"] == mount["mountPath"] == f"/etc/mlsysops/{kind}"
        assert "subPath" not in mount  # a subPath mount would never see updates
        volume = {v["name"]: v for v in pod["volumes"]}[kind]
        sources = [s["configMap"]["name"] for s in volume["projected"]["sources"]]
        extra = values.get("plugins", {}).get(kind, {}).get("existingConfigMaps", [])
        assert sources == [f"{FULLNAME}-{kind}", *extra]
        for name in sources:
            if name.startswith(FULLNAME):
                rendered.get("ConfigMap", name)
        # no checksum annotation: a plugin change must not restart the services
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        assert not any(k.startswith("checksum/") for k in annotations)


def test_plugin_configmaps_hold_shipped_and_extra_files(chart: helm_python.Chart) -> None:
    shipped = {kind: shipped_files(CHART / "files" / kind) for kind in ("policies",
                                                                        "mechanisms")}
    rendered = render(chart)
    for kind, files in shipped.items():
        data = rendered.get("ConfigMap", f"{FULLNAME}-{kind}").get("data") or {}
        assert data == {name: content.decode() for name, content in files.items()}
    replaced = next(iter(shipped["mechanisms"]), "fluidity.py")
    values: dict[str, Any] = {"plugins": {
        "policies": {"extra": {"policy-mine.py": "def initialize():\n    return {}\n"}},
        "mechanisms": {"extra": {replaced: "# site version\n"}},
    }}
    rendered = render(chart, values)
    policies = rendered.get("ConfigMap", f"{FULLNAME}-policies")["data"]
    assert policies["policy-mine.py"] == "def initialize():\n    return {}\n"
    assert set(policies) == {*shipped["policies"], "policy-mine.py"}
    mechanisms = rendered.get("ConfigMap", f"{FULLNAME}-mechanisms")["data"]
    assert mechanisms[replaced] == "# site version\n"  # extra replaces a shipped file
    values["plugins"]["policies"]["shipped"] = False
    policies = render(chart, values).get("ConfigMap", f"{FULLNAME}-policies")["data"]
    assert set(policies) == {"policy-mine.py"}
    left_out = sorted(shipped["policies"])[:1]
    values = {"plugins": {"policies": {"exclude": left_out}}}
    policies = render(chart, values).get("ConfigMap", f"{FULLNAME}-policies").get("data") or {}
    assert set(policies) == set(shipped["policies"]) - set(left_out)


@pytest.mark.parametrize("kind", ["policies", "mechanisms"])
def test_chart_plugin_copies_equal_the_project_plugins(kind: str) -> None:
    project = shipped_files(ROOT / "plugins" / kind)
    chart_copy = shipped_files(CHART / "files" / kind)
    assert sorted(chart_copy) == sorted(project), "run deploy/helm/sync-plugins.sh"
    for name, content in project.items():
        assert chart_copy[name] == content, f"{name} differs: run deploy/helm/sync-plugins.sh"
    subdirs = [p.name for p in (ROOT / "plugins" / kind).glob("*")
               if p.is_dir() and p.name != "__pycache__"] if (ROOT / "plugins" / kind).is_dir() \
        else []
    assert not subdirs, f"plugins/{kind}: subdirectories cannot be shipped in a ConfigMap"


@pytest.mark.parametrize("kind", ["policies", "mechanisms"])
def test_shipped_plugins_fit_in_a_configmap(kind: str) -> None:
    files = shipped_files(CHART / "files" / kind)
    assert sum(len(c) for c in files.values()) < 900 * 1024, "a ConfigMap holds at most 1 MiB"
    for name, content in files.items():
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", name), f"{name}: not a ConfigMap key"
        content.decode()  # ConfigMap data is text


# ------------------------------------------------------------------------------ helm test, NOTES
def test_helm_test_pod_makes_a_real_round_trip(chart: helm_python.Chart) -> None:
    rendered = render(chart)
    pod = rendered.get("Pod", f"{FULLNAME}-test-round-trip")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    planner = rendered.deployment("planner")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == planner["image"]
    service_env = {k: v for k, v in env_of(planner).items() if k.startswith("MLSYSOPS_NATS")}
    assert {k: v for k, v in env_of(container).items() if k.startswith("MLSYSOPS_NATS")} == \
        service_env
    assert container["args"][:2] == ["sh", "-ec"]
    commands = [shlex.split(line) for line in container["args"][2].splitlines()]
    commands = [c for c in commands if c and c[0] == "mlsysops"]
    assert commands == [
        ["mlsysops", "publish", "cluster", "/app/examples/cluster.yaml"],
        ["mlsysops", "publish", "node", "/app/examples/node-a.yaml"],
        ["mlsysops", "publish", "node", "/app/examples/node-b.yaml"],
        ["mlsysops", "publish", "app", "/app/examples/app.yaml"],
        ["mlsysops", "plans", "--app", "demo-app", "--wait", "120"],
    ]
    assert "mlsysops delete app" in container["args"][2]  # cleanup trap
    assert spec["activeDeadlineSeconds"] > 120
    assert render(chart, {"tests": {"enabled": False}}).of_kind("Pod") == []


def test_helm_test_uses_what_the_image_and_the_cli_provide() -> None:
    """The test pod's files are the project's examples copied to /app/examples by the
    Dockerfile, its kinds are the CLI's, and the app it waits for is the example's."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["tests"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY examples/ /app/examples/$", dockerfile, re.M)
    for description in defaults["descriptions"]:
        relative = description["file"].removeprefix("/app/")
        assert (ROOT / relative).is_file(), f"{relative} is not in the project"
    app = yaml.safe_load((ROOT / "examples" / "app.yaml").read_text())
    assert app["MLSysOpsApp"]["name"] == defaults["app"]
    from mlsysops import cli

    assert {d["kind"] for d in defaults["descriptions"]} <= set(cli.NAME_FIELDS)


def test_notes_tell_the_operator_how_to_publish(chart: helm_python.Chart) -> None:
    notes = render(chart).notes
    assert f"helm test {RELEASE}" in notes
    assert "mlsysops publish app" in notes
    assert "mlsysops plans --app" in notes
    assert f"deploy/{FULLNAME}-planner" in notes


# ------------------------------------------------------------------------------ the image
def test_dockerfile_builds_one_small_non_root_image_of_the_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", dockerfile, re.M)
    assert len(stages) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert re.search(r"^COPY plugins/ /app/plugins/$", dockerfile, re.M)
    assert 'CMD ["mlsysops", "--help"]' in dockerfile
    assert "MLSYSOPS_POLICY_DIR=/app/plugins/policies" in dockerfile
    assert "MLSYSOPS_MECHANISM_DIR=/app/plugins/mechanisms" in dockerfile
    # the user id the chart's securityContext expects
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    context = values["podSecurityContext"]
    assert user[-1] == f"{context['runAsUser']}:{context['runAsGroup']}"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("mlsysops", "services", "plugins", "examples", "pyproject.toml"):
        assert needed not in ignored
    assert {".git", ".venv", "tests"} <= ignored


def test_chart_commands_are_the_package_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {f"mlsysops-{c}" for c in COMPONENTS} | {"mlsysops"} <= set(scripts)
