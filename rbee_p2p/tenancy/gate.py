"""The door: API keys -> tenants, per-tenant quotas, and what a request carries onward.

With no tenants configured the node is open (the local user, on 127.0.0.1); once one
tenant exists every /v1 request needs a valid key, and the node's own status
(``/rbee/status``: tenants' usage, model paths, peers) needs the admin key, which the node
keeps in ``$RBEE_HOME/admin.key`` (0600; ``rbee-node status`` on the same machine reads
it).  A source that presents more than :data:`GUESSES_PER_MIN` wrong keys in a minute gets
429 until the minute is over.  The tenants file is re-read when it changes (`rbee-node
tenants ...` while the node runs), at most once a second.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..dispatch import Stamp
from ..errors import ConfigError, QuotaExceeded, Unauthorized
from ..store.audit_read import content_path
from .tenants import Quotas, Tenant, TenantBook

__all__ = ["Gate", "Pass", "admin_key", "ADMIN_KEY_FILE", "GUESSES_PER_MIN"]

log = logging.getLogger(__name__)
ADMIN_KEY_FILE = "admin.key"
GUESSES_PER_MIN = 20  # wrong keys from one source a minute before it must wait
MAX_SOURCES = 4096  # sources whose wrong keys are counted at once


def admin_key(home: Path, *, create: bool = False) -> str | None:
    """The node's admin key (``home/admin.key``, made 0600 on first use if ``create``)."""
    path = home / ADMIN_KEY_FILE
    if not path.exists():
        if not create:
            return None
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("rbee-admin-" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


@dataclass
class Pass:
    """One admitted request: who sent it and what travels with it to the executing node."""

    tenant: Tenant | None
    stamp: Stamp
    finished: bool = False
    streaming: bool = False  # the response outlives the handler: the stream finishes it
    reserved: int = 0  # tokens held against the tenant's daily quota until it finishes

    @property
    def keeps_content(self) -> bool:
        return self.tenant is not None and self.tenant.content_logging


class Gate:
    def __init__(self, home: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.clock = clock
        self.book = TenantBook.open(home) if home is not None else None
        self.quotas = Quotas()
        self.unauthorized = 0
        self.guesses_refused = 0
        self._guesses: dict[str, tuple[float, int]] = {}  # source -> (minute began, wrong)
        self._checked = 0.0
        self._admin = admin_key(home, create=True) if home is not None else None

    @property
    def open(self) -> bool:
        return self.book is None or len(self.book) == 0

    def _refresh(self) -> None:
        now = self.clock()
        if self.book is None or self.home is None or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self.book.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = 0
        if mtime != self.book.mtime_ns:
            try:
                self.book = TenantBook.open(self.home)
                log.info("tenants reloaded: %d", len(self.book))
            except ConfigError as exc:  # keep serving with the tenants we had
                log.error("tenants file not reloaded: %s", exc)
                self.book.mtime_ns = mtime

    def authenticate(self, authorization: str | None, source: str = "") -> Tenant | None:
        """The caller's tenant (None on an open node).  Raises Unauthorized, or
        QuotaExceeded for a source that has guessed too many keys this minute."""
        self._refresh()
        if self.open:
            return None
        assert self.book is not None
        self._check_guesses(source)
        try:
            return self.book.authenticate(_bearer(authorization))
        except Unauthorized:
            self._wrong(source, authorization)
            raise

    def authorize_admin(self, authorization: str | None, source: str = "") -> None:
        """The node's own status: anyone on an open node; else only with the admin key.
        Raises Unauthorized or QuotaExceeded (as :meth:`authenticate`)."""
        self._refresh()
        if self.open:
            return
        self._check_guesses(source)
        presented = (_bearer(authorization) or "").encode()
        if self._admin is None or not hmac.compare_digest(presented, self._admin.encode()):
            self._wrong(source, authorization)
            raise Unauthorized("this node has tenants: its status needs the admin key "
                               f"($RBEE_HOME/{ADMIN_KEY_FILE}) as 'Authorization: Bearer KEY'")

    def _check_guesses(self, source: str) -> None:
        start, wrong = self._guesses.get(source, (0.0, 0))
        now = self.clock()
        if wrong >= GUESSES_PER_MIN and now - start < 60:
            self.guesses_refused += 1
            raise QuotaExceeded(f"too many wrong API keys from {source or 'this source'}; "
                                "try again in a minute", retry_after=max(1.0, start + 60 - now))

    def _wrong(self, source: str, authorization: str | None) -> None:
        self.unauthorized += 1
        if not authorization:
            return  # no key at all is not a guess (a client that forgot it)
        now = self.clock()
        start, wrong = self._guesses.get(source, (now, 0))
        if now - start >= 60:
            start, wrong = now, 0
        if source not in self._guesses and len(self._guesses) >= MAX_SOURCES:
            self._guesses.clear()
        self._guesses[source] = (start, wrong + 1)

    def admit(self, tenant: Tenant | None, model: str, reserve: int = 0,
              prompt: int = 0) -> Pass:
        """Check the tenant's model list and quotas for one request expected to use
        ``reserve`` tokens (``prompt`` of them its input).  Raises Forbidden or
        QuotaExceeded (counted per tenant)."""
        if tenant is None:
            return Pass(None, Stamp())
        held = self.quotas.admit(tenant, model, self.clock(), reserve, prompt)
        return Pass(tenant, Stamp(tenant_ref=self.ref(tenant), tenant=tenant.facts),
                    reserved=held)

    def ref(self, tenant: Tenant) -> bytes:
        assert self.book is not None
        return self.book.ref(tenant.name)

    def refused(self, tenant: Tenant | None, status: int) -> None:
        if tenant is not None:
            self.quotas.refused(tenant, status)

    def finish(self, admitted: Pass, tokens: int) -> None:
        """The request is over (any way): free its slot, count its tokens.  Idempotent."""
        if admitted.finished or admitted.tenant is None:
            return
        admitted.finished = True
        self.quotas.finish(admitted.tenant, tokens, self.clock(), admitted.reserved)

    def log_content(self, admitted: Pass, request_id: bytes, prompt: Any, output: str) -> None:
        """Keep the text of a request, only for tenants that enabled content logging; the
        file lives outside the audit chain so erasure can delete it."""
        ref = admitted.stamp.tenant_ref
        if not admitted.keeps_content or self.home is None or ref is None:
            return
        path = content_path(self.home, ref)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        line = json.dumps({"request_id": request_id.hex(), "time": int(self.clock()),
                           "prompt": prompt, "completion": output}, ensure_ascii=False)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")

    def status(self) -> dict[str, Any]:
        return {"open": self.open, "tenants": len(self.book or ()),
                "unauthorized": self.unauthorized, "guesses_refused": self.guesses_refused,
                "usage": self.quotas.status()}


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None
