"""The rbee-p2p error tree: one root, documented once.

``RbeeError``
  ``ProtocolError`` and its reasons (``rbee_p2p.protocol.errors``): bad input from peers
  ``ConfigError``: the user's configuration or environment is unusable
    ``KeyFileError``: the node key file is unsafe or unreadable (never silently replaced)
  ``StorageError``: a local store (audit log) is corrupt or locked
"""

from __future__ import annotations

from .protocol.errors import *  # noqa: F401,F403  (re-export the protocol part of the tree)
from .protocol.errors import RbeeError
from .protocol.errors import __all__ as _protocol_all

__all__ = [*_protocol_all, "ConfigError", "KeyFileError", "StorageError"]


class ConfigError(RbeeError):
    """The configuration, a flag or the environment is unusable; the message says how to fix it."""


class KeyFileError(ConfigError):
    """The node key file is readable by others, or corrupted.  Never replaced silently."""


class StorageError(RbeeError):
    """A local store is corrupt beyond a torn final record, or locked by another process."""
