"""The ``rbee-node`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from typing import Sequence

from .. import __version__
from ..config import DEFAULT_PORT, data_dir, key_path
from ..errors import ConfigError, RbeeError

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
rbee-node: one node of a peer-to-peer inference mesh.  Every machine runs the same
program; any node serves an OpenAI-compatible API and runs requests locally or on the
best peer.  State (identity key, audit log) lives in $RBEE_HOME (default
~/.local/share/rbee)."""


def _cmd_id(args: argparse.Namespace) -> int:
    from ..store.keys import load_or_create_key

    key = load_or_create_key(key_path(data_dir()))
    print(key.peer_id_str)
    return 0


def _cmd_invite(args: argparse.Namespace) -> int:
    """Print a token with which another machine joins this node's private swarm."""
    from ..config import load_config
    from ..mesh.host import psk_from_secret
    from ..store.keys import load_or_create_key
    from ..store.swarm import load_or_create_swarm_key, make_invite, swarm_id

    config = load_config(args.config)
    if config.swarm == "public":
        raise ConfigError("this node is in the open swarm (swarm = \"public\"): anyone may "
                          "join it, no invitation needed")
    peer = load_or_create_key(key_path(config.home)).peer_id_str
    if config.psk:
        key = psk_from_secret(config.psk)
    else:
        key, created = load_or_create_swarm_key(config.home)
        if created:
            print(f"created private swarm {swarm_id(key)}", file=sys.stderr)
    addrs = [a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in args.addr]
    if not addrs:
        from ..mesh.service import listen_addrs

        addrs = [f"{a}/p2p/{peer}" for a in listen_addrs(config.p2p_listen)]
    print(f"Invitation to private swarm {swarm_id(key)} (it holds the swarm's key: share it "
          "only with machines of yours).  On the other machine run:", file=sys.stderr)
    print(f"  rbee-node start --join {make_invite(key, addrs)}", file=sys.stderr)
    print(make_invite(key, addrs))
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    import logging

    import trio

    from ..config import load_config, parse_model_arg
    from ..node import run_node

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {"host": args.host, "port": args.port,
             "default_model": False if args.no_default_model else None,
             "models": [parse_model_arg(m) for m in args.model],
             "p2p_listen": args.p2p_listen or None, "peers": args.peer or None,
             "bootstrap": args.bootstrap or None, "swarm": args.swarm, "join": args.join,
             "mdns": False if args.no_mdns else None, "dht": False if args.no_dht else None,
             "p2p": False if args.no_p2p else None, "jurisdiction": args.jurisdiction,
             "fake_models": args.fake_model or None,
             "allow_open": True if args.allow_open else None,
             "mdns_interfaces": args.mdns_interface or None, "policy": args.policy,
             "pins": args.pin, "attested": args.attest}
    config = load_config(args.config, flags=flags)
    try:
        trio.run(run_node, config)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _fetch_status(url: str) -> dict[str, Any] | None:
    import json
    import urllib.error
    import urllib.request

    from ..tenancy.gate import admin_key

    import os

    headers = {}
    try:  # the node's own status needs its admin key once it has tenants
        key = os.environ.get("RBEE_ADMIN_KEY") or admin_key(data_dir())
    except OSError:
        key = None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    call = urllib.request.Request(f"{url.rstrip('/')}/rbee/status", headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=10) as response:
            status: dict[str, Any] = json.load(response)
            return status
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            print("rbee-node: the node has tenants, so its status needs its admin key: run "
                  "this where $RBEE_HOME/admin.key is readable, or set RBEE_ADMIN_KEY",
                  file=sys.stderr)
        else:
            print(f"rbee-node: the node at {url} answered {exc.code}", file=sys.stderr)
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"rbee-node: cannot reach a node at {url}: {exc}", file=sys.stderr)
        return None


