"""Fluidity: runs the components of MLSysOps applications on Kubernetes nodes.

Each instance of a component is a Deployment pinned to one node (``nodeSelector``
``kubernetes.io/hostname``); a component whose containers declare ports also gets one
Service that selects its instances on every node. Everything Fluidity creates carries
the labels ``app.kubernetes.io/managed-by: mlsysops-fluidity``, ``mlsysops.eu/app``,
``mlsysops.eu/component`` (and ``mlsysops.eu/host`` on Deployments, ``mlsysops.eu/plan-id``
when the command names its plan).

Command (one per plan and application, as the example policies produce it)::

    {"name": "<app>",
     "deployment_plan": {
         "<component>": [<action>, ...],   # applied in order, components in order
         "initial_plan": true | false},    # informative only
     "plan_id": "<id>"}                    # optional ("_plan_id" also accepted)

    {"action": "deploy", "host": "<node>"}
    {"action": "remove", "host": "<node>"}
    {"action": "move", "src_host": "<node>", "target_host": "<node>"}
    {"action": "change_spec", "new_spec": {<component>}, "host": "<node>"}  # no host: all
    {"action": "scale", "replicas": <n>, "host": "<node>"}                  # no host: all

    {"name": "<app>", "remove_app": true}  # delete everything Fluidity made for <app>

A command without component entries (``{"deployment_plan": {}}``, or only
``initial_plan``) does nothing and succeeds.

Semantics:

- ``deploy`` makes the instance on ``host`` run the component as the application
  description says (created if missing, patched in place if it differs, else untouched).
- ``move`` creates the instance on ``target_host`` (with the spec the source instance runs)
  before deleting the one on ``src_host``; if the source is already gone it only makes
  sure the target exists.
- ``change_spec`` patches the pod template of existing instances (a rolling update; the
  Deployment is never deleted and recreated).
- The actions are played in order on the application's current instances, and only the
  difference to the cluster is sent: creations and patches first, deletions last. So
  every command is idempotent (applied again, it sends nothing).
- The whole command is checked (application, components, hosts, action fields, the
  Kubernetes manifests they render to, and the instances the actions need) before
  anything is changed. If a Kubernetes call fails midway, the error says which steps
  were already done.

Settings: ``MLSYSOPS_KUBE_API_URL`` (an explicit API URL; empty: in-cluster config, else
kubeconfig), ``MLSYSOPS_FLUIDITY_NAMESPACE`` (default ``default``),
``MLSYSOPS_FLUIDITY_REQUEST_TIMEOUT`` (seconds per API call, default 10).

``apply`` and ``get_status`` are blocking functions: the executor runs them in a worker
thread. Nothing contacts the API before the first call.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from mlsysops.plugin_api import MechanismError, descriptions, get_logger, setting

logger = get_logger("fluidity")

ACTIONS = ("deploy", "remove", "move", "change_spec", "scale")

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "mlsysops-fluidity"
APP = "mlsysops.eu/app"
COMPONENT = "mlsysops.eu/component"
HOST = "mlsysops.eu/host"
PLAN = "mlsysops.eu/plan-id"
SPEC_HASH = "mlsysops.eu/spec-hash"
COMPONENT_SPEC = "mlsysops.eu/component-spec"
HOSTNAME = "kubernetes.io/hostname"


# --------------------------------------------------------------------------- plugin API
def apply(command: dict[str, Any]) -> dict[str, Any]:
    """Apply one Fluidity command (see the module docstring); returns what was done."""
    request = _parse(command)
    if request is None:
        return {"changed": False, "steps": []}
    if request.remove_app:
        kube = _kube()
        ops = _plan_app_removal(kube, request.app)
    else:
        components = _check_descriptions(request)
        if not request.actions:
            return {"app": request.app, "changed": False, "steps": []}
        kube = _kube()
        planner = _Planner(kube, request, components)
        planner.load()
        ops = planner.run()
    steps = _execute(kube, ops)
    if steps:
        logger.info("fluidity applied", app=request.app, steps=steps)
    return {"app": request.app, "changed": bool(steps), "steps": steps}


def get_status() -> dict[str, Any]:
    """Instances per application and component: host, replicas, readiness.

    ``ready_replicas`` and ``ready`` are None while Kubernetes has reported no status.
    """
    kube = _kube()
    apps: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for dep in kube.list("Deployment", f"{MANAGED_BY}={MANAGER}"):
        meta = dep.get("metadata", {})
        notes = meta.get("annotations") or {}
        if (meta.get("labels") or {}).get(MANAGED_BY) != MANAGER or APP not in notes:
            continue
        replicas = dep.get("spec", {}).get("replicas", 1)
        status = dep.get("status") or {}
        ready: int | None = status.get("readyReplicas", 0) if status else None
        apps.setdefault(notes[APP], {}).setdefault(notes.get(COMPONENT, ""), []).append(
            {
                "host": notes.get(HOST, ""),
                "deployment": meta.get("name", ""),
                "replicas": replicas,
                "ready_replicas": ready,
                "ready": None if ready is None else ready >= replicas,
            }
        )
    for components in apps.values():
        for instances in components.values():
            instances.sort(key=lambda i: i["host"])
    return {"namespace": kube.namespace, "applications": apps}


def get_options() -> dict[str, Any]:
    """The actions a command may contain and the nodes it may name."""
    return {
        "actions": list(ACTIONS),
        "application_commands": ["remove_app"],
        "nodes": descriptions.known_nodes(),
        "namespace": setting("fluidity_namespace", "default"),
    }


def conflict_key(command: Any) -> list[str] | str:
    """What a command claims: ``<app>/<component>`` for each component it changes.

    So plans for different components of one application (say, static placement's and
    relocation's first plans) do not conflict, and one plan for a component holds back
    the others until its execution ends. ``remove_app`` claims ``<app>``; a command with
    no component entries claims nothing; a command without a usable name claims the
    whole mechanism (``""``: it fails in ``apply`` with the reason).
    """
    name = command.get("name") if isinstance(command, dict) else None
    if not isinstance(name, str) or not name:
        return ""
    if command.get("remove_app"):
        return [name]
    plan = command.get("deployment_plan")
    if not isinstance(plan, dict):
        return [name]
    return [f"{name}/{component}" for component in plan if component != "initial_plan"]


# --------------------------------------------------------------------------- names
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _digest(text: str, size: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def dns_name(*parts: str, letter_first: bool = False) -> str:
    """A DNS-1123 label (DNS-1035 with ``letter_first``) made of ``parts``.

    Names that are valid as they are stay readable (``demo-app-server-app-node-a``);
    anything shortened or altered ends with a digest of the original, so that two
    different inputs never share a name.
    """
    raw = "-".join(parts)
    name = re.sub("-{2,}", "-", _NOT_DNS.sub("-", raw.lower())).strip("-")
    if letter_first and not name[:1].isalpha():
        name = "x-" + name
    if name == raw and len(name) <= 63:
        return name
    name = f"{name[:53].rstrip('-')}-{_digest(raw)}".lstrip("-")
    return name if not letter_first or name[:1].isalpha() else "x" + name


def label_value(text: str) -> str:
    """``text`` as a label value (63 characters at most), with a digest if it had to change."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:54].strip("-_.")
    return f"{cleaned}-{_digest(text)}" if cleaned else _digest(text)


def _hash(obj: Any) -> str:
    return _digest(json.dumps(obj, sort_keys=True, separators=(",", ":")), 16)


# --------------------------------------------------------------------------- parsing
class _Problem(Exception):
    """One thing wrong with a command; all of them are reported together."""


@dataclass
class _Action:
    kind: str
    component: str
    where: str
    host: str | None = None
    src: str | None = None
    target: str | None = None
    new_spec: dict[str, Any] | None = None
    replicas: int | None = None


@dataclass
class _Request:
    app: str
    plan_id: str = ""
    actions: list[_Action] = field(default_factory=list)
    remove_app: bool = False


def _parse(command: Any) -> _Request | None:
    """The command checked for shape (not yet against descriptions); None for a no-op."""
    if not isinstance(command, dict):
        raise MechanismError(f"a Fluidity command is a dict, got {type(command).__name__}")
    name = command.get("name")
    plan = command.get("deployment_plan")
    plan_id = command.get("_plan_id") or command.get("plan_id") or ""
    if not isinstance(plan_id, str):
        plan_id = str(plan_id)
    if plan is not None and not isinstance(plan, dict):
        raise MechanismError(f"deployment_plan must be a dict, got {type(plan).__name__}")
    entries = {k: v for k, v in (plan or {}).items() if k != "initial_plan"}

    remove_app = command.get("remove_app", False)
    if remove_app is not False:
        if remove_app is not True:
            raise MechanismError(f"remove_app must be true or false, got {remove_app!r}")
        if not isinstance(name, str) or not name:
            raise MechanismError("remove_app needs the application 'name'")
        if entries:
            raise MechanismError("remove_app cannot be combined with deployment_plan actions")
        return _Request(app=name, plan_id=plan_id, remove_app=True)

    if not entries:
        return None
    if not isinstance(name, str) or not name:
        raise MechanismError(f"a deployment_plan needs the application 'name', got {name!r}")

    actions: list[_Action] = []
    problems: list[str] = []
    for component, items in entries.items():
        where = f"deployment_plan[{component!r}]"
        if not isinstance(items, list):
            problems.append(f"{where} must be a list of actions, got {type(items).__name__}")
            continue
        for i, item in enumerate(items):
            try:
                actions.append(_parse_action(str(component), item, f"{where}[{i}]"))
            except _Problem as exc:
                problems.append(str(exc))
    if problems:
        raise MechanismError(f"malformed command for application {name!r}: " + "; ".join(problems))
    return _Request(app=name, plan_id=plan_id, actions=actions)


def _parse_action(component: str, item: Any, where: str) -> _Action:
    if not isinstance(item, dict):
        raise _Problem(f"{where} must be an action dict like {{'action': 'deploy', ...}}: {item!r}")
    kind = item.get("action")
    if kind not in ACTIONS:
        raise _Problem(f"{where}: unknown action {kind!r} (known: {', '.join(ACTIONS)})")

    def node(key: str, *, required: bool = True) -> str | None:
        value = item.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise _Problem(f"{where}: {kind} needs {key!r} naming a node, got {value!r}")
        return value

    action = _Action(kind=kind, component=component, where=where)
    if kind in ("deploy", "remove"):
        action.host = node("host")
    elif kind == "move":
        action.src, action.target = node("src_host"), node("target_host")
        if action.src == action.target:
            raise _Problem(f"{where}: move from {action.src!r} to the same host")
    elif kind == "change_spec":
        action.host = node("host", required=False)
        spec = item.get("new_spec")
        if not isinstance(spec, dict):
            raise _Problem(f"{where}: change_spec needs 'new_spec', a component dict, got {spec!r}")
        spec_name = (spec.get("metadata") or {}).get("name", component)
        if spec_name != component:
            raise _Problem(f"{where}: new_spec is for {spec_name!r}, not {component!r}")
        action.new_spec = spec
    else:  # scale
        action.host = node("host", required=False)
        replicas = item.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _Problem(f"{where}: scale needs 'replicas', an integer >= 0, got {replicas!r}")
        action.replicas = replicas
    return action


# --------------------------------------------------------------------------- manifests
def _pod_template(app: str, component: str, spec: dict[str, Any], host: str) -> dict[str, Any]:
    """The pod template of ``component`` on ``host``; raises _Problem naming a bad field."""
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise _Problem(f"component {component!r} has no containers")
    pod: dict[str, Any] = {
        "nodeSelector": {HOSTNAME: host},
        "containers": [
            _container(component, i, c, len(containers)) for i, c in enumerate(containers)
        ],
    }
    if spec.get("runtime_class_name"):
        pod["runtimeClassName"] = str(spec["runtime_class_name"])
    if spec.get("host_network"):
        pod["hostNetwork"] = True
    restart = spec.get("restart_policy")
    if restart == "Always":
        pod["restartPolicy"] = "Always"
    elif restart is not None:  # Deployments accept only Always, which is also the default
        logger.warning(
            "restart_policy ignored: a Deployment restarts always",
            component=component,
            restart_policy=restart,
        )
    return {"metadata": {"labels": _selector(app, component, host)}, "spec": pod}


def _container(component: str, index: int, spec: Any, count: int) -> dict[str, Any]:
    where = f"component {component!r} container {index}"
    if not isinstance(spec, dict) or not isinstance(spec.get("image"), str) or not spec["image"]:
        raise _Problem(f"{where} needs an 'image'")
    name = component if count == 1 else f"{component}-{index}"
    out: dict[str, Any] = {"name": dns_name(name), "image": spec["image"]}
    for key, target in (("command", "command"), ("args", "args")):
        if key in spec:
            value = spec[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _Problem(f"{where}: {key} must be a list of strings")
            out[target] = value
    if spec.get("image_pull_policy"):
        out["imagePullPolicy"] = str(spec["image_pull_policy"])
    for key in ("env", "ports"):
        if spec.get(key) and not isinstance(spec[key], list):
            raise _Problem(f"{where}: {key} must be a list")
    if spec.get("env"):
        out["env"] = [_env(where, e) for e in spec["env"]]
    if spec.get("ports"):
        out["ports"] = [_port(where, p) for p in spec["ports"]]
    resources = _resources(spec.get("platform_requirements") or {})
    if resources:
        out["resources"] = resources
    return out


def _env(where: str, env: Any) -> dict[str, Any]:
    if not isinstance(env, dict) or not isinstance(env.get("name"), str) or not env["name"]:
        raise _Problem(f"{where}: env entry without a name: {env!r}")
    if "value_from" in env:
        path = ((env["value_from"] or {}).get("field_ref") or {}).get("field_path")
        if not isinstance(path, str) or not path:
            raise _Problem(
                f"{where}: env {env['name']!r}: only value_from.field_ref.field_path is supported"
            )
        return {"name": env["name"], "valueFrom": {"fieldRef": {"fieldPath": path}}}
    value = env.get("value", "")
    return {"name": env["name"], "value": value if isinstance(value, str) else json.dumps(value)}


def _port(where: str, port: Any) -> dict[str, Any]:
    number = port.get("container_port") if isinstance(port, dict) else None
    if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
        raise _Problem(f"{where}: port needs a container_port between 1 and 65535: {port!r}")
    out: dict[str, Any] = {"containerPort": number, "protocol": port.get("protocol") or "TCP"}
    for key, target in (("name", "name"), ("host_port", "hostPort"), ("host_ip", "hostIP")):
        if port.get(key) is not None:
            out[target] = port[key]
    return out


def _resources(requirements: dict[str, Any]) -> dict[str, Any]:
    """cpu/memory requests and limits; empty strings (unset) are left out."""
    out: dict[str, dict[str, str]] = {}
    for resource in ("cpu", "memory"):
        entry = requirements.get(resource)
        if not isinstance(entry, dict):
            continue
        for kind in ("requests", "limits"):
            value = entry.get(kind)
            if value not in (None, ""):
                out.setdefault(kind, {})[resource] = str(value)
    return out


def _selector(app: str, component: str, host: str | None = None) -> dict[str, str]:
    labels = {APP: label_value(app), COMPONENT: label_value(component)}
    if host is not None:
        labels[HOST] = label_value(host)
    return labels


def _meta_labels(app: str, component: str, host: str | None, plan_id: str) -> dict[str, str]:
    labels = {MANAGED_BY: MANAGER, **_selector(app, component, host)}
    if plan_id:
        labels[PLAN] = label_value(plan_id)
    return labels


def _notes(app: str, component: str, host: str | None = None, **extra: str) -> dict[str, str]:
    notes = {APP: app, COMPONENT: component, **extra}
    if host is not None:
        notes[HOST] = host
    return notes


def _service_ports(template: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    for container in template["spec"]["containers"]:
        for port in container.get("ports", []):
            number, protocol = port["containerPort"], port["protocol"]
            seen.setdefault(
                (number, protocol),
                {
                    "name": f"p{number}-{str(protocol).lower()}",
                    "port": number,
                    "targetPort": number,
                    "protocol": protocol,
                },
            )
    return [seen[k] for k in sorted(seen)]


# --------------------------------------------------------------------------- planning
@dataclass
class _Instance:
    """One Deployment of a component on a host: as it is, or as the command wants it."""

    name: str
    spec: dict[str, Any]
    spec_hash: str
    replicas: int
    template: dict[str, Any] | None = None  # rendered when (re)placed by this command
    labels: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class _Op:
    verb: str  # create | patch | delete
    kind: str  # Deployment | Service
    name: str
    body: Any = None

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.name}"


class _Planner:
    """Turns the actions of a request into Kubernetes operations, changing nothing.

    The actions are played in order on an in-memory copy of the application's instances;
    the operations are then the difference between that end state and the cluster:
    creations and patches first, deletions last (so a move never leaves a gap), and
    nothing at all when the cluster already is in the end state.
    """

    def __init__(self, kube: _Kube, request: _Request, components: dict[str, dict[str, Any]]):
        self.kube, self.req, self.app = kube, request, request.app
        self.components = components
        self.known_nodes = set(descriptions.known_nodes())
        self.current: dict[tuple[str, str], _Instance] = {}
        self.instances: dict[tuple[str, str], _Instance] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []

    def load(self) -> None:
        for dep in _owned(self.kube.list("Deployment", _app_selector(self.app)), self.app):
            meta = dep["metadata"]
            notes = meta.get("annotations") or {}
            try:
                spec = json.loads(notes.get(COMPONENT_SPEC, "{}"))
            except ValueError:
                spec = {}
            self.current[(notes.get(COMPONENT, ""), notes.get(HOST, ""))] = _Instance(
                name=meta["name"],
                spec=spec,
                spec_hash=notes.get(SPEC_HASH, ""),
                replicas=dep.get("spec", {}).get("replicas", 1),
                labels=dict(meta.get("labels") or {}),
                notes=dict(notes),
            )
        self.instances = {key: copy.copy(inst) for key, inst in self.current.items()}
        for svc in _owned(self.kube.list("Service", _app_selector(self.app)), self.app):
            self.services[svc["metadata"]["name"]] = svc

    # -- checks ----------------------------------------------------------------------
    def known_host(self, action: _Action, host: str, *, or_hosting: bool = False) -> bool:
        if host in self.known_nodes:
            return True
        if or_hosting and (action.component, host) in self.instances:
            return True  # a node gone from the description may still be emptied
        known = ", ".join(sorted(self.known_nodes)) or "none"
        self.problems.append(
            f"{action.where}: host {host!r} is not a node of the cluster (known nodes: {known})"
        )
        return False

    def hosts_of(self, component: str) -> list[str]:
        return sorted(h for (c, h) in self.instances if c == component)

    def targets(self, a: _Action) -> list[str]:
        """Hosts an action on existing instances applies to (its host, else all)."""
        if a.host is None:
            hosts = self.hosts_of(a.component)
            if not hosts:
                self.problems.append(f"{a.where}: component {a.component!r} runs on no host")
            return hosts
        if not self.known_host(a, a.host, or_hosting=True):
            return []
        if (a.component, a.host) not in self.instances:
            self.problems.append(
                f"{a.where}: component {a.component!r} has no instance on host {a.host!r} "
                f"to {a.kind} (it runs on: {', '.join(self.hosts_of(a.component)) or 'no host'})"
            )
            return []
        return [a.host]

    # -- actions, on the in-memory state ---------------------------------------------
    def run(self) -> list[_Op]:
        touched: list[str] = []
        for action in self.req.actions:
            if action.component not in touched:
                touched.append(action.component)
            getattr(self, "do_" + action.kind)(action)
        ops = self.deployment_ops()
        services = [op for c in touched if (op := self.service_op(c)) is not None]
        ops = (
            [op for op in ops if op.verb != "delete"]
            + [op for op in services if op.verb != "delete"]
            + [op for op in ops if op.verb == "delete"]
            + [op for op in services if op.verb == "delete"]
        )
        if self.problems:
            raise MechanismError(
                f"command for application {self.app!r} refused, nothing was changed: "
                + "; ".join(self.problems)
            )
        return ops

    def do_deploy(self, a: _Action) -> None:
        assert a.host is not None
        if self.known_host(a, a.host):
            self.place(a, a.host, self.components[a.component])

    def do_remove(self, a: _Action) -> None:
        assert a.host is not None
        if self.known_host(a, a.host, or_hosting=True):
            self.instances.pop((a.component, a.host), None)

    def do_move(self, a: _Action) -> None:
        assert a.src is not None and a.target is not None
        src_ok = self.known_host(a, a.src, or_hosting=True)
        if not (self.known_host(a, a.target) and src_ok):
            return
        source = self.instances.pop((a.component, a.src), None)
        if (a.component, a.target) not in self.instances:
            spec = source.spec if source and source.spec else self.components[a.component]
            self.place(a, a.target, spec, replicas=source.replicas if source else None)

    def do_change_spec(self, a: _Action) -> None:
        assert a.new_spec is not None
        spec = copy.deepcopy(a.new_spec)
        spec.setdefault("metadata", {})["name"] = a.component
        for host in self.targets(a):
            self.place(a, host, spec)

    def do_scale(self, a: _Action) -> None:
        assert a.replicas is not None
        for host in self.targets(a):
            self.instances[(a.component, host)].replicas = a.replicas

    def place(
        self, a: _Action, host: str, spec: dict[str, Any], replicas: int | None = None
    ) -> None:
        """The instance of ``a.component`` on ``host`` is to run ``spec``."""
        try:
            template = _pod_template(self.app, a.component, spec, host)
        except _Problem as exc:
            self.problems.append(f"{a.where}: {exc}")
            return
        spec_hash = _hash(template)
        inst = self.instances.get((a.component, host))
        if inst is None:
            name = dns_name(self.app, a.component, host)
            inst = self.instances[(a.component, host)] = _Instance(name, spec, "", 1)
        if inst.spec_hash != spec_hash:
            inst.spec, inst.spec_hash, inst.template = spec, spec_hash, template
        if replicas is not None:
            inst.replicas = replicas

    # -- operations: the difference to the cluster ------------------------------------
    def deployment_ops(self) -> list[_Op]:
        ops = []
        for (component, host), inst in self.instances.items():
            before = self.current.get((component, host))
            if before is not None and (before.spec_hash, before.replicas) == (
                inst.spec_hash,
                inst.replicas,
            ):
                continue
            labels = {**inst.labels, **_meta_labels(self.app, component, host, self.req.plan_id)}
            notes = {**inst.notes, **_notes(self.app, component, host)}
            notes[SPEC_HASH] = inst.spec_hash
            notes[COMPONENT_SPEC] = json.dumps(inst.spec, sort_keys=True)
            if before is None:
                body = {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {
                        "name": inst.name,
                        "namespace": self.kube.namespace,
                        "labels": labels,
                        "annotations": notes,
                    },
                    "spec": {
                        "replicas": inst.replicas,
                        "selector": {"matchLabels": _selector(self.app, component, host)},
                        "template": inst.template,
                    },
                }
                ops.append(_Op("create", "Deployment", inst.name, body))
                continue
            patch = [_add("/metadata/labels", labels)]
            if before.spec_hash != inst.spec_hash:
                patch.append(_add("/metadata/annotations", notes))
                patch.append(_add("/spec/template", inst.template))
            if before.replicas != inst.replicas:
                patch.append(_add("/spec/replicas", inst.replicas))
            ops.append(_Op("patch", "Deployment", inst.name, patch))
        ops += [
            _Op("delete", "Deployment", inst.name)
            for key, inst in self.current.items()
            if key not in self.instances
        ]
        return ops

    def service_op(self, component: str) -> _Op | None:
        """One Service per component with ports, selecting its instances on every host."""
        name = dns_name(self.app, component, letter_first=True)
        ports: dict[tuple[int, str], dict[str, Any]] = {}
        for host in self.hosts_of(component):
            inst = self.instances[(component, host)]
            template = inst.template
            if template is None:
                try:
                    template = _pod_template(self.app, component, inst.spec, host)
                except _Problem:
                    continue  # an instance whose recorded spec is unreadable adds no port
            for port in _service_ports(template):
                ports.setdefault((port["port"], port["protocol"]), port)
        existing = self.services.get(name)
        if not ports:
            return None if existing is None else _Op("delete", "Service", name)
        spec = {
            "selector": _selector(self.app, component),
            "ports": [ports[k] for k in sorted(ports)],
        }
        spec_hash = _hash(spec)
        if existing is None:
            body = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": name,
                    "namespace": self.kube.namespace,
                    "labels": _meta_labels(self.app, component, None, self.req.plan_id),
                    "annotations": _notes(self.app, component, **{SPEC_HASH: spec_hash}),
                },
                "spec": spec,
            }
            return _Op("create", "Service", name, body)
        meta = existing["metadata"]
        notes = meta.get("annotations") or {}
        if notes.get(SPEC_HASH) == spec_hash:
            return None
        labels = _meta_labels(self.app, component, None, self.req.plan_id)
        labels = {**(meta.get("labels") or {}), **labels}
        return _Op("patch", "Service", name, [
            _add("/metadata/labels", labels),
            _add("/metadata/annotations", {**notes, SPEC_HASH: spec_hash}),
            _add("/spec/selector", spec["selector"]),
            _add("/spec/ports", spec["ports"]),
        ])


