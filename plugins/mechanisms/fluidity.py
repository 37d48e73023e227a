"""Fluidity: runs the components of MLSysOps applications on Kubernetes nodes.

It is written as a Kubernetes controller would be: it keeps a cache of what it owns
(listed once, then kept current by a watch), sends the whole desired state of each object
by server-side apply (field manager ``mlsysops-fluidity``), and never touches an object it
did not make.

Each instance of a component is a Deployment pinned to one node (``nodeSelector``
``kubernetes.io/hostname``); a component whose containers declare ports also gets one
Service that selects its instances on every node. Everything Fluidity creates carries
the labels ``app.kubernetes.io/managed-by: mlsysops``, ``mlsysops.eu/app``,
``mlsysops.eu/component`` (and ``mlsysops.eu/host`` on Deployments, ``mlsysops.eu/plan-id``
when the command names its plan). Objects labelled by earlier versions
(``managed-by: mlsysops-fluidity``) are still recognised and relabelled when next applied.

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
  description says (created if missing, applied again if it differs, else untouched).
- ``move`` is make-before-break: it creates the instance on ``target_host`` (with the spec
  the source instance runs), waits until that Deployment reports all its replicas ready
  (at most ``MLSYSOPS_FLUIDITY_READY_TIMEOUT`` seconds), and only then deletes the one on
  ``src_host``. If the new instance is not ready in time it is removed again, the old one
  keeps running, and the apply fails saying so.
- ``change_spec`` applies a new pod template to existing instances (a rolling update; the
  Deployment is never deleted and recreated).
- Before a ``deploy`` or ``move`` creates an instance on a node, the node must be
  eligible (as upstream Fluidity's ``validate_host``): it exists, is Ready, matches the
  component's node requirements, and has room for the component's requests.
- The actions are played in order on the application's current instances, and only the
  objects that differ from the cluster are applied: applies first, deletions last. So
  every command is idempotent (applied again, it sends nothing).
- The whole command is checked (application, components, hosts, action fields, the
  manifests they render to, the nodes it places on, and the names it creates) before
  anything is changed. If a Kubernetes call fails midway, the error says which steps
  were already done.

Settings: ``MLSYSOPS_KUBE_API_URL`` (an explicit API URL; empty: in-cluster config, else
kubeconfig), ``MLSYSOPS_FLUIDITY_NAMESPACE`` (default ``default``),
``MLSYSOPS_FLUIDITY_REQUEST_TIMEOUT`` (seconds per API call, default 10),
``MLSYSOPS_FLUIDITY_READY_TIMEOUT`` (seconds a move waits for its new instance, default 20,
below the executor's ``--apply-timeout`` of 25).

``apply`` and ``get_status`` are coroutines: the executor runs them on the plugin's own
event loop, so applies to different applications run concurrently (one application's
commands run one after the other). Nothing contacts the API before the first call.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericNamespacedResource,
    create_api_info,
)
from lightkube.operators import in_

from mlsysops.plugin_api import MechanismError, descriptions, get_logger, setting

logger = get_logger("fluidity")

ACTIONS = ("deploy", "remove", "move", "change_spec", "scale")

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "mlsysops"
LEGACY_MANAGER = "mlsysops-fluidity"  # the label value of earlier versions
FIELD_MANAGER = "mlsysops-fluidity"
APP = "mlsysops.eu/app"
COMPONENT = "mlsysops.eu/component"
HOST = "mlsysops.eu/host"
PLAN = "mlsysops.eu/plan-id"
SPEC_HASH = "mlsysops.eu/spec-hash"
COMPONENT_SPEC = "mlsysops.eu/component-spec"
HOSTNAME = "kubernetes.io/hostname"
ARCH = "kubernetes.io/arch"



def _dict_resource(group: str, kind: str, plural: str, *, namespaced: bool = True) -> Any:
    """A lightkube resource whose objects are the plain dicts the API server sent.

    Not entered in lightkube's global registry (which the built-in models own, and
    which refuses a second class per kind when the plugin is reloaded).
    """
    base = GenericNamespacedResource if namespaced else GenericGlobalResource
    return type(kind, (base,), {"_api_info": create_api_info(group, "v1", kind, plural)})


Deployment = _dict_resource("apps", "Deployment", "deployments")
Service = _dict_resource("", "Service", "services")
Node = _dict_resource("", "Node", "nodes", namespaced=False)
KINDS: dict[str, Any] = {"Deployment": Deployment, "Service": Service}


# --------------------------------------------------------------------------- plugin API
async def apply(command: dict[str, Any]) -> dict[str, Any]:
    """Apply one Fluidity command (see the module docstring); returns what was done."""
    request = _parse(command)
    if request is None:
        return {"changed": False, "steps": []}
    components: dict[str, dict[str, Any]] = {}
    if not request.remove_app:
        components = _check_descriptions(request)
        if not request.actions:
            return {"app": request.app, "changed": False, "steps": []}
    cluster = await _cluster()
    async with cluster.lock(request.app):
        await cluster.synced(cluster.deployments, cluster.services)
        try:
            if request.remove_app:
                work = _plan_app_removal(cluster, request.app)
            else:
                planner = _Planner(cluster, request, components)
                planner.load()
                work = await planner.run()
            steps = await _execute(cluster, work)
        finally:
            cluster.reserved.pop(request.app, None)
    if steps:
        logger.info("fluidity applied", app=request.app, steps=steps)
    return {"app": request.app, "changed": bool(steps), "steps": steps}


async def get_status() -> dict[str, Any]:
    """Instances per application and component: host, replicas, readiness.

    Answered from the watched cache (no request to the API once it is filled).
    ``ready_replicas`` and ``ready`` are None while Kubernetes has reported no status.
    """
    cluster = await _cluster()
    await cluster.synced(cluster.deployments)
    apps: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for dep in cluster.deployments.items.values():
        notes = dep["metadata"].get("annotations") or {}
        replicas = (dep.get("spec") or {}).get("replicas", 1)
        status = dep.get("status") or {}
        ready: int | None = status.get("readyReplicas", 0) if status else None
        apps.setdefault(notes[APP], {}).setdefault(notes.get(COMPONENT, ""), []).append(
            {
                "host": notes.get(HOST, ""),
                "deployment": dep["metadata"].get("name", ""),
                "replicas": replicas,
                "ready_replicas": ready,
                "ready": None if ready is None else ready >= replicas,
            }
        )
    for components in apps.values():
        for instances in components.values():
            instances.sort(key=lambda i: i["host"])
    return {"namespace": cluster.namespace, "applications": apps}


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
    legacy: bool = False  # labelled by an earlier version: apply again to relabel


@dataclass
class _Op:
    verb: str  # create | update | delete
    kind: str  # Deployment | Service
    name: str
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.name}"


@dataclass
class _Work:
    """What a command sends: applies, then (for moves) a wait, then deletions."""

    applies: list[_Op] = field(default_factory=list)
    deletes: list[_Op] = field(default_factory=list)
    moves: list[_Move] = field(default_factory=list)


@dataclass
class _Move:
    """A move's new instance, which must be ready before the old one goes."""

    component: str
    src: str
    target: str
    deployment: str
    created: bool  # made by this command: removed again if it never gets ready


