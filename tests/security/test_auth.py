"""Every service connects the way a production NATS asks, and never shows the secret.

For each method (user/password, token, NKey, credentials file, mutual TLS) a real
nats-server requires it; the five services run as processes, three configured by flags and
two by ``MLSYSOPS_*`` variables. The test checks that each of them connected (heartbeat in
the leases bucket), that the monitor answers a description, that ``mlsysops status`` works
with the same settings, and that the secret (password, token, seed, JWT, private key) is
in no service output and no ``status`` output.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest

from tests import loopkit as kit
from tests.conftest import NatsServer, free_port
from tests.security import pki
from tests.security.procs import ROOT, SERVICES, Services, base_env, configured_server

pytestmark = pytest.mark.slow
BY_FLAGS = ("monitor", "planner", "executor")  # the other two get the same by environment


@dataclass
class Method:
    """How one authentication method is set up on the server, the services and a client."""

    server_config: str
    settings: dict[str, str]  # setting name -> value (flag --x-y / env MLSYSOPS_X_Y)
    client: dict[str, Any]  # nats.connect keyword arguments for the test's own client
    secrets: list[str]  # strings that must never be printed
    tls: bool = False
    server_env: dict[str, str] = field(default_factory=dict)


def _userpass(tmp: Path) -> Method:
    password = "pw-" + secrets.token_urlsafe(16)
    return Method(f'authorization {{ user: mlsysops, password: "{password}" }}\n',
                  {"nats_user": "mlsysops", "nats_password": password},
                  {"user": "mlsysops", "password": password}, [password])


def _token(tmp: Path) -> Method:
    token = "tok-" + secrets.token_urlsafe(16)
    return Method(f'authorization {{ token: "{token}" }}\n', {"nats_token": token},
                  {"token": token}, [token])


def _nkey(tmp: Path) -> Method:
    pair = pki.new_keypair("user")
    seed = pki.write_seed(tmp / "user.nk", pair)
    return Method(f"authorization {{ users: [ {{ nkey: {pair.public} }} ] }}\n",
                  {"nats_nkey_seed": str(seed)}, {"nkeys_seed": str(seed)},
                  [pair.seed.decode()])


def _creds(tmp: Path) -> Method:
    trust = pki.make_trust()
    creds = trust.creds(tmp / "mlsysops.creds", "mlsysops")
    text = creds.read_text()
    jwt = text.split("-----BEGIN NATS USER JWT-----\n")[1].split("\n")[0]
    seed = text.split("-----BEGIN USER NKEY SEED-----\n")[1].split("\n")[0]
    return Method(trust.server_config(), {"nats_creds": str(creds)},
                  {"user_credentials": str(creds)}, [jwt, seed])


def _mtls(tmp: Path) -> Method:
    p = pki.make_pki(tmp / "pki")
    key_body = "".join(p.client_key.read_text().splitlines()[1:-1])
    ctx = ssl.create_default_context(cafile=str(p.ca))
    ctx.load_cert_chain(str(p.client_cert), str(p.client_key))
    config = (f'tls {{ cert_file: "{p.server_cert}", key_file: "{p.server_key}", '
              f'ca_file: "{p.ca}", verify: true, timeout: 3 }}\n')
    return Method(config, {"nats_tls_ca": str(p.ca), "nats_tls_cert": str(p.client_cert),
                           "nats_tls_key": str(p.client_key)},
                  {"tls": ctx}, [key_body[:64], key_body[-64:]], tls=True)


METHODS: dict[str, Callable[[Path], Method]] = {
    "user-password": _userpass, "token": _token, "nkey": _nkey, "creds": _creds,
    "mutual-tls": _mtls,
}


def _flags(settings: dict[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for name, value in settings.items():
        out += ["--" + name.replace("_", "-"), value]
    return tuple(out)


def _env(settings: dict[str, str]) -> dict[str, str]:
    return {"MLSYSOPS_" + name.upper(): value for name, value in settings.items()}


async def _heartbeats(url: str, client: dict[str, Any]) -> set[str]:
    nc = await nats.connect(url, max_reconnect_attempts=0, **client)
    try:
        kv = await nc.jetstream().key_value("mlsysops-leases")
        keys = await kv.keys()
    except Exception:  # no bucket or no key yet
        return set()
    finally:
        await nc.close()
    return {k.split(".")[1] for k in keys if k.startswith("svc.")}


async def _publish(url: str, client: dict[str, Any], kind: str, name: str,
                   payload: bytes) -> dict[str, Any]:
    nc = await nats.connect(url, max_reconnect_attempts=0, **client)
    try:
        for _ in range(100):
            try:
                msg = await nc.request(f"mlsysops.desc.{kind}.{name}", payload, timeout=5)
                reply: dict[str, Any] = json.loads(msg.data)
                return reply
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)
        raise AssertionError("no monitor answered")
    finally:
        await nc.close()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlsysops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False, cwd=str(ROOT))


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_services_connect_with_production_auth_and_keep_it_secret(
        method: str, tmp_path: Path, plugin_dirs: tuple[Path, Path]) -> None:
    m = METHODS[method](tmp_path)
    server = configured_server(tmp_path, m.server_config)
    services = Services(tmp_path)
    try:
        url = server.url
        common = {"MLSYSOPS_NATS_URL": url,
                  "MLSYSOPS_POLICY_DIR": str(plugin_dirs[0]),
                  "MLSYSOPS_MECHANISM_DIR": str(plugin_dirs[1])}
        for name in SERVICES:
            if name in BY_FLAGS:
                services.start(name, base_env(**common), _flags(m.settings))
            else:
                services.start(name, base_env(**common, **_env(m.settings)))
        got = await kit.wait_for(
            lambda: _until(_heartbeats(url, m.client), lambda s: s >= set(SERVICES)),
            timeout=30, what="a heartbeat of every service")
        assert got >= set(SERVICES), services.logs()
        reply = await _publish(url, m.client, "cluster", "c1", kit.cluster_doc("c1"))
        assert reply["accepted"], reply
        cli_env = base_env(**common, **_env(m.settings))
        for _ in range(3):  # status reads the buckets once; a busy machine may miss a key
            status = await asyncio.to_thread(_cli, cli_env, "status", "--json")
            assert status.returncode == 0, status.stderr
            shown = {s["service"] for s in json.loads(status.stdout)["services"]}
            if shown >= set(SERVICES):
                break
        assert shown >= set(SERVICES), status.stdout
        text = await asyncio.to_thread(_cli, cli_env, "status")
        assert text.returncode == 0 and "c1" in text.stdout, text.stderr
    finally:
        services.stop()
        server.stop()
    printed = {label: services.log(label) for label in SERVICES}
    printed["status --json"] = status.stdout + status.stderr
    printed["status"] = text.stdout + text.stderr
    for secret in m.secrets:
        leaks = [label for label, out in printed.items() if secret in out]
        assert not leaks, f"the {method} secret appears in the output of {leaks}"
    assert all("connected" in printed[s] for s in SERVICES)


async def _until(value: Any, cond: Callable[[Any], bool]) -> Any:
    got = await value
    return got if cond(got) else None


async def test_mutual_tls_refuses_a_client_without_certificate(tmp_path: Path) -> None:
    m = _mtls(tmp_path)
    server = configured_server(tmp_path, m.server_config)
    try:
        ca_only = ssl.create_default_context(cafile=m.settings["nats_tls_ca"])
        with pytest.raises(Exception):  # noqa: B017 - the handshake error type varies
            nc = await nats.connect(server.url, tls=ca_only, max_reconnect_attempts=0,
                                    allow_reconnect=False, connect_timeout=2)
            await nc.flush(timeout=2)
        nc = await nats.connect(server.url, max_reconnect_attempts=0, **m.client)
        await nc.close()
    finally:
        server.stop()


# ---------------------------------------------------------------- not yet (xfail)
def _auth_server(tmp_path: Path) -> tuple[NatsServer, str]:
    password = "pw-" + secrets.token_urlsafe(12)
    server = configured_server(tmp_path, f'authorization {{ user: u, password: "{password}" }}\n')
    return server, password


def test_refused_credentials_stop_the_service_with_a_clear_error(tmp_path: Path) -> None:
    server, _ = _auth_server(tmp_path)
    services = Services(tmp_path)
    try:
        services.start("monitor", base_env(MLSYSOPS_NATS_URL=server.url, MLSYSOPS_NATS_USER="u",
                                           MLSYSOPS_NATS_PASSWORD="wrong"))
        code = services.wait_exit("monitor", 8)
        out = services.log("monitor")
        assert code not in (None, 0), out[-2000:]
        assert "authoriz" in out.lower() and "'u'" in out
    finally:
        services.stop(grace=0)
        server.stop()


def test_sigterm_stops_a_service_that_is_still_connecting(tmp_path: Path) -> None:
    services = Services(tmp_path)
    try:  # nothing listens on that port: the service keeps trying to connect
        proc = services.start("monitor", base_env(MLSYSOPS_NATS_URL=f"nats://127.0.0.1:{free_port()}"))
        time.sleep(2)
        proc.terminate()
        assert services.wait_exit("monitor", 5) == 0, services.log("monitor")
    finally:
        services.stop(grace=0)


def test_password_in_the_url_is_never_printed(tmp_path: Path) -> None:
    server, password = _auth_server(tmp_path)
    services = Services(tmp_path)
    url = server.url.replace("nats://", f"nats://u:{password}@")
    try:
        services.start("monitor", base_env(MLSYSOPS_NATS_URL=url))
        deadline = time.monotonic() + 20
        while "connected" not in services.log("monitor") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "connected" in services.log("monitor"), services.log("monitor")
        dead = url.replace(str(server.port), "1")  # nothing listens there
        out = _cli(base_env(MLSYSOPS_NATS_URL=dead), "publish", "cluster",
                   str(ROOT / "examples" / "cluster.yaml"))
        assert out.returncode != 0
    finally:
        services.stop()
        server.stop()
    assert password not in services.log("monitor")
    assert password not in out.stdout + out.stderr

