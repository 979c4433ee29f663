"""The composition root: one top-level nursery owns the HTTP server and the engines."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import time
from typing import Any, Callable

import trio

from . import __version__
from .api.app import create_app
from .tenancy.gate import Gate
from .api.images import ImageService, image_limits
from .dispatch.drain import Drain
from .dispatch.request import Limits
from .api.serving import Serving
from .config import NodeConfig, audit_path, key_path, peer_limits, peer_yield_s
from .dispatch import Dispatcher
from .engines.admission import Capacity, load_models
from .engines.base import TextEngine
from .engines.scheduler import Scheduler
from .errors import ConfigError
from .mesh.executor import Executor
from .mesh.service import LocalInfo, Mesh, MeshConfig
from .policy_runtime import PolicyRuntime
from .protocol.envelope import Verifier
from .protocol.identity import NodeKey
from .protocol.messages import DeviceInfo, Price
from .store.audit import AuditLog
from .store.keys import load_or_create_key
from .store.writer import AuditWriter
from .tenancy.peers import PeerGate

__all__ = ["Node", "run_node", "load_engines"]

log = logging.getLogger(__name__)

DRAIN_S = 10.0
"""How long running work may go on after Ctrl-C / SIGTERM before it is ended cleanly."""


async def load_engines(config: NodeConfig) -> tuple[list[TextEngine], Capacity]:
    """Load every configured model that fits (once; they stay loaded), text and image
    (engines/admission.py).  Raises EngineFailure or ConfigError."""
    engines: list[TextEngine] = []
    try:
        for fake in config.fake_models:
            from .engines.fake import ScriptedEngine

            name, _, rate = fake.partition(":")
            try:
                speed = float(rate or "100")
            except ValueError:
                raise ConfigError(f"fake model {fake!r}: expected NAME:TOKENS_PER_S") from None
            engines.append(ScriptedEngine(name, token_seconds=1 / speed, context=8192, batch=6,
                                          script="lorem ipsum dolor sit amet"))
            print(f"serving a scripted model {name} at {speed:g} tokens/s (testing)", flush=True)
        loaded, capacity = await load_models(config)
        engines += loaded
    except BaseException:
        with trio.CancelScope(shield=True):
            for engine in engines:
                await engine.aclose()
        raise
    return engines, capacity


class Node:
    """A running node's state, shared by the HTTP layer and the mesh."""

    def __init__(self, config: NodeConfig, engines: list[TextEngine],
                 peer_id: str = "", *, key: NodeKey | None = None,
                 audit: AuditWriter | None = None, capacity: Capacity | None = None) -> None:
        self.config = config
        self.key = key
        self.peer_id = key.peer_id_str if key is not None else peer_id
        self.audit = audit
        self.scheduler = Scheduler(engines, max_queue=config.max_queue,
                                   remote_share=config.peer_queue_share,
                                   peer_yield_s=peer_yield_s(config))
        self.capacity = capacity or Capacity.for_engines(engines, config)
        self.scheduler.unavailable = self.capacity.unavailable
        self.policy = PolicyRuntime(config.policy, timeout_ms=config.policy_timeout_ms,
                                    pins=dict(config.pins))
        self.dispatcher = Dispatcher(self.scheduler, local_id=self.peer_id or "local",
                                     jurisdiction=config.jurisdiction, audit=audit,
                                     router=self.policy.route, capacity=self.capacity,
                                     peer=key.peer_id if key is not None else None)
        self.gate = Gate(config.home)
        self.peer_gate = PeerGate(peer_limits(config), public=config.swarm == "public",
                                  has_tenants=lambda: not self.gate.open)
        self.serving = Serving(self.dispatcher, self.gate)
        self.images = ImageService(self.serving, self.capacity, image_limits(config))
        self.mesh: Mesh | None = None
        self._devices: tuple[DeviceInfo, ...] | None = None
        self.started = time.time()
        self.limits = Limits(max_tokens=config.max_tokens,
                             default_max_tokens=config.default_max_tokens,
                             max_images=config.max_images)
        self.app = create_app(self.serving, self.limits, max_body_bytes=config.max_body_bytes,
                              status=self.status, images=self.images)

    def status(self) -> dict[str, Any]:
        models = []
        for engine in self.scheduler.engines:
            card, load = engine.card, self.scheduler.load(engine.card.name)
            models.append({
                "name": card.name, "aliases": list(card.aliases), "modality": card.modality,
                "digest": card.digest.hex(), "context": card.context, "path": card.path,
                "size_bytes": card.size_bytes, "device": card.device,
                "queue_depth": load.queue_depth, "active": load.active,
                "requests_served": self.dispatcher.requests_served.get(card.name, 0),
                "tokens_generated": self.dispatcher.tokens_generated.get(card.name, 0),
                "tokens_per_s": round(self.dispatcher.tokens_per_s.get(card.name, 0.0), 1),
            })
        status: dict[str, Any] = {
            "peer_id": self.peer_id, "version": __version__,
            "url": f"http://{self.config.host}:{self.config.port}/v1",
            "uptime_s": round(time.time() - self.started, 1), "models": models,
            "addrs": [], "peers": [], "policy": self.policy.status()}
        status.update(self.capacity.status())  # devices, unavailable models, images
        status["images"].update(self.images.status())
        status["tenancy"] = self.gate.status()
        status["tenancy"]["peers"] = {**self.peer_gate.status(),
                                      "yield_s": self.scheduler.peer_yield_s,
                                      "yielded": self.scheduler.yielded}
        if self.audit is not None:
            status["audit"] = {"written": self.audit.written, "lost": self.audit.lost,
                               "failing": self.audit.failing}
        if self.mesh is not None:
            status.update(self.mesh.status())
        return status

    # -- the mesh -----------------------------------------------------------------------

    def devices(self) -> tuple[DeviceInfo, ...]:
        """The advert's devices: as the capacity's periodic re-probe last saw them
        (``device_probe_interval``), else probed once."""
        if self.capacity._watched:
            current = self.capacity.current_device_infos()
            if current:
                return current
        if self._devices is None:
            try:
                from .engines.hardware import device_infos, probe

                self._devices = tuple(device_infos(probe(use_torch=False)))
            except Exception:  # the probe is best effort; never stop a node for it
                log.exception("hardware probe failed; advertising the CPU only")
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                self._devices = (DeviceInfo(id="cpu", backend="cpu", name="cpu",
                                            mem_total=total, mem_free=total),)
        return self._devices

    def local_info(self) -> LocalInfo:
        """What this node offers now, for its capability advert."""
        queued = active = 0
        for engine in self.scheduler.engines:
            load = self.scheduler.load(engine.card.name)
            queued, active = queued + load.queue_depth, active + load.active
        # device set only for pinned models; speed as measured here
        prices = dict(self.config.prices)
        models = tuple(dataclasses.replace(
            m, tokens_per_s=round(self.dispatcher.tokens_per_s.get(m.name, 0.0), 1),
            price=Price(*prices[m.name]) if m.name in prices else None)
            for m in self.capacity.model_infos(self.scheduler.engines))
        return LocalInfo(models=models, devices=self.devices(), queue_depth=queued,
                         active_jobs=active, max_queue=self.config.max_queue)

    def prices(self) -> dict[str, tuple[int, int, int]]:
        """This node's configured prices by served name and alias ([prices] in the TOML)."""
        prices = dict(self.config.prices)
        out = {}
        for engine in self.scheduler.engines:
            card = engine.card
            if card.name in prices:
                out.update({name: prices[card.name] for name in (card.name, *card.aliases)})
        return out

    def build_mesh(self) -> Mesh:
        """The mesh of this node's swarm (:func:`open_swarm`: its name, key and members)."""
        assert self.key is not None
        c = self.config
        verifier = Verifier()
        executor = Executor(self.key, verifier, self.dispatcher.run_here, self.limits,
                            jurisdiction=c.jurisdiction, audit=self.audit,
                            prices=self.prices(), peers=self.peer_gate,
                            drain=self.dispatcher.drain)
        swarm, psk, members = open_swarm(c)
        mesh_config = MeshConfig(
            listen=c.p2p_listen, peers=(*c.peers, *members), bootstrap=c.bootstrap,
            swarm=swarm, mdns=c.mdns, dht=c.dht, psk=psk, allow=c.allow_peers,
            jurisdiction=c.jurisdiction, attested=c.attested,
            believe_claims=c.swarm == "private", advert_interval_s=c.advert_interval,
            suspect_after_s=c.suspect_after, dead_after_s=c.dead_after,
            advert_budget=c.advert_budget, probe_above=c.probe_above, probes=c.probes,
            max_peers=c.max_peers, ping_interval_s=c.ping_interval,
            mdns_interfaces=c.mdns_interfaces)
        self.mesh = Mesh(mesh_config, self.key, self.local_info, executor, verifier, self.audit)
        self.dispatcher.remote = self.mesh
        self.scheduler.listeners.append(self.mesh.poke)
        return self.mesh


