"""The one request path: a typed ``Request`` (request.py) from any entry → tenant stamp →
routing policy and failover before the first output (dispatcher.py) → this node's engines
(local.py, which writes the entry audit record) or a peer through the mesh (mesh/remote.py
checks its receipt and records it)."""

from .dispatcher import Dispatcher, Failover, Remote, Router, builtin_router, request_facts
from .local import LocalJob
from .request import Job, Kind, Request, Stamp

__all__ = ["Dispatcher", "Failover", "Remote", "Router", "builtin_router", "request_facts",
           "LocalJob", "Job", "Kind", "Request", "Stamp"]
