"""Credentials a production NATS cluster uses, made on the spot for a test.

- TLS: a CA, a server certificate for 127.0.0.1 and a client certificate, with the
  ``openssl`` command line (Debian's ``openssl`` package);
- NKeys: a user seed file and its public key, with the ``nkeys`` package;
- credentials files: an operator, an account and a user, as ``nsc`` would make them (the
  JWTs are signed here with ``nkeys``), plus the server configuration that trusts them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.requirements import missing, need_binary


# =========================================================================== TLS
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run([need_binary("openssl"), *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> Pki:
    """A CA, and a server (127.0.0.1) and a client certificate it signs, valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *curve, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
             "-days", "1", "-subj", "/CN=mlsysops test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage, san in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                             ("client", "clientAuth", "DNS:mlsysops-monitor")):
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                       "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")
        _openssl("req", *curve, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN=mlsysops-{name}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
                 "-days", "1", "-extfile", str(ext))
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
               d / "client.key")


# =========================================================================== NKeys
def _nkeys() -> Any:
    try:
        import nkeys
    except ImportError:
        missing("the 'nkeys' package is not installed: NATS NKey and credentials-file "
                "authentication need it (pip install nkeys)")
    return nkeys


@dataclass
class KeyPair:
    seed: bytes
    public: str


def new_keypair(kind: str) -> KeyPair:
    """A fresh NKey pair: kind is ``user``, ``account`` or ``operator``."""
    nkeys = _nkeys()
    prefix = {"user": nkeys.PREFIX_BYTE_USER, "account": nkeys.PREFIX_BYTE_ACCOUNT,
              "operator": nkeys.PREFIX_BYTE_OPERATOR}[kind]
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return KeyPair(seed, nkeys.from_seed(bytearray(seed)).public_key.decode())


def write_seed(path: Path, pair: KeyPair) -> Path:
    path.write_bytes(pair.seed + b"\n")
    path.chmod(0o600)
    return path


# =========================================================================== JWT / creds
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: dict[str, Any], signer: KeyPair) -> str:
    """A NATS JWT (v2): ``ed25519-nkey`` signed by ``signer``, ``jti`` the claims' hash."""
    nkeys = _nkeys()
    claims = {"iat": int(time.time()), **claims}
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    claims["jti"] = base64.b32encode(hashlib.sha512(body).digest()[:32]).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = nkeys.from_seed(bytearray(signer.seed)).sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


@dataclass
class Trust:
    """An operator and one account (with JetStream) that users are issued in."""

    operator: KeyPair
    account: KeyPair
    system: KeyPair
    operator_jwt: str
    account_jwt: str
    system_jwt: str

    def server_config(self) -> str:
        """The nats-server configuration (operator mode, in-memory resolver)."""
        return (f"operator: {self.operator_jwt}\n"
                f"system_account: {self.system.public}\n"
                "resolver: MEMORY\n"
                "resolver_preload: {\n"
                f"  {self.account.public}: {self.account_jwt}\n"
                f"  {self.system.public}: {self.system_jwt}\n"
                "}\n")

    def creds(self, path: Path, name: str, publish: list[str] | None = None,
              subscribe: list[str] | None = None) -> Path:
        """A credentials file for a new user ``name`` of the account."""
        user = new_keypair("user")
        nats: dict[str, Any] = {"type": "user", "version": 2, **UNLIMITED}
        if publish is not None:
            nats["pub"] = {"allow": publish}
        if subscribe is not None:
            nats["sub"] = {"allow": subscribe}
        jwt = _jwt({"iss": self.account.public, "sub": user.public, "name": name, "nats": nats},
                   self.account)
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n" + jwt + "\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            "-----BEGIN USER NKEY SEED-----\n" + user.seed.decode() +
            "\n------END USER NKEY SEED------\n")
        path.chmod(0o600)
        return path


def make_trust() -> Trust:
    operator, account, system = (new_keypair("operator"), new_keypair("account"),
                                 new_keypair("account"))
    op_jwt = _jwt({"iss": operator.public, "sub": operator.public, "name": "mlsysops-test",
                   "nats": {"type": "operator", "version": 2,
                            "system_account": system.public}}, operator)
    limits = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
              "leaf": -1}
    js = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    acc_jwt = _jwt({"iss": operator.public, "sub": account.public, "name": "mlsysops",
                    "nats": {"type": "account", "version": 2, "limits": {**limits, **js}}},
                   operator)
    sys_jwt = _jwt({"iss": operator.public, "sub": system.public, "name": "SYS",
                    "nats": {"type": "account", "version": 2, "limits": limits}}, operator)
    return Trust(operator, account, system, op_jwt, acc_jwt, sys_jwt)
