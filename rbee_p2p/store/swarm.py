"""The private swarm's secret on disk, and the invitation that carries it to a new machine.

A plain ``rbee-node start`` forms a private swarm: the first start creates a 256-bit
pre-shared key (libp2p pnet) in ``$RBEE_HOME/swarm.key`` (mode 0600).  Only nodes that hold
it can even finish a connection to ours.  ``rbee-node invite`` prints a token carrying the
key and this node's addresses; ``rbee-node start --join TOKEN`` on another machine stores
the key (and the addresses, in ``swarm.peers``, dialed as static peers) and is then a
member.  The token *is* the swarm's secret: whoever holds it can join.

The swarm's public name (its GossipSub topic, DHT rendezvous key and mDNS label) is a hash
of the key under its own label, so it tells a stranger nothing about the key, and mDNS on a
LAN finds only the nodes of one's own swarm.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from pathlib import Path

from ..errors import ConfigError

__all__ = ["load_or_create_swarm_key", "swarm_id", "make_invite", "read_invite", "join",
           "joined_peers", "KEY_FILE", "PEERS_FILE", "INVITE_PREFIX", "MAX_INVITE_PEERS"]

KEY_FILE = "swarm.key"
PEERS_FILE = "swarm.peers"
INVITE_PREFIX = "rbee-invite-1:"
MAX_INVITE_PEERS = 16  # addresses an invitation carries (and a join accepts)
MAX_ADDR = 256  # bytes of one address


def swarm_id(psk_hex: str) -> str:
    """The swarm's public name: 16 hex digits of a labelled hash of its key."""
    return hashlib.sha256(b"rbee-p2p/swarm-id/v1\0" + bytes.fromhex(psk_hex)).hexdigest()[:16]


def _write_0600(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _check_hex(text: str, where: object, hint: str = "restore it, or join again with "
               "`rbee-node start --join TOKEN`") -> str:
    key = text.strip().lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ConfigError(f"{where} does not hold a swarm key (64 hex digits); {hint}")
    return key


def load_or_create_swarm_key(home: Path) -> tuple[str, bool]:
    """(the key as 64 hex digits, whether it was created now).  Raises ConfigError if the
    file is readable by others or damaged."""
    path = home / KEY_FILE
    if not path.exists():
        key = secrets.token_hex(32)
        _write_0600(path, key + "\n")
        return key, True
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is accessible by other users (mode {stat.filemode(mode)}); "
                          f"run `chmod 600 {path}`")
    return _check_hex(path.read_text(), path), False


def make_invite(psk_hex: str, addrs: list[str]) -> str:
    """A token with the key and up to :data:`MAX_INVITE_PEERS` addresses (``/p2p/<id>``)."""
    body = "\n".join([psk_hex, *addrs[:MAX_INVITE_PEERS]]).encode()
    return INVITE_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def read_invite(token: str) -> tuple[str, list[str]]:
    """(key, addresses) from a token.  Raises ConfigError for anything malformed."""
    token = token.strip()
    if not token.startswith(INVITE_PREFIX) or len(token) > 8192:
        raise ConfigError(f"not an rbee invitation (they start with {INVITE_PREFIX!r}; "
                          "make one with `rbee-node invite` on a node of the swarm)")
    data = token[len(INVITE_PREFIX):]
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True)
        lines = raw.decode().split("\n")
    except (binascii.Error, ValueError):
        raise ConfigError("the invitation is damaged (copy all of it)") from None
    key = _check_hex(lines[0], "the invitation", "make a new one with `rbee-node invite`")
    addrs = [a for a in lines[1:] if a]
    if len(addrs) > MAX_INVITE_PEERS or any(
            len(a) > MAX_ADDR or not a.startswith("/") or "/p2p/" not in a for a in addrs):
        raise ConfigError("the invitation's addresses are malformed")
    return key, addrs


def join(home: Path, token: str) -> tuple[str, str | None]:
    """Store the invitation's key and addresses under ``home``; returns (the new swarm's
    id, the id of the swarm this node leaves, if it was in another).  The old key is kept
    as ``swarm.key.old``.  Raises ConfigError."""
    key, addrs = read_invite(token)
    path = home / KEY_FILE
    left = None
    if path.exists():
        old, _ = load_or_create_swarm_key(home)
        if old != key:
            left = swarm_id(old)
            _write_0600(home / (KEY_FILE + ".old"), old + "\n")
    _write_0600(path, key + "\n")
    _write_0600(home / PEERS_FILE, "".join(a + "\n" for a in addrs))
    return swarm_id(key), left


def joined_peers(home: Path) -> tuple[str, ...]:
    """The addresses stored by the last join (none if the node never joined)."""
    path = home / PEERS_FILE
    if not path.exists():
        return ()
    lines = path.read_text().split()
    return tuple(a for a in lines[:MAX_INVITE_PEERS] if a.startswith("/") and "/p2p/" in a)