@dataclass
class _Placement:
    """An instance a command creates on a node: checked for eligibility first."""

    where: str
    component: str
    host: str
    spec: dict[str, Any]
    replicas: int


class _Planner:
    """Turns the actions of a request into Kubernetes operations, changing nothing.

    The actions are played in order on an in-memory copy of the application's instances
    (from the watched cache); the operations are then the difference between that end
    state and the cluster: applies first, deletions last (so a move never leaves a gap),
    and nothing at all when the cluster already is in the end state.
    """

    def __init__(self, cluster: _Cluster, request: _Request,
                 components: dict[str, dict[str, Any]]):
        self.cluster, self.req, self.app = cluster, request, request.app
        self.components = components
        self.known_nodes = set(descriptions.known_nodes())
        self.current: dict[tuple[str, str], _Instance] = {}
        self.instances: dict[tuple[str, str], _Instance] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.placements: dict[tuple[str, str], _Placement] = {}
        self.moves: list[_Move] = []
        self.problems: list[str] = []

    def load(self) -> None:
        for dep in _owned(self.cluster.deployments.items.values(), self.app):
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
                replicas=(dep.get("spec") or {}).get("replicas", 1),
                legacy=(meta.get("labels") or {}).get(MANAGED_BY) != MANAGER,
            )
        self.instances = {key: copy.copy(inst) for key, inst in self.current.items()}
        for svc in _owned(self.cluster.services.items.values(), self.app):
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
    async def run(self) -> _Work:
        touched: list[str] = []
        for action in self.req.actions:
            if action.component not in touched:
                touched.append(action.component)
            getattr(self, "do_" + action.kind)(action)
        work = self.deployment_work()
        for component in touched:
            op = self.service_op(component)
            if op is not None:
                (work.deletes if op.verb == "delete" else work.applies).append(op)
        if not self.problems:
            await self.check_placements()
        if not self.problems:
            await self.check_names(work)
        if self.problems:
            raise MechanismError(
                f"command for application {self.app!r} refused, nothing was changed: "
                + "; ".join(self.problems)
            )
        return work

    def do_deploy(self, a: _Action) -> None:
        assert a.host is not None
        if self.known_host(a, a.host):
            self.place(a, a.host, self.components[a.component])

    def do_remove(self, a: _Action) -> None:
        assert a.host is not None
        if self.known_host(a, a.host, or_hosting=True):
            self.instances.pop((a.component, a.host), None)
            self.placements.pop((a.component, a.host), None)

    def do_move(self, a: _Action) -> None:
        assert a.src is not None and a.target is not None
        src_ok = self.known_host(a, a.src, or_hosting=True)
        if not (self.known_host(a, a.target) and src_ok):
            return
        source = self.instances.pop((a.component, a.src), None)
        self.placements.pop((a.component, a.src), None)
        if (a.component, a.target) not in self.instances:
            spec = source.spec if source and source.spec else self.components[a.component]
            self.place(a, a.target, spec, replicas=source.replicas if source else None)
        if (a.component, a.src) in self.current:  # something will stop: wait for the new one
            self.moves.append(_Move(a.component, a.src, a.target, "", False))

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
            placement = self.placements.get((a.component, host))
            if placement is not None:
                placement.replicas = a.replicas

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
        key = (a.component, host)
        inst = self.instances.get(key)
        if inst is None:
            name = dns_name(self.app, a.component, host)
            inst = self.instances[key] = _Instance(name, spec, "", 1)
        if inst.spec_hash != spec_hash:
            inst.spec, inst.spec_hash, inst.template = spec, spec_hash, template
        if replicas is not None:
            inst.replicas = replicas
        if key not in self.current and a.kind in ("deploy", "move"):
            self.placements[key] = _Placement(a.where, a.component, host, inst.spec,
                                              inst.replicas)
        elif key in self.placements:
            self.placements[key].spec = inst.spec

    # -- eligibility and ownership, before anything is sent ----------------------------
    async def check_placements(self) -> None:
        """Each node a new instance goes to exists, is Ready, fits and has room."""
        if not self.placements:
            return
        nodes = self.cluster.nodes
        try:
            await self.cluster.synced(nodes)
        except MechanismError as exc:
            why = str(exc).removesuffix("; nothing was changed")
            self.problems.append(f"the nodes cannot be checked: {why}")
            return
        load = self.cluster.node_load(self.app)
        for key, inst in self.instances.items():
            if key not in self.placements:  # this application's other instances
                _add_load(load, key[1], _spec_requests(inst.spec), inst.replicas)
        reserved: dict[str, Resources] = {}
        for p in self.placements.values():
            why = _ineligible(p, self.components.get(p.component, p.spec), nodes.items, load)
            if why:
                self.problems.append(f"{p.where}: node {p.host!r} refused for component "
                                     f"{p.component!r}: {why}")
            _add_load(reserved, p.host, _spec_requests(p.spec), p.replicas)
        if not self.problems:  # held until the apply ends (see apply())
            self.cluster.reserved[self.app] = reserved

    async def check_names(self, work: _Work) -> None:
        """A name this command creates must not be held by an object Fluidity did not make."""
        for op in work.applies:
            if op.verb != "create":
                continue
            try:
                existing = await self.cluster.read(op.kind, op.name)
            except MechanismError as exc:
                self.problems.append(str(exc))
                continue
            if existing is not None and not _same_owner(op, existing):
                self.problems.append(_foreign(op, existing))

    # -- operations: the difference to the cluster ------------------------------------
    def deployment_work(self) -> _Work:
        work = _Work()
        for (component, host), inst in self.instances.items():
            before = self.current.get((component, host))
            if before is not None and not before.legacy and (
                before.spec_hash, before.replicas) == (inst.spec_hash, inst.replicas):
                continue
            template = inst.template
            if template is None:  # unchanged spec, relabelled or rescaled: render it again
                try:
                    template = _pod_template(self.app, component, inst.spec, host)
                except _Problem as exc:
                    self.problems.append(f"the instance on {host!r}: {exc}")
                    continue
            notes = _notes(self.app, component, host, **{
                SPEC_HASH: _hash(template),
                COMPONENT_SPEC: json.dumps(inst.spec, sort_keys=True)})
            body = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": inst.name,
                    "namespace": self.cluster.namespace,
                    "labels": _meta_labels(self.app, component, host, self.req.plan_id),
                    "annotations": notes,
                },
                "spec": {
                    "replicas": inst.replicas,
                    "selector": {"matchLabels": _selector(self.app, component, host)},
                    "template": template,
                },
            }
            verb = "create" if before is None else "update"
            work.applies.append(_Op(verb, "Deployment", inst.name, body))
        work.deletes += [
            _Op("delete", "Deployment", inst.name)
            for key, inst in self.current.items()
            if key not in self.instances
        ]
        for move in self.moves:
            target = self.instances.get((move.component, move.target))
            if target is None or (move.component, move.src) in self.instances:
                continue  # moved on again, or back, within the same command
            move.deployment = target.name
            move.created = (move.component, move.target) not in self.current
            work.moves.append(move)
        return work

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
        if existing is not None:
            meta = existing["metadata"]
            same = (meta.get("annotations") or {}).get(SPEC_HASH) == spec_hash
            if same and (meta.get("labels") or {}).get(MANAGED_BY) == MANAGER:
                return None
        body = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": self.cluster.namespace,
                "labels": _meta_labels(self.app, component, None, self.req.plan_id),
                "annotations": _notes(self.app, component, **{SPEC_HASH: spec_hash}),
            },
            "spec": spec,
        }
        return _Op("create" if existing is None else "update", "Service", name, body)


