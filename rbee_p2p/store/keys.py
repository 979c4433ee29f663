"""The node's identity key on disk: created once, mode 0600, never silently replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import KeyFileError
from ..protocol.identity import NodeKey

__all__ = ["load_or_create_key"]


def _create(path: Path) -> NodeKey:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = NodeKey.generate()
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    # link() fails if another process created the key meanwhile: then use theirs.
    try:
        os.link(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        return _load(path)
    os.unlink(tmp)
    return key


def _load(path: Path) -> NodeKey:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is accessible by other users (mode {stat.filemode(mode)}); "
            f"run `chmod 600 {path}` and start again"
        )
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{path} is not a valid node key ({exc}); restore it from a backup, or move it "
            "away to create a new identity (peers will see a new node)"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(private).__name__}, not an Ed25519 key")
    return NodeKey(private)


def load_or_create_key(path: Path) -> NodeKey:
    """The node key at ``path``, created (0600, in a 0700 directory) on first use.

    Raises :class:`KeyFileError` if the file is readable by others or corrupted.
    """
    if path.exists():
        return _load(path)
    return _create(path)