def _cmd_peers(args: argparse.Namespace) -> int:
    import json

    status = _fetch_status(args.url)
    if status is None:
        return 1
    if args.json:
        print(json.dumps(status.get("peers", []), indent=2))
        return 0
    peers = status.get("peers", [])
    print(f"{len(peers)} peer(s) in swarm {status.get('swarm', '?')!r} seen by "
          f"{status['peer_id']}")
    for p in peers:
        rtt = p.get("latency_ms")
        latency = f"{rtt:.1f} ms" if rtt is not None else "- ms"
        print(f"  {p['id']}  {p['state']:<7}  {latency:>9}  "
              f"models: {', '.join(p['models']) or '-'}  "
              f"queue {p['queue_depth']}  active {p['active_jobs']}  "
              f"advert {p['last_advert_age_s']:.1f}s ago  {p['jurisdiction'] or ''}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    url = args.url.rstrip("/")
    status = _fetch_status(url)
    if status is None:
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"peer     {status['peer_id']}")
    print(f"version  {status['version']}")
    print(f"api      {status.get('url', url + '/v1')}")
    print(f"uptime   {status.get('uptime_s', 0):.0f}s")
    for addr in status.get("addrs", []):
        print(f"p2p      {addr}")
    print(f"peers    {len(status.get('peers', []))} (rbee-node peers for the list)")
    reach = status.get("reachability")
    if reach:
        seen = f", reached at {', '.join(reach['observed'])}" if reach["observed"] else ""
        asked = f" (by {reach['servers']} peer(s))" if reach["servers"] else " (not checked yet)"
        print(f"reach    {reach['status']}{asked}{seen}")
    policy = status.get("policy")
    if policy:
        extra = "" if "file" not in policy else (
            f" ({'loaded' if policy['loaded'] else 'NOT loaded: fastest decides'}; "
            f"{policy['decisions']} decisions, {policy['fallbacks']} by the fallback)")
        print(f"policy   {policy['policy']}{extra}")
        if policy.get("last_error"):
            print(f"         last error: {policy['last_error']['message']}")
    print("models")
    for m in status["models"]:
        aliases = f" (also {', '.join(m['aliases'])})" if m.get("aliases") else ""
        context = f", context {m['context']}" if m["modality"] != "image" else ""
        print(f"  {m['name']}{aliases}: {m['modality']} on {m.get('device', '?')}{context}, "
              f"queue {m['queue_depth']}, active {m['active']}, "
              f"served {m['requests_served']}, digest {m['digest'][:16]}…")
    from .pull import status_lines

    for line in status_lines(status):  # devices, images, models that did not fit
        print(line)
    return 0


def _json_arg(text: str, what: str) -> Any:
    """Inline JSON, or @FILE holding it.  Raises ConfigError."""
    import json

    try:
        if text.startswith("@"):
            text = Path(text[1:]).expanduser().read_text()
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--{what}: not JSON (or @FILE holding JSON): {exc}") from None


def _dry_run_input(args: argparse.Namespace) -> tuple[Any, Any]:
    """(RequestFacts, Snapshot) from the --request, --peers and --local arguments."""
    from ..routing import PeerFacts, RequestFacts, Snapshot

    try:
        request = RequestFacts.from_dict(_json_arg(args.request, "request"))
        items = _json_arg(args.peers, "peers")
        if not isinstance(items, list):
            raise ValueError("--peers must be a JSON list of peers")
        peers = [PeerFacts.from_dict(p) for p in items]
        local = None
        if args.local is not None:
            local = PeerFacts.from_dict({**_json_arg(args.local, "local"), "local": True})
        elif any(p.local for p in peers):
            local = next(p for p in peers if p.local)
        peers = [p for p in peers if not p.local]
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"bad dry-run input: {exc}") from None
    return request, Snapshot(local, tuple(peers))


def _cmd_policy_test(args: argparse.Namespace) -> int:
    """Exit status: 0 ranked, 1 rejected, 2 the policy failed (or bad input)."""
    import json
    import logging

    import trio

    from ..policy_runtime.runtime import PolicyRuntime, START_S
    from ..routing import Ranked
    from ..routing.script import ScriptError

    try:
        request, snapshot = _dry_run_input(args)
        runtime = PolicyRuntime(str(args.file), timeout_ms=args.timeout_ms)
    except ConfigError as exc:
        print(f"rbee-node: error: {exc}", file=sys.stderr)
        return 2

    async def dry_run() -> Any:
        with trio.fail_after(START_S + 3 * args.timeout_ms / 1000 + 2):
            async with runtime.opened():
                return await runtime.decide(request, snapshot)

    report: dict[str, Any] = {"policy": runtime.name}
    logger = logging.getLogger("rbee_p2p.policy_runtime.runtime")
    quiet, logger.disabled = logger.disabled, True  # the report says it all
    try:
        outcome = trio.run(dry_run)
    except ScriptError as exc:
        report.update(decision="error", error=exc.as_dict())
        outcome = None
    except (ConfigError, trio.TooSlowError) as exc:
        report.update(decision="error", error={"kind": "load", "message": str(exc) or
                                               "the dry run did not finish in time"})
        outcome = None
    finally:
        logger.disabled = quiet
    if outcome is not None:
        d = outcome.decision
        if outcome.error is not None:
            report.update(decision="error", error=outcome.error.as_dict())
        elif isinstance(d, Ranked):
            report.update(decision="ranked", candidates=list(d.candidates))
        else:
            report.update(decision="rejected", kind=d.kind, reason=d.reason)
        if outcome.raw is not None and isinstance(outcome.raw, Ranked):
            final = set(d.candidates) if isinstance(d, Ranked) else set()
            report["left_out"] = [i for i in outcome.raw.candidates if i not in final]
        report["ms"] = round(outcome.ms, 3)
        if outcome.fallback:
            fb = outcome.decision
            report["fallback"] = ({"policy": fb.policy, "candidates": list(fb.candidates)}
                                  if isinstance(fb, Ranked) else
                                  {"policy": fb.policy, "rejected": fb.reason})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_dry_run(report)
    return {"ranked": 0, "rejected": 1}.get(report["decision"], 2)


