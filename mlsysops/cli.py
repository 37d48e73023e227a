"""The ``mlsysops`` command: run the loop locally, publish descriptions, look inside.

- ``mlsysops up``: an embedded nats-server (unless a NATS URL is given) and the five
  services as separate processes; Ctrl-C stops all of it.
- ``mlsysops publish app|cluster|node FILE`` and ``mlsysops delete KIND NAME``.
- ``mlsysops status`` and ``mlsysops plans [--follow]``, each with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mlsysops import settings as settings_mod
from mlsysops.errors import BadInput

SERVICES = ("monitor", "analyzer", "planner", "scheduler", "executor")
NAME_FIELDS = {"app": ("MLSysOpsApp", "name"), "cluster": ("MLSysOpsCluster", "cluster_id"),
               "node": ("MLSysOpsNode", "name")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        sys.exit(2)
    try:
        cfg = settings_mod.load(args)
    except BadInput as exc:
        print(f"mlsysops: {exc}", file=sys.stderr)
        sys.exit(2)
    from mlsysops import logs

    logs.configure(cfg.log_format, "warning" if args.command != "up" else cfg.log_level,
                   service="cli")
    try:
        code = args.handler(args, cfg)
    except BadInput as exc:
        print(f"mlsysops: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    from mlsysops import local

    parser = argparse.ArgumentParser(prog="mlsysops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    up = _command(sub, "up", "run the whole loop on this machine", local.cmd_up)
    up.add_argument("--data-dir", default=".mlsysops", help="embedded nats-server store")
    up.add_argument("--nats-port", type=int, default=4222, help="port of the embedded server")
    up.add_argument("--replicas", default="", help="e.g. analyzer=2,planner=2")
    up.add_argument("--publish", action="append", default=[], metavar="PATH",
                    help="publish the descriptions in PATH (file or directory) once running")

    _command(sub, "init", "create or change the streams and buckets to the settings, "
             "reporting each difference", cmd_init)

    pub = _command(sub, "publish", "publish a description", cmd_publish)
    pub.add_argument("kind", choices=[*sorted(NAME_FIELDS), "energy"])
    pub.add_argument("file", help="YAML or JSON description ('-' for stdin)")
    pub.add_argument("--name", help="name to publish under (default: from the document)")

    rm = _command(sub, "delete", "delete a description", cmd_delete)
    rm.add_argument("kind", choices=sorted(NAME_FIELDS))
    rm.add_argument("name")

    trig = _command(sub, "trigger", "run a policy for an application now", cmd_trigger)
    trig.add_argument("policy")
    trig.add_argument("app", help="application name (_global for a global policy)")
    trig.add_argument("--params", default="{}", help="JSON object handed to plan()")

    _command(sub, "status", "apps, policies, mechanisms, claims and services", _inspect("status"))

    plans = _command(sub, "plans", "each plan's trace: verdict, plan, decision, result",
                     _inspect("plans"))
    plans.add_argument("--follow", action="store_true", help="keep printing new events")
    plans.add_argument("--app", help="only this application")
    plans.add_argument("--wait", type=float, default=0.0,
                       help="exit 0 once a plan (for --app) exists, 1 after this many seconds")
    return parser


def _command(sub: Any, name: str, help: str, handler: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    settings_mod.add_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handler)
    return p


def _inspect(what: str) -> Any:
    def handler(args: argparse.Namespace, cfg: settings_mod.Settings) -> int:
        from mlsysops import observe as inspect_mod

        return asyncio.run(getattr(inspect_mod, what)(args, cfg))

    return handler


# ---------------------------------------------------------------- the layout
def cmd_init(args: argparse.Namespace, cfg: settings_mod.Settings) -> int:
    """Create the layout, or change it to the settings; print each change."""
    return asyncio.run(init(cfg, as_json=args.json))


async def init(cfg: settings_mod.Settings, *, as_json: bool = False) -> int:
    import nats.js.errors

    from mlsysops.bus import Bus

    bus = Bus(cfg, "init")
    try:
        await asyncio.wait_for(bus.connect(mode="init"), 30)
    except TimeoutError:
        raise BadInput(f"cannot connect to NATS at {settings_mod.redact_url(cfg.nats_url)} "
                       "within 30 s") from None
    except nats.js.errors.APIError as exc:  # e.g. no room in the store, no peers yet
        raise BadInput(f"JetStream refused the layout: {exc.description} (error "
                       f"{exc.err_code}); on a cluster still forming, run it again") from None
    finally:
        await bus.close()
    if as_json:
        print(json.dumps([{"name": c.name, "action": c.action, "fields": {
            k: list(v) for k, v in c.fields.items()}} for c in bus.changes], default=str))
    else:
        for change in bus.changes:
            print(change)
        print(f"layout under prefix {cfg.prefix!r}: " + (
            f"{len(bus.changes)} change(s)" if bus.changes else "as the settings say"))
    return 1 if any(c.action == "cannot change" for c in bus.changes) else 0


# ---------------------------------------------------------------- publishing
def guess_name(kind: str, payload: bytes) -> str:
    """The name a description document gives itself (for the subject)."""
    try:
        doc = yaml.safe_load(payload)
    except yaml.YAMLError as exc:
        raise BadInput(f"not YAML or JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadInput("the description must be a mapping")
    top, field = NAME_FIELDS[kind]
    body = doc.get(top) if top in doc else doc
    name = body.get(field) if isinstance(body, dict) else None
    name = name or (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise BadInput(f"cannot tell the {kind}'s name: give {top}.{field} or use --name")
    return name


def cmd_publish(args: argparse.Namespace, cfg: settings_mod.Settings) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    if args.kind == "energy" and not args.name:
        raise BadInput("an energy profile needs --name (the node or cluster it describes)")
    name = args.name or guess_name(args.kind, data)
    return asyncio.run(publish(cfg, args.kind, name, data, as_json=args.json))


def cmd_delete(args: argparse.Namespace, cfg: settings_mod.Settings) -> int:
    return asyncio.run(publish(cfg, args.kind, args.name, b"", as_json=args.json))


def cmd_trigger(args: argparse.Namespace, cfg: settings_mod.Settings) -> int:
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        raise BadInput(f"--params is not JSON: {exc}") from None
    from mlsysops.subjects import Subjects, check_token

    check_token("policy", args.policy)
    check_token("app", args.app)
    subject = Subjects(cfg.prefix).trigger(args.policy, args.app)
    return asyncio.run(_request(cfg, subject, json.dumps({"params": params}).encode(),
                                as_json=args.json, render=_describe_trigger))


def _describe_trigger(reply: dict[str, Any]) -> str:
    if reply.get("accepted"):
        return f"triggered: verdict {reply['verdict_id']}"
    return f"REFUSED: {reply.get('error')}"


async def publish(cfg: settings_mod.Settings, kind: str, name: str, data: bytes, *,
                  as_json: bool = False, timeout: float = 10.0) -> int:
    from mlsysops.subjects import Subjects, check_token

    check_token(kind, name)
    subject = Subjects(cfg.prefix).desc(kind, name)
    return await _request(cfg, subject, data, as_json=as_json, render=_describe_reply,
                          timeout=timeout, outcome=Subjects(cfg.prefix).desc_result(kind, name),
                          unanswered=(
                              "the description is kept in the intake stream and taken in when "
                              f"a monitor runs; its outcome is announced on "
                              f"{Subjects(cfg.prefix).desc_result(kind, name)}"))


async def _request(cfg: settings_mod.Settings, subject: str, data: bytes, *, as_json: bool,
                   render: Any, timeout: float = 10.0, unanswered: str = "",
                   outcome: str = "") -> int:
    import nats

    from mlsysops.bus import connect_options

    opts = connect_options(cfg)
    opts["max_reconnect_attempts"] = 0

    async def quiet(exc: Exception) -> None:
        return None

    try:
        nc = await asyncio.wait_for(nats.connect(**opts, error_cb=quiet), 5)
    except (Exception, TimeoutError) as exc:
        print(f"mlsysops: cannot connect to NATS at {settings_mod.redact_url(cfg.nats_url)}: "
              f"{exc or 'no answer within 5 s'}", file=sys.stderr)
        return 4
    try:
        raw = await _ask(nc, subject, data, timeout, outcome)
    except nats.errors.NoRespondersError:
        print(f"mlsysops: nothing is listening on {subject} (is the loop running?)",
              file=sys.stderr)
        return 3
    except nats.errors.TimeoutError:
        print(f"mlsysops: no answer on {subject} within {timeout:g} s (is the loop running?)"
              + (f"; {unanswered}" if unanswered else ""), file=sys.stderr)
        return 5
    finally:
        await nc.close()
    reply = json.loads(raw)
    print(json.dumps(reply, indent=2) if as_json else render(reply))
    return 0 if reply.get("accepted") else 1


async def _ask(nc: Any, subject: str, data: bytes, timeout: float, outcome: str) -> bytes:
    """The reply to a request; with ``outcome``, also an outcome announced there for this
    payload, whichever comes first (a request that reached the intake stream before any
    monitor listened is taken in, but only announced)."""
    import nats

    from mlsysops.wire import payload_digest

    if not outcome:
        return bytes((await nc.request(subject, data, timeout=timeout)).data)
    announced: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    digest = payload_digest(data)

    async def on_outcome(msg: Any) -> None:
        if not announced.done() and json.loads(msg.data).get("digest") == digest:
            announced.set_result(bytes(msg.data))

    sub = await nc.subscribe(outcome, cb=on_outcome)
    asked = asyncio.ensure_future(nc.request(subject, data, timeout=timeout))
    try:
        await asyncio.wait({asked, announced}, return_when=asyncio.FIRST_COMPLETED)
        if announced.done():
            return announced.result()
        try:
            return bytes(asked.result().data)
        except nats.errors.TimeoutError:
            if announced.done():
                return announced.result()
            raise
    finally:
        asked.cancel()
        await asyncio.gather(asked, return_exceptions=True)
        await sub.unsubscribe()


def _describe_reply(reply: dict[str, Any]) -> str:
    verb = "deleted" if reply.get("deleted") else "accepted"
    outcome = verb if reply["accepted"] else "QUEUED" if reply.get("queued") else "REJECTED"
    head = f"{reply['kind']} {reply['name']}: {outcome}"
    lines = [head]
    lines += [f"  error   {e['path']}: {e['message']}" for e in reply.get("errors", [])]
    lines += [f"  warning {w['path']}: {w['message']}" for w in reply.get("warnings", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