def _ours(obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    return labels.get(MANAGED_BY) in (MANAGER, LEGACY_MANAGER) and APP in notes


def _owned(items: Iterable[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    """Objects Fluidity made for ``app`` (labels may be shortened: check the annotation)."""
    return [i for i in items if (i["metadata"].get("annotations") or {}).get(APP) == app]


def _same_owner(op: _Op, existing: dict[str, Any]) -> bool:
    """``existing`` is ours and is the object ``op`` makes (a cache that lags behind)."""
    assert op.body is not None
    ours, theirs = op.body["metadata"]["annotations"], existing["metadata"].get("annotations")
    keys = (APP, COMPONENT, HOST)
    return _ours(existing) and all((theirs or {}).get(k) == ours.get(k) for k in keys)


def _foreign(op: _Op, existing: dict[str, Any]) -> str:
    """Why an existing object of the name ``op`` creates is left alone."""
    meta = existing.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY) not in (MANAGER, LEGACY_MANAGER):
        return (f"{op.kind} {op.name} already exists and is not managed by mlsysops (no "
                f"label {MANAGED_BY}={MANAGER}); it is left alone")
    assert op.body is not None
    ours, theirs = op.body["metadata"]["annotations"], meta.get("annotations") or {}
    owner = "/".join(str(theirs.get(k, "?")) for k in (APP, COMPONENT, HOST) if k in ours)
    return (f"{op.kind} {op.name} already exists and does not belong to this component "
            f"(it belongs to {owner}); it is left alone")


def _plan_app_removal(cluster: _Cluster, app: str) -> _Work:
    work = _Work()
    for kind, informer in (("Deployment", cluster.deployments), ("Service", cluster.services)):
        work.deletes += [_Op("delete", kind, obj["metadata"]["name"])
                         for obj in _owned(informer.items.values(), app)]
    return work


async def _execute(cluster: _Cluster, work: _Work) -> list[str]:
    """Applies, then the wait for moved instances, then deletions; returns the steps done."""
    done: list[str] = []
    for op in work.applies:
        await _run(cluster, op, done)
    if work.moves:
        await _await_moves(cluster, work.moves, done)
    for op in work.deletes:
        await _run(cluster, op, done)
    return done


async def _run(cluster: _Cluster, op: _Op, done: list[str]) -> None:
    try:
        await cluster.send(op)
    except Exception as exc:
        raise MechanismError(_failure(op, _why(exc), done)) from None
    done.append(str(op))


async def _await_moves(cluster: _Cluster, moves: list[_Move], done: list[str]) -> None:
    """Every moved instance ready within the ready timeout, else undo them and fail.

    If the wait itself is cancelled (the executor abandons the apply at its deadline, or
    the plugin is unloaded), the new instances are removed too before giving up: the old
    ones keep running.
    """
    timeout = cluster.ready_timeout
    names = [m.deployment for m in moves]
    try:
        ready = await cluster.deployments.wait(
            lambda items: all(_ready(items.get(n)) for n in names), timeout)
    except asyncio.CancelledError:
        await asyncio.shield(_undo(cluster, [m for m in moves if m.created]))
        raise
    if ready:
        return
    late = [m for m in moves if not _ready(cluster.deployments.items.get(m.deployment))]
    details = "; ".join(
        f"{m.component} from {m.src!r} to {m.target!r}: Deployment {m.deployment} had "
        f"{_readiness(cluster.deployments.items.get(m.deployment))} after {timeout:g}s"
        for m in late)
    undone = await _undo(cluster, [m for m in late if m.created])
    removed = f"removed again: {', '.join(undone)}; " if undone else ""
    after = f"already done: {', '.join(done)}" if done else "nothing else was changed"
    raise MechanismError(
        f"move not finished, the new instance never became ready ({details}); {removed}"
        f"the old instance keeps running; {after}")


async def _undo(cluster: _Cluster, moves: list[_Move]) -> list[str]:
    """Delete the new instances of ``moves``; returns those deleted."""
    undone = []
    for move in moves:
        try:
            await cluster.send(_Op("delete", "Deployment", move.deployment))
            undone.append(move.deployment)
        except Exception as exc:
            logger.warning("could not remove the new instance of an unfinished move",
                           error=_why(exc), deployment=move.deployment)
    return undone


def _ready(dep: dict[str, Any] | None) -> bool:
    if dep is None:
        return False
    want = (dep.get("spec") or {}).get("replicas", 1)
    return int((dep.get("status") or {}).get("readyReplicas") or 0) >= want


def _readiness(dep: dict[str, Any] | None) -> str:
    if dep is None:
        return "disappeared"
    want = (dep.get("spec") or {}).get("replicas", 1)
    status = dep.get("status") or {}
    if not status:
        return f"no status yet (0 of {want} replicas ready)"
    return f"{status.get('readyReplicas') or 0} of {want} replicas ready"


def _failure(op: _Op, why: str, done: list[str]) -> str:
    after = f"already done: {', '.join(done)}" if done else "nothing was changed"
    return f"{op} failed: {why}; {after}"


def _code(exc: BaseException) -> int | None:
    """The HTTP status of an API error (lightkube raises ApiError only for responses that
    say exactly ``application/json``; others come as the HTTP client's status error)."""
    if isinstance(exc, ApiError):
        return int(exc.status.code or 0)
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        status = exc.status
        return f"HTTP {status.code} {status.reason or ''}: {status.message or ''}".strip(": ")
    code = _code(exc)
    if code is not None:
        try:
            body = exc.response.json()  # type: ignore[attr-defined]
        except Exception:
            body = {}
        body = body if isinstance(body, dict) else {}
        return f"HTTP {code} {body.get('reason') or ''}: {body.get('message') or ''}".strip(": ")
    if isinstance(exc, MechanismError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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




# --------------------------------------------------------------------------- eligibility
_SUFFIX = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50,
           "Ei": 2.0**60}
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def quantity(text: Any) -> float:
    """A Kubernetes quantity (``250m``, ``1.5``, ``64Mi``, ``1e3``) as a number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""]


Resources = dict[str, float]  # "cpu" (cores) and "memory" (bytes)


def _spec_requests(spec: dict[str, Any]) -> Resources:
    """The cpu and memory one replica of a component (description form) requests."""
    total: Resources = {"cpu": 0.0, "memory": 0.0}
    for container in spec.get("containers") or []:
        if not isinstance(container, dict):
            continue
        requests = _resources(container.get("platform_requirements") or {}).get("requests", {})
        for resource, value in requests.items():
            try:
                total[resource] += quantity(value)
            except ValueError:
                continue  # unreadable: the API server refuses it with its own reason
    return total


def _template_requests(dep: dict[str, Any]) -> Resources:
    """The cpu and memory one replica of a live Deployment requests."""
    total: Resources = {"cpu": 0.0, "memory": 0.0}
    pod = ((dep.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod.get("containers") or []:
        requests = (container.get("resources") or {}).get("requests") or {}
        for resource in total:
            if resource in requests:
                try:
                    total[resource] += quantity(requests[resource])
                except ValueError:
                    continue
    return total


def _add_load(load: dict[str, Resources], host: str, per_replica: Resources,
              replicas: int) -> None:
    used = load.setdefault(host, {"cpu": 0.0, "memory": 0.0})
    for resource, value in per_replica.items():
        used[resource] += value * replicas


def _node_of(host: str, nodes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The Node that ``host`` names: by name, else by its ``kubernetes.io/hostname`` label."""
    if host in nodes:
        return nodes[host]
    for node in nodes.values():
        if ((node.get("metadata") or {}).get("labels") or {}).get(HOSTNAME) == host:
            return node
    return None


def _ineligible(p: _Placement, component: dict[str, Any], nodes: dict[str, dict[str, Any]],
                load: dict[str, Resources]) -> str:
    """Why ``p.host`` cannot take the instance (empty: it can); counts it in ``load``."""
    node = _node_of(p.host, nodes)
    if node is None:
        return "no such Node in the cluster"
    ready = [c for c in (node.get("status") or {}).get("conditions") or []
             if c.get("type") == "Ready"]
    if not ready:
        return "it reports no Ready condition"
    if ready[0].get("status") != "True":
        why = ready[0].get("reason") or ready[0].get("message") or ""
        return f"it is not Ready (Ready={ready[0].get('status')}{': ' + why if why else ''})"
    mismatch = _requirement_mismatch(p.host, component, p.spec, node)
    if mismatch:
        return mismatch
    per_replica = _spec_requests(p.spec)
    before = dict(load.get(p.host) or {"cpu": 0.0, "memory": 0.0})
    _add_load(load, p.host, per_replica, p.replicas)
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    short = []
    for resource in ("cpu", "memory"):
        need = per_replica[resource] * p.replicas
        if resource not in allocatable or not need:
            continue
        try:
            room = quantity(allocatable[resource])
        except ValueError:
            continue
        if before[resource] + need > room:
            free = max(room - before[resource], 0.0)
            short.append(f"{resource}: {_amount(resource, need)} requested, "
                         f"{_amount(resource, free)} free of {_amount(resource, room)} "
                         "allocatable")
    if short:
        return "not enough room (" + "; ".join(short) + ")"
    return ""


def _amount(resource: str, value: float) -> str:
    """An amount of cpu (cores) or memory (Mi) as people read it."""
    if resource == "cpu":
        return f"{round(value, 3):g} cores"
    return f"{round(value / 2**20, 1):g}Mi"


def _requirement_mismatch(host: str, component: dict[str, Any], spec: dict[str, Any],
                          node: dict[str, Any]) -> str:
    """The first node requirement of the component that ``host`` does not meet."""
    placement = component.get("node_placement") or {}
    described = descriptions.node(host)
    facts = (described or {}).get("spec") or {}
    node_labels = (node.get("metadata") or {}).get("labels") or {}

    pinned = placement.get("node")
    if pinned and pinned != host:
        return f"the component is pinned to node {pinned!r} by its description"
    layers = [str(x) for x in placement.get("continuum_layer") or []]
    if layers and "*" not in layers:
        if described is None:
            return (f"the component needs continuum_layer {layers} and the node has no "
                    "description saying its layer")
        if facts.get("continuum_layer") not in layers:
            return (f"the component needs continuum_layer {layers}, the node is "
                    f"{facts.get('continuum_layer')!r}")
    if placement.get("mobile") and not facts.get("mobile"):
        return "the component needs a mobile node, the node is not described as mobile"
    have = {str(x) for x in facts.get("labels") or []}
    have |= {f"{k}:{v}" for k, v in node_labels.items()} | {f"{k}={v}" for k, v in
                                                            node_labels.items()}
    missing = [str(x) for x in placement.get("labels") or [] if str(x) not in have]
    if missing:
        return f"the node lacks the label(s) {', '.join(missing)} the component needs"
    arch = node_labels.get(ARCH) or (((facts.get("hardware") or {}).get("cpu") or {})
                                     .get("architecture"))
    for container in spec.get("containers") or []:
        if not isinstance(container, dict):
            continue
        wanted = (((container.get("platform_requirements") or {}).get("cpu") or {})
                  .get("architecture")) or []
        if arch and wanted and arch not in wanted:
            return f"the component needs cpu architecture {wanted}, the node is {arch!r}"
    return ""


# --------------------------------------------------------------------------- Kubernetes
def _raw(obj: Any) -> dict[str, Any]:
    """A lightkube object as the plain dict the API server sent."""
    out = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return out if isinstance(out, dict) else {}


WATCH_SECONDS = 300  # the API server ends each watch after this; it resumes, no new LIST


class _Informer:
    """A cache of one resource, as a controller keeps one: list once, then watch.

    The watch resumes from the list's ``resourceVersion`` (and, each time the server ends
    it, from the last version it delivered); when the server answers 410 Gone (that
    version is too old) the cache is listed again. Any other failure is retried after a
    growing pause (1 s up to 30 s), also by listing again.
    """

    def __init__(self, client: AsyncClient, resource: Any, namespace: str | None,
                 keep: Callable[[dict[str, Any]], bool], labels: dict[str, Any] | None) -> None:
        self.client, self.resource, self.namespace = client, resource, namespace
        self.keep, self.labels = keep, labels
        self.kind = resource._api_info.resource.kind
        self.items: dict[str, dict[str, Any]] = {}
        self.filled = asyncio.Event()
        self.error = ""  # the last failure, while it lasts
        self.lists = 0
        self._changed = asyncio.Event()
        self._gone: set[str] = set()  # deleted by us: ignore late events about them

    async def run(self) -> None:
        pause = 1.0
        while True:
            try:
                version = await self._list()
                pause = 1.0
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = _why(exc)
                logger.warning("watch failed, listing again", kind=self.kind, error=self.error,
                               retry_in=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def _list(self) -> str | None:
        listing = self.client.list(self.resource, namespace=self.namespace, labels=self.labels)
        items = {}
        async for obj in listing:
            raw = _raw(obj)
            if self.keep(raw):
                items[raw["metadata"]["name"]] = raw
        self.lists += 1
        self.items, self._gone = items, set()
        self.error = ""
        self.filled.set()
        self._notify()
        try:
            return listing.resourceVersion
        except Exception:  # an empty answer without metadata: watch from now
            return None

    async def _watch(self, version: str | None) -> None:
        stream = self.client.watch(self.resource, namespace=self.namespace, labels=self.labels,
                                   resource_version=version, server_timeout=WATCH_SECONDS)
        try:
            async for event, obj in stream:
                self.seen(event, _raw(obj))
        except Exception as exc:
            if _code(exc) != 410:
                raise
            logger.info("watch expired (410 Gone), listing again", kind=self.kind)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def seen(self, event: str, raw: dict[str, Any], *, ours: bool = False) -> None:
        """Apply a watch event (or the answer to our own request, ``ours``) to the cache."""
        name = (raw.get("metadata") or {}).get("name")
        if not name:
            return
        if event == "DELETED":
            self.items.pop(name, None)
            if ours:
                self._gone.add(name)
            else:
                self._gone.discard(name)
        elif ours:
            self._gone.discard(name)
            self.items[name] = raw
        elif name not in self._gone:
            if self.keep(raw):
                self.items[name] = raw
            else:
                self.items.pop(name, None)  # relabelled away from us
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, done: Callable[[dict[str, dict[str, Any]]], bool],
                   timeout: float) -> bool:
        """Whether ``done(items)`` holds within ``timeout`` s, checked at each change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.items):
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return done(self.items)
        return True


class _Cluster:
    """The API client and the watched caches of one namespace, on one event loop."""

    def __init__(self, url: str, namespace: str) -> None:
        import httpx2  # lightkube's HTTP client

        self.url, self.namespace = url, namespace
        self.loop = asyncio.get_running_loop()
        try:
            self.client = AsyncClient(_kube_config(url), namespace=namespace,
                                      timeout=httpx2.Timeout(self.timeout), lazy=False,
                                      field_manager=FIELD_MANAGER)
        except MechanismError:
            raise
        except Exception as exc:  # e.g. a kubeconfig user with a legacy auth-provider
            raise MechanismError(f"no Kubernetes API: the configuration is unusable: "
                                 f"{type(exc).__name__}: {exc}") from None
        owned = {MANAGED_BY: in_([MANAGER, LEGACY_MANAGER])}
        self.deployments = _Informer(self.client, Deployment, namespace, _ours, owned)
        self.services = _Informer(self.client, Service, namespace, _ours, owned)
        self.nodes = _Informer(self.client, Node, None, lambda _: True, None)
        self.task = asyncio.ensure_future(self._watch())
        self.locks: dict[str, asyncio.Lock] = {}
        self.reserved: dict[str, dict[str, Resources]] = {}  # app -> node -> being placed

    async def _watch(self) -> None:
        """The three caches, until cancelled (by close(), or by the event loop ending when
        the plugin is unloaded); the client is closed either way."""
        try:
            await asyncio.gather(self.deployments.run(), self.services.run(), self.nodes.run())
        finally:
            if _clusters.get(id(self.loop)) is self:
                del _clusters[id(self.loop)]
            await self.client.close()

    @property
    def timeout(self) -> float:
        return _seconds("fluidity_request_timeout", 10.0)

    @property
    def ready_timeout(self) -> float:
        return _seconds("fluidity_ready_timeout", 20.0)

    def lock(self, app: str) -> asyncio.Lock:
        """One application's commands run one at a time; different ones concurrently."""
        return self.locks.setdefault(app, asyncio.Lock())

    async def synced(self, *informers: _Informer) -> None:
        """Wait (up to the request timeout) until each cache is filled, else fail."""
        for informer in informers:
            try:
                await asyncio.wait_for(informer.filled.wait(), self.timeout)
            except TimeoutError:
                where = f" in namespace {self.namespace!r}" if informer.namespace else ""
                why = informer.error or f"no answer within {self.timeout:g}s"
                raise MechanismError(f"listing {informer.kind}s{where} failed: {why}; "
                                     "nothing was changed") from None

    def node_load(self, app: str) -> dict[str, Resources]:
        """What each node carries for other applications: their instances (watched) and
        the placements their commands are making now."""
        load: dict[str, Resources] = {}
        for dep in self.deployments.items.values():
            notes = dep["metadata"].get("annotations") or {}
            if notes.get(APP) != app and notes.get(HOST):
                replicas = (dep.get("spec") or {}).get("replicas", 1)
                _add_load(load, notes[HOST], _template_requests(dep), replicas)
        for other, hosts in self.reserved.items():
            if other != app:
                for host, used in hosts.items():
                    _add_load(load, host, used, 1)
        return load

    async def read(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object of that name, or None if there is none."""
        try:
            return _raw(await self.client.get(KINDS[kind], name, namespace=self.namespace))
        except Exception as exc:  # HTTP errors, connection refused, timeouts, ...
            if _code(exc) == 404:
                return None
            why = _why(exc)
        raise MechanismError(f"reading {kind} {name} in namespace {self.namespace!r} failed: "
                             f"{why}")

    async def send(self, op: _Op) -> None:
        """One operation; the cache sees its answer at once (the watch follows)."""
        informer = self.deployments if op.kind == "Deployment" else self.services
        resource = KINDS[op.kind]
        if op.verb == "delete":
            try:
                await self.client.delete(resource, op.name, namespace=self.namespace)
            except Exception as exc:
                if _code(exc) != 404:  # already gone is what we wanted
                    raise
            informer.seen("DELETED", {"metadata": {"name": op.name}}, ours=True)
            return
        assert op.body is not None
        answer = await self.client.apply(resource.from_dict(op.body), force=True,
                                         field_manager=FIELD_MANAGER)
        informer.seen("MODIFIED", _raw(answer), ours=True)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _seconds(name: str, default: float) -> float:
    try:
        value = float(setting(name, str(default)))
    except ValueError:
        return default
    return value if value > 0 else default


def _kube_config(url: str) -> KubeConfig:
    """An explicit URL (no credentials), else the in-cluster account, else kubeconfig."""
    if url:
        return KubeConfig.from_dict({
            "clusters": [{"name": "api", "cluster": {"server": url.rstrip("/")}}],
            "users": [{"name": "anonymous", "user": {}}],
            "contexts": [{"name": "api", "context": {"cluster": "api", "user": "anonymous"}}],
            "current-context": "api"})
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            return KubeConfig.from_service_account()
        except Exception as exc:
            in_cluster = f"in-cluster configuration unusable: {exc}; "
    else:
        in_cluster = ""
    try:
        return _merged_kubeconfig()
    except Exception as exc:
        raise MechanismError(
            f"no Kubernetes API: {in_cluster or 'not running in a cluster, '}no usable "
            f"kubeconfig ({exc}), and MLSYSOPS_KUBE_API_URL is not set"
        ) from None


def _merged_kubeconfig() -> KubeConfig:
    """The files of ``KUBECONFIG`` merged as kubectl does (the first file to name an
    entry or a current context wins), else ``~/.kube/config``."""
    paths = [Path(p).expanduser() for p in os.environ.get("KUBECONFIG", "").split(os.pathsep)
             if p] or [Path("~/.kube/config").expanduser()]
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": []}
    seen: dict[str, set[str]] = {key: set() for key in merged}
    read = []
    for path in paths:
        if not path.is_file():
            continue
        doc = yaml.safe_load(path.read_text()) or {}
        read.append(path)
        for key in ("clusters", "users", "contexts"):
            for entry in doc.get(key) or []:
                if entry.get("name") not in seen[key]:
                    seen[key].add(entry.get("name"))
                    merged[key].append(entry)
        if doc.get("current-context") and "current-context" not in merged:
            merged["current-context"] = doc["current-context"]
    if not read:
        raise FileNotFoundError(f"none of {', '.join(map(str, paths))} exists")
    return KubeConfig.from_dict(merged, fname=read[0])


_clusters: dict[int, _Cluster] = {}  # by id of their event loop (each removes itself)


async def _cluster() -> _Cluster:
    """The client and caches for the current settings and event loop, started on first
    use (and started again if the API URL or the namespace changes)."""
    loop = asyncio.get_running_loop()
    url, namespace = setting("kube_api_url"), setting("fluidity_namespace", "default")
    cluster = _clusters.get(id(loop))
    if cluster is not None and cluster.loop is loop and not cluster.task.done() and (
            cluster.url, cluster.namespace) == (url, namespace):
        return cluster
    if cluster is not None:
        _clusters.pop(id(loop), None)
        await cluster.close()
    cluster = _clusters[id(loop)] = _Cluster(url, namespace)
    return cluster


async def _reset_client() -> None:
    """Stop the watches and close the client of this event loop (tests, reconfiguration)."""
    cluster = _clusters.pop(id(asyncio.get_running_loop()), None)
    if cluster is not None:
        await cluster.close()