async def _serve_http(node: Node, shutdown: trio.Event,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    hc = Config()
    host = node.config.host
    hc.bind = [f"[{host}]:{node.config.port}" if ":" in host else f"{host}:{node.config.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = DRAIN_S + 5.0  # the drain ends streams itself (an error, [DONE])
    # a connection with no request in progress -- idle between requests, or still sending
    # its first one's headers (slowloris) -- is closed after this long; headers are at most
    # h11_max_incomplete_size (16 KiB).  (read_timeout would also cut long SSE streams,
    # whose clients send nothing.)
    hc.keep_alive_timeout = 5.0
    raise_fd_limit()
    try:
        await serve(node.app, hc, shutdown_trigger=shutdown.wait,  # type: ignore[arg-type]
                    task_status=task_status)
    except* OSError as group:
        in_use, _ = group.split(lambda e: getattr(e, "errno", None) == errno.EADDRINUSE)
        if in_use is not None:
            raise ConfigError(f"{host}:{node.config.port} is already in use; is another "
                              "rbee-node running? Use --port to pick another") from None
        raise


def open_swarm(config: NodeConfig) -> tuple[str, str | None, tuple[str, ...]]:
    """(the swarm's public name, its pnet key in hex or None, members to dial): the open
    swarm; or a private one: the configured ``psk``, else an invitation joined now, else
    ``$RBEE_HOME/swarm.key`` (created on first start: a new private swarm)."""
    from .mesh.host import psk_from_secret
    from .store.swarm import join, joined_peers, load_or_create_swarm_key, swarm_id

    if config.swarm == "public":
        return "public", None, ()
    if config.psk:
        key = psk_from_secret(config.psk)
        return swarm_id(key), key, ()
    if config.join:
        joined, left = join(config.home, config.join)
        print(f"joined private swarm {joined}" + (f" (left {left}; its key is in "
              "swarm.key.old)" if left else ""), flush=True)
    key, created = load_or_create_swarm_key(config.home)
    if created:
        print(f"created private swarm {swarm_id(key)}: add machines with `rbee-node invite`",
              flush=True)
    return swarm_id(key), key, joined_peers(config.home)


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def raise_fd_limit(want: int = 65536) -> int:
    """Lift the soft open-files limit towards the hard one (often 1024 < 1M): every HTTP
    and p2p connection is a descriptor, and a flood of half-open ones must not reach it
    before the idle timeout closes them.  Returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning("open-files limit is %d: a connection flood may exhaust it (raise it "
                    "with `ulimit -n` or LimitNOFILE= in the service file)", soft)
    return soft


def check_exposure(config: NodeConfig) -> None:
    """Refuse to serve without API keys anywhere but loopback, or strangers of the open
    swarm without per-peer limits, unless allowed."""
    host = config.host
    if not _loopback(host) and Gate(config.home).open and not config.allow_open:
        raise ConfigError(
            f"--host {host} would serve anyone on the network without an API key: add a "
            "tenant first (`rbee-node tenants add NAME`), or pass --allow-open "
            "(allow_open = true) to serve openly on purpose")
    exposed = [a for a in config.p2p_listen if not _loopback(a.split("/")[2])]
    unlimited = 0 in peer_limits(config)[:2]
    if config.p2p and config.swarm == "public" and exposed and unlimited \
            and not config.allow_open:
        raise ConfigError(
            f"the open swarm on {exposed[0]} with peer_concurrent or peer_rpm = 0 would let "
            "any stranger use all of this machine: set per-peer limits, or pass --allow-open "
            "to do so on purpose")


async def run_node(config: NodeConfig, *, handle_signals: bool = True,
                   on_ready: Callable[[Node], None] | None = None,
                   shutdown: trio.Event | None = None) -> None:
    """Run a node until SIGINT/SIGTERM (or ``shutdown`` is set); then new work is refused,
    and running work -- local requests and peers' jobs alike -- gets :data:`DRAIN_S` to
    finish before it is ended cleanly (``dispatch.drain``); the mesh goes last."""
    check_exposure(config)
    key = load_or_create_key(key_path(config.home))
    audit_log = AuditLog(audit_path(config.home), key)
    writer = AuditWriter(audit_log, retention_days=config.audit_retention_days or None)
    engines: list[TextEngine] = []
    capacity: Capacity | None = None
    shutdown = shutdown or trio.Event()
    try:
        async with trio.open_nursery() as services:
            await services.start(writer.run)
            helpers: list[trio.CancelScope] = []  # signals, the mesh: stopped after HTTP
            engines, capacity = await load_engines(config)
            node = Node(config, engines, key=key, audit=writer, capacity=capacity)
            if handle_signals:
                await services.start(_in_scope, helpers, _wait_for_signal, shutdown)
            await services.start(_in_scope, helpers, _drain_on, shutdown, node.dispatcher.drain)
            await services.start(_in_scope, helpers, node.policy.run)
            await services.start(_in_scope, helpers, node.capacity.watch_devices,
                                 config.device_probe_interval)
            if config.p2p:
                await services.start(_in_scope, helpers, node.build_mesh().run)
            async with trio.open_nursery() as http:
                await http.start(_serve_http, node, shutdown)
                print(f"rbee-node {__version__} peer {node.peer_id}", flush=True)
                if node.mesh is not None:
                    print(f"mesh: {config.swarm} swarm {node.mesh.config.swarm} on "
                          f"{', '.join(node.mesh.addrs())}", flush=True)
                print(f"serving {', '.join(e.card.name for e in engines) or 'no models'} "
                      f"on {node.status()['url']}", flush=True)
                if on_ready:
                    on_ready(node)
            # hypercorn returned: the shutdown trigger fired and in-flight requests ended;
            # peers' jobs end by the drain's end too (the mesh carries their last frames)
            with trio.move_on_after(DRAIN_S + 5.0):
                await node.dispatcher.drain.idle()
            for scope in helpers:
                scope.cancel()
            writer.close()  # the writer drains its queue, then its task ends
    finally:
        with trio.CancelScope(shield=True):
            for engine in engines:
                await (capacity.unload(engine) if capacity else engine.aclose())
        audit_log.close()
    print("rbee-node stopped", flush=True)


async def _in_scope(scopes: list[trio.CancelScope], fn: Callable[..., Any], *args: Any,
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``fn(*args, task_status=...)`` in a cancel scope added to ``scopes``, so that it
    can be stopped apart from its nursery."""
    with trio.CancelScope() as scope:
        scopes.append(scope)
        await fn(*args, task_status=task_status)


async def _drain_on(shutdown: trio.Event, drain: Drain,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Once ``shutdown`` is set: refuse new work, and after :data:`DRAIN_S` end what still
    runs."""
    task_status.started()
    await shutdown.wait()
    drain.stop()
    await trio.sleep(DRAIN_S)
    if drain.running:
        log.warning("drain over: ending %d job(s) still running for peers", drain.running)
    drain.cut()


async def _wait_for_signal(shutdown: trio.Event,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second signal: exiting now")
                os._exit(130)
            print(f"received {signal.Signals(signum).name}, shutting down "
                  f"(running requests get {DRAIN_S:.0f} s)", flush=True)
            shutdown.set()
