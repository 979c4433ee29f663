"""The one request path: a typed ``Request`` (request.py) from any entry → tenant stamp →
routing policy → this node's engines (local.py) or a peer through the mesh → failover
before the first output → receipts and audit (dispatcher.py)."""

from .dispatcher import Dispatcher, Failover, Remote, Router, builtin_router, request_facts
from .local import LocalJob
from .request import KINDS, Job, Kind, Request, Stamp

__all__ = ["Dispatcher", "Failover", "Remote", "Router", "builtin_router", "request_facts",
           "LocalJob", "Job", "Kind", "KINDS", "Request", "Stamp"]
