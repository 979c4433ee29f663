"""The ``rbee-node`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from typing import Sequence

from . import __version__
from .config import DEFAULT_PORT, data_dir, key_path
from .errors import RbeeError

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
rbee-node: one node of a peer-to-peer inference mesh.  Every machine runs the same
program; any node serves an OpenAI-compatible API and runs requests locally or on the
best peer.  State (identity key, audit log) lives in $RBEE_HOME (default
~/.local/share/rbee)."""


def _cmd_id(args: argparse.Namespace) -> int:
    from .store.keys import load_or_create_key

    key = load_or_create_key(key_path(data_dir()))
    print(key.peer_id_str)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    import logging

    import trio

    from .config import load_config, parse_model_arg
    from .node import run_node

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {"host": args.host, "port": args.port,
             "default_model": False if args.no_default_model else None,
             "models": [parse_model_arg(m) for m in args.model],
             "p2p_listen": args.p2p_listen or None, "peers": args.peer or None,
             "bootstrap": args.bootstrap or None, "swarm": args.swarm,
             "mdns": False if args.no_mdns else None, "dht": False if args.no_dht else None,
             "p2p": False if args.no_p2p else None, "jurisdiction": args.jurisdiction,
             "fake_models": args.fake_model or None,
             "allow_open": True if args.allow_open else None,
             "mdns_interfaces": args.mdns_interface or None}
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

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/rbee/status", timeout=10) as response:
            status: dict[str, Any] = json.load(response)
            return status
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
        print(f"  {p['id']}  {p['state']:<7}  models: {', '.join(p['models']) or '-'}  "
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
    print("models")
    for m in status["models"]:
        aliases = f" (also {', '.join(m['aliases'])})" if m.get("aliases") else ""
        context = f", context {m['context']}" if m["modality"] != "image" else ""
        print(f"  {m['name']}{aliases}: {m['modality']} on {m.get('device', '?')}{context}, "
              f"queue {m['queue_depth']}, active {m['active']}, "
              f"served {m['requests_served']}, digest {m['digest'][:16]}…")
    from .engines.hub import status_lines

    for line in status_lines(status):  # devices, images, models that did not fit
        print(line)
    return 0


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
    mesh.add_argument("--swarm", metavar="NAME", help="swarm name (default 'default')")
    mesh.add_argument("--jurisdiction", metavar="CODE",
                      help="what this node's advert claims, e.g. EU or US")
    mesh.add_argument("--no-mdns", action="store_true", help="no mDNS discovery on the LAN")
    mesh.add_argument("--mdns-interface", action="append", default=[], metavar="NAME",
                      help="announce and listen for mDNS only on this interface (repeatable)")
    mesh.add_argument("--no-dht", action="store_true", help="no Kademlia DHT discovery")
    mesh.add_argument("--no-p2p", action="store_true", help="no mesh at all: a lone node")
    p_start.add_argument("--fake-model", action="append", default=[],
                         metavar="NAME:TOKENS_PER_S",
                         help="(testing) also serve a scripted model at a fixed token rate")
    p_start.add_argument("-v", "--verbose", action="store_true", help="log more")
    p_start.set_defaults(func=_cmd_start)

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
    from .engines.hub import add_commands

    add_commands(sub)  # pull, devices
    from .audit_cli import add_commands as add_audit_commands

    add_audit_commands(sub)  # audit verify, export, erase, prune
    from .tenants_cli import add_commands as add_tenant_commands

    add_tenant_commands(sub)  # tenants add, list, remove, rotate-key
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
