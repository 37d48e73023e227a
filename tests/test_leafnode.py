"""Leaf nodes: a far-edge nats-server joins the control plane through the chart's leaf port.

The hub is the chart's bundled NATS rendered with the leaf node port on (server TLS with
client certificates, leaf credentials from a Secret, the services' own user and password)
and run here from its rendered configuration (``test_helm.run_bundled``); the layout comes
from the rendered ``mlsysops init`` Job and the monitor runs in-process with the rendered
monitor Deployment's settings. The leaf is what an edge node runs: a plain nats-server
without JetStream and without accounts of its own, whose ``leafnodes { remotes }`` dials
the hub's leaf port. Its clients are bridged into the services' account on the hub, so a
description published at the edge lands in the hub's intake stream, and replies and
outcomes come back to the edge.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import nats
import pytest

from mlsysops import settings as settings_mod
from tests import loopkit as kit
from tests import test_helm as chart_kit
from tests.conftest import InProcessLoop
from tests.requirements import need_binary

LEAF_TLS_MOUNT = "/etc/nats-leafnodes-tls"
SERVICE_SECRET = {"user": "mlsysops", "password": "service-pass"}
LEAF_SECRET = {"leaf-user": "edge", "leaf-password": "edge-pass"}
VALUES: dict[str, Any] = {"nats": {
    "auth": {"type": "userPassword", "existingSecret": "mlsysops-nats"},
    "bundled": {"enabled": True, "persistence": {"enabled": False}},
    "cluster": {"enabled": False},
    "leafnodes": {"enabled": True,
                  "tls": {"existingSecret": "leaf-tls", "caKey": "ca.crt"},
                  "auth": {"existingSecret": "leaf-auth", "userKey": "leaf-user",
                           "passwordKey": "leaf-password"}}}}
SECRETS = {"mlsysops-nats": SERVICE_SECRET, "leaf-auth": LEAF_SECRET}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certs(directory: Path) -> Path:
    """A CA, the hub's leaf port certificate (for 127.0.0.1), an edge client certificate."""
    openssl = need_binary("openssl")
    directory.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=mlsysops test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, cn, ext in (("tls", "hub", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                           "extendedKeyUsage=serverAuth\n"),
                          ("edge", "edge-node", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(ext)
        run("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")
    # the container reads tls.crt/tls.key/ca.crt as the chart names them (values keys)
    return directory


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as answer:
        found: dict[str, Any] = json.load(answer)
        return found


def leaf_count(monitor_port: int) -> int:
    return int(get_json(f"http://127.0.0.1:{monitor_port}/leafz").get("leafnodes", 0))


@dataclass
class Hub:
    rendered: chart_kit.Rendered
    servers: chart_kit.LocalNats
    certs: Path

    @property
    def leaf_port(self) -> int:
        return self.servers.leaf_ports[0]

    @property
    def monitor_port(self) -> int:
        return self.servers.monitor_ports[0]


@dataclass
class Leaf:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(chart_kit.CHART) as loaded:
        yield loaded


@pytest.fixture
def hub(chart: helm_python.Chart, tmp_path: Path) -> Iterator[Hub]:
    certs = make_certs(tmp_path / "certs")
    rendered = chart_kit.render(chart, VALUES)
    (tmp_path / "hub").mkdir()
    with chart_kit.run_bundled(rendered, SECRETS, tmp_path / "hub",
                               files={LEAF_TLS_MOUNT: certs}) as servers:
        yield Hub(rendered, servers, certs)


def start_leaf(hub: Hub, workdir: Path, *, scheme: str = "tls", password: str | None = None,
               client_cert: bool = True) -> Leaf:
    """An edge node's nats-server: no JetStream, one remote to the hub's leaf port."""
    server = need_binary("nats-server", str(chart_kit.ROOT / ".venv" / "bin"))
    workdir.mkdir()
    user, secret = LEAF_SECRET["leaf-user"], password or LEAF_SECRET["leaf-password"]
    tls = [f"ca_file: {json.dumps(str(hub.certs / 'ca.crt'))}"]
    if client_cert:
        tls += [f"cert_file: {json.dumps(str(hub.certs / 'edge.crt'))}",
                f"key_file: {json.dumps(str(hub.certs / 'edge.key'))}"]
    remote = json.dumps(f"{scheme}://{user}:{secret}@127.0.0.1:{hub.leaf_port}")
    conf = workdir / "leaf.conf"
    conf.write_text(
        "server_name: edge-leaf\n"
        "leafnodes {\n  reconnect: 1\n  remotes = [\n    {\n"
        f"      url: {remote}\n"
        + ("      tls {\n" + "".join(f"        {line}\n" for line in tls) + "      }\n"
           if scheme == "tls" else "")
        + "    }\n  ]\n}\n")
    port = free_port()
    log = workdir / "leaf.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([server, "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=out)
    chart_kit.wait_for_port(port, proc)
    return Leaf(proc, port, log)


@pytest.fixture
def leaf(hub: Hub, tmp_path: Path) -> Iterator[Leaf]:
    edge = start_leaf(hub, tmp_path / "edge")
    try:
        deadline = time.monotonic() + 15
        while leaf_count(hub.monitor_port) != 1:
            assert time.monotonic() < deadline, edge.log.read_text()
            time.sleep(0.1)
        yield edge
    finally:
        edge.stop()


def monitor_settings(hub: Hub, tmp_path: Path) -> settings_mod.Settings:
    """The monitor as the chart's Deployment configures it, pointed at the local hub."""
    deployment = hub.rendered.deployment("monitor")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = chart_kit.resolve_env(container, SECRETS)
    env["MLSYSOPS_NATS_URL"] = hub.servers.local_url(env["MLSYSOPS_NATS_URL"])
    (tmp_path / "policies").mkdir()
    env["MLSYSOPS_POLICY_DIR"] = str(tmp_path / "policies")
    env["MLSYSOPS_HTTP_PORT"] = "0"
    return settings_mod.load(env=env)


async def stored(hub: Hub, key: str) -> dict[str, Any] | None:
    """The description under ``key`` in the hub's desc bucket, read as a service does."""
    nc = await nats.connect(hub.servers.url(), user=SERVICE_SECRET["user"],
                            password=SERVICE_SECRET["password"])
    try:
        kv = await nc.jetstream().key_value("mlsysops-desc")
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        found: dict[str, Any] | None = json.loads(entry.value or b"null")
        return found
    finally:
        await nc.close()


async def wait_stored(hub: Hub, key: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (found := await stored(hub, key)) is None:
        assert time.monotonic() < deadline, f"{key} never reached the hub's desc bucket"
        await asyncio.sleep(0.1)
    return found


@pytest.fixture
async def edge_client(leaf: Leaf) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(leaf.url)  # the edge's own clients: local, no credentials
    yield nc
    await nc.close()


async def test_descriptions_published_at_the_edge_reach_the_hub_and_answers_come_back(
    hub: Hub, leaf: Leaf, edge_client: nats.NATS, tmp_path: Path
) -> None:
    init = chart_kit.run_init_job(hub.rendered, SECRETS, hub.servers)
    assert init.returncode == 0, init.stdout + init.stderr
    # published at the edge while no monitor runs: the hub's intake keeps it; the hub's
    # interest in the intake subjects reaches the leaf a moment after init made the stream
    deadline = time.monotonic() + 20
    while True:
        await edge_client.publish("mlsysops.desc.app.edge-early", kit.app_doc("edge-early"))
        await edge_client.flush()
        if await intake_holds(hub, "mlsysops.desc.app.edge-early"):
            break
        assert time.monotonic() < deadline, "the edge's publication never reached the intake"
        await asyncio.sleep(0.2)

    loop = InProcessLoop(monitor_settings(hub, tmp_path))
    loop.start("monitor")
    try:
        early = await wait_stored(hub, "app.edge-early")
        assert early["spec"]["name"] == "edge-early"
        # a request through the leaf (as `nats req` or `mlsysops publish` at the edge):
        # the monitor's reply comes back through the leaf
        reply = await kit.publish_desc(leaf.url, "app", "edge-app", kit.app_doc("edge-app"))
        assert reply["accepted"] is True and reply["revision"] >= 1, reply
        assert (await wait_stored(hub, "app.edge-app"))["spec"]["name"] == "edge-app"
        bad = await kit.publish_desc(leaf.url, "app", "edge-bad", b"MLSysOpsApp: [unclosed")
        assert bad["accepted"] is False and bad["errors"], bad
        # a plain publish at the edge: stored at the hub, its outcome announced at the edge
        outcomes = await edge_client.subscribe("mlsysops.desc_result.app.edge-plain")
        await edge_client.flush()
        await wait_leaf_interest(hub, "mlsysops.desc_result.app.edge-plain")
        await edge_client.publish("mlsysops.desc.app.edge-plain", kit.app_doc("edge-plain", 2))
        outcome = json.loads((await outcomes.next_msg(timeout=15)).data)
        assert outcome["accepted"] is True and outcome["name"] == "edge-plain", outcome
        plain = await wait_stored(hub, "app.edge-plain")
        assert len(plain["spec"]["components"]) == 2
    finally:
        await loop.stop()


async def wait_leaf_interest(hub: Hub, subject: str, timeout: float = 20) -> None:
    """Until the hub knows that the leaf's clients listen on ``subject``."""
    deadline = time.monotonic() + timeout
    while True:
        leafs = get_json(f"http://127.0.0.1:{hub.monitor_port}/leafz?subs=1").get("leafs") or []
        if any(subject in (leaf.get("subscriptions_list") or []) for leaf in leafs):
            return
        assert time.monotonic() < deadline, f"the hub never learnt the edge's interest: {leafs}"
        await asyncio.sleep(0.05)


async def intake_holds(hub: Hub, subject: str) -> bool:
    nc = await nats.connect(hub.servers.url(), user=SERVICE_SECRET["user"],
                            password=SERVICE_SECRET["password"])
    try:
        info = await nc.jetstream().stream_info("MLSYSOPS_DESCRIPTIONS", subjects_filter=subject)
        return bool(info.state.subjects and info.state.subjects.get(subject))
    finally:
        await nc.close()


@pytest.mark.parametrize("how", ["wrong password", "no client certificate", "no TLS"])
def test_the_leaf_port_refuses_a_leaf_without_tls_or_credentials(hub: Hub, tmp_path: Path,
                                                                 how: str) -> None:
    if how == "wrong password":
        edge = start_leaf(hub, tmp_path / "edge", password="guess")
    elif how == "no client certificate":
        edge = start_leaf(hub, tmp_path / "edge", client_cert=False)
    else:
        edge = start_leaf(hub, tmp_path / "edge", scheme="nats")
    try:
        time.sleep(2.5)  # several connection attempts (reconnect: 1 s)
        assert edge.proc.poll() is None  # the leaf keeps trying; the hub keeps refusing
        assert leaf_count(hub.monitor_port) == 0, edge.log.read_text()
    finally:
        edge.stop()
    good = start_leaf(hub, tmp_path / "good")
    try:
        deadline = time.monotonic() + 15
        while leaf_count(hub.monitor_port) != 1:
            assert time.monotonic() < deadline, good.log.read_text()
            time.sleep(0.1)
    finally:
        good.stop()