def _add(path: str, value: Any) -> dict[str, Any]:
    """A JSON-patch operation that sets ``path`` (``add`` replaces an existing member)."""
    return {"op": "add", "path": path, "value": value}


def _app_selector(app: str) -> str:
    return f"{MANAGED_BY}={MANAGER},{APP}={label_value(app)}"


def _owned(items: list[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    """Objects Fluidity made for ``app`` (labels may be shortened: check the annotation)."""
    out = []
    for item in items:
        meta = item.get("metadata") or {}
        if (meta.get("labels") or {}).get(MANAGED_BY) != MANAGER:
            continue
        if (meta.get("annotations") or {}).get(APP) == app:
            out.append(item)
    return out


def _check_descriptions(request: _Request) -> dict[str, dict[str, Any]]:
    """The components of the request's application; refuses an unknown app or component."""
    doc = descriptions.app(request.app)
    if doc is None:
        known = ", ".join(descriptions.apps()) or "none"
        raise MechanismError(
            f"unknown application {request.app!r}: no accepted description (known: {known}); "
            "nothing was changed"
        )
    components: dict[str, dict[str, Any]] = {}
    for comp in doc["spec"].get("components") or []:
        if isinstance(comp, dict) and (comp.get("metadata") or {}).get("name"):
            components[str(comp["metadata"]["name"])] = comp
    unknown = sorted({a.component for a in request.actions} - set(components))
    if unknown:
        raise MechanismError(
            f"unknown component(s) {', '.join(map(repr, unknown))} of application "
            f"{request.app!r} (its components: {', '.join(components) or 'none'}); "
            "nothing was changed"
        )
    return components


def _plan_app_removal(kube: _Kube, app: str) -> list[_Op]:
    ops = [
        _Op("delete", "Deployment", d["metadata"]["name"])
        for d in _owned(kube.list("Deployment", _app_selector(app)), app)
    ]
    ops += [
        _Op("delete", "Service", s["metadata"]["name"])
        for s in _owned(kube.list("Service", _app_selector(app)), app)
    ]
    return ops


def _execute(kube: _Kube, ops: list[_Op]) -> list[str]:
    done: list[str] = []
    for op in ops:
        try:
            kube.run(op)
        except MechanismError as exc:
            raise MechanismError(_failure(op, str(exc), done)) from None
        except ApiException as exc:
            raise MechanismError(_failure(op, _reason(exc), done)) from None
        except Exception as exc:  # connection refused, timeouts, ...
            raise MechanismError(_failure(op, f"{type(exc).__name__}: {exc}", done)) from None
        done.append(str(op))
    return done


def _failure(op: _Op, why: str, done: list[str]) -> str:
    after = f"already done: {', '.join(done)}" if done else "nothing was changed"
    return f"{op} failed: {why}; {after}"


def _reason(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return f"HTTP {exc.status} {exc.reason or ''}: {message}".strip(": ")


# --------------------------------------------------------------------------- Kubernetes
class _Kube:
    """The Kubernetes API with plain dicts in and out (raw JSON, no client models)."""

    def __init__(self, url: str) -> None:
        self.url = url
        cfg = k8s.Configuration()
        if url:
            cfg.host = url.rstrip("/")
        else:
            try:
                k8s_config.load_incluster_config(client_configuration=cfg)
            except k8s_config.ConfigException:
                try:
                    k8s_config.load_kube_config(client_configuration=cfg)
                except Exception as exc:
                    raise MechanismError(
                        "no Kubernetes API: not running in a cluster, no usable kubeconfig "
                        f"({exc}), and MLSYSOPS_KUBE_API_URL is not set"
                    ) from None
        self.api = k8s.ApiClient(cfg)
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)

    @property
    def namespace(self) -> str:
        return setting("fluidity_namespace", "default")

    @property
    def timeout(self) -> float:
        try:
            return float(setting("fluidity_request_timeout", "10"))
        except ValueError:
            return 10.0

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        response = method(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        return json.loads(response.data or b"null")

    def _methods(self, kind: str) -> tuple[Any, str]:
        return (self.apps, "deployment") if kind == "Deployment" else (self.core, "service")

    def list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        api, noun = self._methods(kind)
        try:
            result = self._call(
                getattr(api, f"list_namespaced_{noun}"), self.namespace, label_selector=selector
            )
        except ApiException as exc:
            why = _reason(exc)
        except Exception as exc:  # connection refused, timeouts, ...
            why = f"{type(exc).__name__}: {exc}"
        else:
            return list((result or {}).get("items") or [])
        raise MechanismError(
            f"listing {kind}s in namespace {self.namespace!r} failed: {why}; nothing was changed"
        )

    def read(self, kind: str, name: str) -> dict[str, Any]:
        api, noun = self._methods(kind)
        return self._call(getattr(api, f"read_namespaced_{noun}"), name, self.namespace)

    def run(self, op: _Op) -> None:
        api, noun = self._methods(op.kind)
        ns = self.namespace
        if op.verb == "delete":
            try:
                self._call(
                    getattr(api, f"delete_namespaced_{noun}"), op.name, ns,
                    body={"propagationPolicy": "Background"},
                )
            except ApiException as exc:
                if exc.status != 404:  # already gone is what we wanted
                    raise
        elif op.verb == "patch":
            self._call(getattr(api, f"patch_namespaced_{noun}"), op.name, ns, op.body)
        else:
            try:
                self._call(getattr(api, f"create_namespaced_{noun}"), ns, op.body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self._adopt(op)

    def _adopt(self, op: _Op) -> None:
        """A create met an existing object: take it over if it is ours, else refuse."""
        existing = self.read(op.kind, op.name)
        ours = op.body["metadata"]["annotations"]
        theirs = (existing.get("metadata") or {}).get("annotations") or {}
        keys = (APP, COMPONENT, HOST)
        if any(theirs.get(k) != ours.get(k) for k in keys):
            owner = "/".join(str(theirs.get(k, "?")) for k in keys if k in theirs or k in ours)
            raise MechanismError(
                f"{op.kind} {op.name} already exists and does not belong to this component "
                f"(it belongs to {owner or 'something not made by Fluidity'})"
            )
        if theirs.get(SPEC_HASH) == ours.get(SPEC_HASH):
            return
        meta, spec = op.body["metadata"], dict(op.body["spec"])
        if op.kind == "Deployment":
            spec.pop("selector")  # immutable, and equal anyway for the same component and host
        patch = [_add("/metadata/labels", meta["labels"]), _add("/metadata/annotations", ours)]
        patch += [_add(f"/spec/{key}", value) for key, value in spec.items()]
        self.run(_Op("patch", op.kind, op.name, patch))

    def close(self) -> None:
        self.api.close()


_lock = threading.Lock()
_client: _Kube | None = None


def _kube() -> _Kube:
    """The API client for the current settings, built on first use (and rebuilt if the
    configured URL changes)."""
    global _client
    url = setting("kube_api_url")
    with _lock:
        if _client is None or _client.url != url:
            if _client is not None:
                _client.close()
                _client = None
            _client = _Kube(url)
        return _client


def _reset_client() -> None:
    """Close the API client (tests, or a reconfiguration); the next call builds a new one."""
    global _client
    with _lock:
        if _client is not None:
            _client.close()
            _client = None
