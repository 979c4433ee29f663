"""Tenants: API keys, tiers, allowed models, quotas and residency.

Stored in ``$RBEE_HOME/tenants.json`` (mode 0600).  A key is shown once when created and
kept only as its sha256 (keys are 256 random bits, so a plain hash is enough); a presented
key is compared against every stored hash in constant time.  Peers never see a key or a
tenant's name: a forwarded request carries :meth:`TenantBook.ref` — an HMAC of the name
under a secret of this node — so the executing peer can audit and apply its own acceptance
policy per tenant without learning who it is.

Quotas (:class:`Quotas`) take ``now`` from the caller (tests drive a fake clock).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, Forbidden, QuotaExceeded, Unauthorized
from ..routing import TenantFacts

__all__ = ["Tenant", "TenantBook", "Quotas", "tenant_ref", "KEY_PREFIX"]

KEY_PREFIX = "rbee-"
FILE = "tenants.json"
DAY_S = 86_400


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hash: str  # sha256 of the API key, hex
    key_hint: str  # the key's first characters, to tell keys apart in listings
    tier: str = "default"
    residency: str | None = None  # e.g. "EU": requests run only on nodes claiming it
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None  # requests per minute
    tokens_per_day: int | None = None  # prompt + completion tokens per UTC day
    concurrent: int | None = None  # requests in flight at once
    content_logging: bool = False  # keep prompts and completions (off: metadata only)

    @property
    def facts(self) -> TenantFacts:
        return TenantFacts(id=self.name, tier=self.tier, residency=self.residency)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def tenant_ref(ref_key: bytes, name: str) -> bytes:
    """The keyed hash peers see instead of the tenant (32 bytes)."""
    return hmac.new(ref_key, b"rbee-tenant\x00" + name.encode(), hashlib.sha256).digest()


class TenantBook:
    """The tenants file: load, look keys up, change and save (atomically, 0600)."""

    def __init__(self, path: Path, ref_key: bytes, tenants: dict[str, Tenant]) -> None:
        self.path = path
        self.ref_key = ref_key
        self.tenants = tenants
        self.mtime_ns = 0

    @classmethod
    def open(cls, home: Path) -> TenantBook:
        """The book under ``home`` (empty, with a fresh HMAC secret, if there is none).
        Raises ConfigError if the file is unreadable, malformed or readable by others."""
        path = home / FILE
        if not path.exists():
            return cls(path, secrets.token_bytes(32), {})
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path} is accessible by other users (mode "
                              f"{stat.filemode(mode)}); run `chmod 600 {path}`")
        try:
            data = json.loads(path.read_text())
            ref_key = bytes.fromhex(data["ref_key"])
            tenants = {}
            for name, item in data["tenants"].items():
                models = item.get("models")
                tenants[name] = Tenant(**{**item, "name": name, "models": None if models is None
                                          else tuple(models)})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a valid tenants file: {exc}") from None
        book = cls(path, ref_key, tenants)
        book.mtime_ns = path.stat().st_mtime_ns
        return book

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"version": 1, "ref_key": self.ref_key.hex(), "tenants": {
            name: {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(t).items() if k != "name"}
            for name, t in sorted(self.tenants.items())}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def ref(self, name: str) -> bytes:
        return tenant_ref(self.ref_key, name)

    def add(self, name: str, **settings: Any) -> str:
        """Create tenant ``name``; returns its API key (shown once, never stored)."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"tenant name {name!r}: use 1-64 letters, digits, '-', '_', '.'")
        if name in self.tenants:
            raise ConfigError(f"tenant {name} exists (rotate its key with `tenants rotate-key`)")
        key = new_key()
        self.tenants[name] = Tenant(name=name, key_hash=_hash(key), key_hint=key[:9], **settings)
        return key

    def remove(self, name: str) -> None:
        self._get(name)
        del self.tenants[name]

    def rotate(self, name: str) -> str:
        """A new key for ``name``; the old one stops working."""
        key = new_key()
        self.tenants[name] = replace(self._get(name), key_hash=_hash(key), key_hint=key[:9])
        return key

    def _get(self, name: str) -> Tenant:
        try:
            return self.tenants[name]
        except KeyError:
            raise ConfigError(f"no tenant named {name}") from None

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant whose key this is.  Every stored hash is compared (constant time), so
        the time taken says nothing about which tenant or how much matched.
        Raises Unauthorized."""
        if not key:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer KEY'")
        presented = _hash(key).encode()
        found: Tenant | None = None
        for tenant in self.tenants.values():
            if hmac.compare_digest(presented, tenant.key_hash.encode()):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def __iter__(self) -> Iterator[Tenant]:
        return iter(sorted(self.tenants.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self.tenants)


@dataclass
class _Usage:
    recent: collections.deque[float] = field(default_factory=collections.deque)  # request times
    day: int = -1
    tokens_today: int = 0
    reserved: int = 0  # tokens held for requests in flight (refunded as they end)
    in_flight: int = 0
    allowed: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # status -> count
    tokens: int = 0


class Quotas:
    """Per-tenant rate limits on this node (requests entering here, wherever they run).

    ``admit`` checks and counts a request and reserves its tokens (its estimate, at most what
    is left of the day's quota, so concurrent requests cannot all pass one check) -- only
    if what is left holds its prompt, so the day's total overshoots by at most one
    request's generated tokens (its max_tokens); ``finish`` releases its slot, frees its
    reservation and adds the tokens it used.  Time is the caller's (seconds since the epoch).
    """

    def __init__(self, cap: int | None = None) -> None:
        self.usage: dict[str, _Usage] = {}
        self.cap = cap  # usage kept for at most this many names (peers: bounded state)

    def _usage(self, tenant: Tenant) -> _Usage:
        found = self.usage.get(tenant.name)
        if found is None:
            if self.cap is not None and len(self.usage) >= self.cap:
                self._forget_idle()
            found = self.usage[tenant.name] = _Usage()
        return found

    def _forget_idle(self) -> None:
        """Make room: drop the oldest half of the names with nothing in flight (their
        counts start again if they come back; what is in flight is kept)."""
        idle = [name for name, u in self.usage.items() if u.in_flight == 0]
        for name in idle[:max(1, len(idle) // 2)]:
            del self.usage[name]

    def refused(self, tenant: Tenant, status: int) -> None:
        u = self._usage(tenant)
        u.refused[str(status)] = u.refused.get(str(status), 0) + 1

    def admit(self, tenant: Tenant, model: str, now: float, reserve: int = 0,
              prompt: int = 0) -> int:
        """Admit a request expected to use ``reserve`` tokens, ``prompt`` of them its input;
        the tokens reserved for it.  Raises Forbidden (model not allowed) or QuotaExceeded
        (with the wait)."""
        u = self._usage(tenant)
        if not tenant.allows(model):
            self.refused(tenant, 403)
            raise Forbidden(f"tenant {tenant.name} may not use model {model}")
        day = int(now // DAY_S)
        if day != u.day:
            u.day, u.tokens_today = day, 0
        while u.recent and u.recent[0] <= now - 60:
            u.recent.popleft()
        wait: float | None = None
        why = ""
        if tenant.rpm is not None and len(u.recent) >= tenant.rpm:
            wait, why = u.recent[0] + 60 - now, f"{tenant.rpm} requests per minute"
        elif tenant.tokens_per_day is not None and \
                u.tokens_today + u.reserved + prompt >= tenant.tokens_per_day:
            wait, why = (day + 1) * DAY_S - now, f"{tenant.tokens_per_day} tokens per day"
        elif tenant.concurrent is not None and u.in_flight >= tenant.concurrent:
            wait, why = 1.0, f"{tenant.concurrent} concurrent requests"
        if wait is not None:
            self.refused(tenant, 429)
            raise QuotaExceeded(f"tenant {tenant.name} is over its limit of {why}",
                                retry_after=max(wait, 1.0))
        u.recent.append(now)
        u.in_flight += 1
        u.allowed += 1
        if tenant.tokens_per_day is None:
            return 0
        held = min(reserve, tenant.tokens_per_day - u.tokens_today - u.reserved)
        u.reserved += held
        return held

    def finish(self, tenant: Tenant, tokens: int, now: float, reserved: int = 0) -> None:
        u = self._usage(tenant)
        u.in_flight = max(0, u.in_flight - 1)
        u.reserved = max(0, u.reserved - reserved)
        day = int(now // DAY_S)
        if day != u.day:
            u.day, u.tokens_today = day, 0
        u.tokens_today += tokens
        u.tokens += tokens

    def status(self) -> dict[str, Any]:
        return {name: {"allowed": u.allowed, "refused": dict(u.refused), "in_flight": u.in_flight,
                       "tokens_today": u.tokens_today, "reserved": u.reserved, "tokens": u.tokens}
                for name, u in sorted(self.usage.items())}