def _print_dry_run(r: dict[str, Any]) -> None:
    if r["decision"] == "ranked":
        print(f"ranked by {r['policy']} in {r['ms']:.1f} ms:")
        for i, pid in enumerate(r["candidates"], 1):
            print(f"  {i}. {pid}")
    elif r["decision"] == "rejected":
        print(f"rejected ({r['kind']}) by {r['policy']}: {r['reason']}")
    else:
        e = r["error"]
        where = ":".join(str(x) for x in (e.get("file"), e.get("line"), e.get("column"))
                         if x) if e.get("file") and e.get("line") else e.get("file", "")
        print(f"error ({e['kind']}) in {where or r['policy']}: {e['message']}")
        if e.get("detail"):
            print("  " + e["detail"].rstrip().replace("\n", "\n  "))
    if r.get("left_out"):
        print(f"left out (not eligible: model, room or the tenant's residency): "
              f"{', '.join(r['left_out'])}")
    fb = r.get("fallback")
    if fb is not None:
        what = ", ".join(fb["candidates"]) if "candidates" in fb else f"rejected: {fb['rejected']}"
        print(f"the node would route this request by {fb['policy']} instead: {what}")


def _add_policy_commands(sub: Any) -> None:
    p_policy = sub.add_parser("policy", help="routing policies: dry-run one (policy test)")
    p_policy.set_defaults(func=lambda args: (p_policy.print_help(), 2)[1])
    actions = p_policy.add_subparsers(dest="action", metavar="ACTION")
    p_test = actions.add_parser(
        "test", help="dry-run a policy on given facts and print its decision",
        description="Run a routing policy (a Starlark file, or a built-in's name) on a "
                    "request and peers given as JSON (the keys a policy sees; see "
                    "node/policies/README.md), as the node would: eligibility and "
                    "residency apply around it.  Prints the ranking, the rejection, or the "
                    "error with its line.  Exit status: 0 ranked, 1 rejected, 2 error.")
    p_test.add_argument("file", metavar="FILE", help="the policy: a .star file or a built-in")
    p_test.add_argument("--request", required=True, metavar="JSON",
                        help='e.g. \'{"model": "llama-8b", "tenant": {"id": "acme", '
                             '"tier": "enterprise"}}\' (or @FILE)')
    p_test.add_argument("--peers", required=True, metavar="JSON",
                        help='a list of peers, e.g. \'[{"id": "a", "models": ["llama-8b"], '
                             '"queue_depth": 2}]\' (or @FILE)')
    p_test.add_argument("--local", metavar="JSON",
                        help="this node, the same way (default: the peer with \"local\": true)")
    p_test.add_argument("--timeout-ms", type=int, default=50, metavar="MS",
                        help="the decision's deadline, as the node's policy_timeout_ms "
                             "(default 50)")
    p_test.add_argument("--json", action="store_true", help="print JSON for scripts")
    p_test.set_defaults(func=_cmd_policy_test)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbee-node", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"rbee-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_id = sub.add_parser("id", help="print this node's peer ID (creating the identity if needed)")
    p_id.set_defaults(func=_cmd_id)

    p_start = sub.add_parser(
        "start", help="run a node: serve the OpenAI API (default http://127.0.0.1:7833/v1)",
        description="Run a node until Ctrl-C.  Settings: defaults < TOML config "
                    "(--config, default $RBEE_HOME/rbee-node.toml) < RBEE_* environment "
                    "variables < these flags.")
    p_start.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    p_start.add_argument("--host", metavar="H", help="HTTP address (default 127.0.0.1)")
    p_start.add_argument("--port", type=int, metavar="P", help=f"HTTP port (default {DEFAULT_PORT})")
    p_start.add_argument("--model", action="append", default=[], metavar="PATH|NAME=PATH",
                         help="a model to serve (repeatable): a GGUF file (text), a diffusers "
                              "folder or .safetensors checkpoint (images); the name defaults "
                              "to the file's stem")
    p_start.add_argument("--no-default-model", action="store_true",
                         help="do not serve the embedded SmolLM2-135M model")
    p_start.add_argument("--allow-open", action="store_true",
                         help="serve without API keys on a non-loopback --host (default: "
                              "refused until a tenant exists; see `rbee-node tenants`)")
    mesh = p_start.add_argument_group("mesh")
    mesh.add_argument("--p2p-listen", action="append", default=[], metavar="MULTIADDR",
                      help="libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/7834)")
    mesh.add_argument("--peer", action="append", default=[], metavar="MULTIADDR",
                      help="a static peer, /ip4/…/tcp/…/p2p/<id> (repeatable)")
    mesh.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                      help="a DHT bootstrap node (repeatable)")
    mesh.add_argument("--swarm", choices=("private", "public"),
                      help="private (default: members only, a swarm key in $RBEE_HOME) or "
                           "public (the open swarm: strangers under per-peer limits)")
    mesh.add_argument("--join", metavar="TOKEN",
                      help="join the private swarm of an invitation (`rbee-node invite`)")
    mesh.add_argument("--jurisdiction", metavar="CODE",
                      help="what this node's advert claims, e.g. EU or US")
    mesh.add_argument("--attest", action="append", default=[], metavar="PEER=CODE",
                      help="vouch that a peer runs in a jurisdiction (repeatable): residency "
                           "rules trust only attested peers, never an advert alone")
    mesh.add_argument("--no-mdns", action="store_true", help="no mDNS discovery on the LAN")
    mesh.add_argument("--mdns-interface", action="append", default=[], metavar="NAME",
                      help="announce and listen for mDNS only on this interface (repeatable)")
    mesh.add_argument("--no-dht", action="store_true", help="no Kademlia DHT discovery")
    mesh.add_argument("--no-p2p", action="store_true", help="no mesh at all: a lone node")
    p_start.add_argument("--policy", metavar="NAME|FILE",
                         help="routing policy: a built-in (fastest, least_loaded, "
                              "lowest_latency, cheapest, local_only) or a Starlark file; "
                              "default fastest")
    p_start.add_argument("--pin", action="append", default=[], metavar="MODEL=PEER|DEVICE",
                         help="run MODEL only on that peer id, device (cuda:0) or device name "
                              "(H100); with a built-in policy (repeatable)")
    p_start.add_argument("--fake-model", action="append", default=[],
                         metavar="NAME:TOKENS_PER_S",
                         help="(testing) also serve a scripted model at a fixed token rate")
    p_start.add_argument("-v", "--verbose", action="store_true", help="log more")
    p_start.set_defaults(func=_cmd_start)

    p_invite = sub.add_parser(
        "invite", help="print an invitation for another machine to join this private swarm",
        description="Print a token carrying this private swarm's key and this node's "
                    "addresses; `rbee-node start --join TOKEN` on another machine makes it a "
                    "member.  The token is the swarm's secret: share it only with your own "
                    "machines.")
    p_invite.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    p_invite.add_argument("--addr", action="append", default=[], metavar="MULTIADDR",
                          help="an address the other machine can dial (repeatable; default: "
                               "this node's p2p listen addresses)")
    p_invite.set_defaults(func=_cmd_invite)

    p_peers = sub.add_parser("peers", help="list the peers a running node sees")
    p_peers.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                         help="the node's base URL")
    p_peers.add_argument("--json", action="store_true", help="print JSON for scripts")
    p_peers.set_defaults(func=_cmd_peers)

    p_status = sub.add_parser("status", help="show a running node's status")
    p_status.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                          help="the node's base URL")
    p_status.add_argument("--json", action="store_true", help="print JSON for scripts")
    p_status.set_defaults(func=_cmd_status)
    from .pull import add_commands

    add_commands(sub)  # pull, devices
    from .audit import add_commands as add_audit_commands

    add_audit_commands(sub)  # audit verify, export, erase, prune
    from .tenants import add_commands as add_tenant_commands

    add_tenant_commands(sub)  # tenants add, list, remove, rotate-key
    _add_policy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except RbeeError as exc:
        print(f"rbee-node: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # raised inside the node's nurseries
        leaves = list(_leaves(group))
        if not leaves or not all(isinstance(e, RbeeError) for e in leaves):
            raise
        for exc in leaves:
            print(f"rbee-node: error: {exc}", file=sys.stderr)
        return 1


def _leaves(group: BaseExceptionGroup[Any]) -> Any:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


if __name__ == "__main__":
    sys.exit(main())
