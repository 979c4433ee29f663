"""The composition root: one top-level nursery owns the HTTP server and the engines."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Any, Callable

import trio

from . import __version__
from .api.app import create_app
from .api.schemas import Limits
from .api.serving import Serving
from .config import NodeConfig, key_path
from .engines.base import TextEngine, file_digest
from .dispatch import Dispatcher
from .engines.scheduler import Scheduler
from .errors import ConfigError
from .store.keys import load_or_create_key

__all__ = ["Node", "run_node", "load_engines"]

log = logging.getLogger(__name__)


async def load_engines(config: NodeConfig) -> list[TextEngine]:
    """Load every configured model (once; they stay loaded).  Raises EngineFailure."""
    from .engines.llama import LlamaEngine, LlamaSettings

    engines: list[TextEngine] = []
    try:
        for spec in config.served_models():
            started = time.perf_counter()
            print(f"loading model {spec.name} from {spec.path} ...", flush=True)
            digest = await trio.to_thread.run_sync(file_digest, spec.path, config.home / "cache")
            gpu = spec.device.split(":")
            settings = LlamaSettings(
                context=spec.context, threads=spec.threads, gpu_layers=spec.gpu_layers,
                main_gpu=int(gpu[1]) if len(gpu) == 2 and gpu[1].isdigit() else 0)
            engine = await LlamaEngine.load(spec.name, spec.path, digest, settings,
                                            aliases=spec.aliases, device=spec.device)
            engines.append(engine)
            print(f"loaded model {spec.name} ({engine.card.size_bytes / 1e6:.0f} MB, "
                  f"context {engine.card.context}) in {time.perf_counter() - started:.1f}s",
                  flush=True)
    except BaseException:
        with trio.CancelScope(shield=True):
            for engine in engines:
                await engine.aclose()
        raise
    return engines


class Node:
    """A running node's state, shared by the HTTP layer (and, later, the mesh)."""

    def __init__(self, config: NodeConfig, engines: list[TextEngine],
                 peer_id: str = "") -> None:
        self.config = config
        self.peer_id = peer_id
        self.scheduler = Scheduler(engines, max_queue=config.max_queue)
        self.dispatcher = Dispatcher(self.scheduler)
        self.serving = Serving(self.dispatcher)
        self.started = time.time()
        self.limits = Limits(max_tokens=config.max_tokens,
                             default_max_tokens=config.default_max_tokens)
        self.app = create_app(self.serving, self.limits, max_body_bytes=config.max_body_bytes,
                              status=self.status)

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
        return {"peer_id": self.peer_id, "version": __version__,
                "url": f"http://{self.config.host}:{self.config.port}/v1",
                "uptime_s": round(time.time() - self.started, 1), "models": models}


async def _serve_http(node: Node, shutdown: trio.Event,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    hc = Config()
    host = node.config.host
    hc.bind = [f"[{host}]:{node.config.port}" if ":" in host else f"{host}:{node.config.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 10.0
    hc.keep_alive_timeout = 30.0
    try:
        await serve(node.app, hc, shutdown_trigger=shutdown.wait,  # type: ignore[arg-type]
                    task_status=task_status)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{host}:{node.config.port} is already in use; is another "
                              "rbee-node running? Use --port to pick another") from None
        raise


async def run_node(config: NodeConfig, *, handle_signals: bool = True,
                   on_ready: Callable[[Node], None] | None = None,
                   shutdown: trio.Event | None = None) -> None:
    """Run a node until SIGINT/SIGTERM (or ``shutdown`` is set); in-flight requests then get
    hypercorn's graceful timeout (10 s) to finish before they are cancelled."""
    key = load_or_create_key(key_path(config.home))
    engines = await load_engines(config)
    node = Node(config, engines, key.peer_id_str)
    shutdown = shutdown or trio.Event()
    try:
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(_wait_for_signal, shutdown)
            async with trio.open_nursery() as inner:
                await inner.start(_serve_http, node, shutdown)
                print(f"rbee-node {__version__} peer {node.peer_id}", flush=True)
                print(f"serving {', '.join(e.card.name for e in engines) or 'no models'} "
                      f"on {node.status()['url']}", flush=True)
                if on_ready:
                    on_ready(node)
            # hypercorn returned: the shutdown trigger fired and in-flight requests ended
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for engine in engines:
                await engine.aclose()
    print("rbee-node stopped", flush=True)


async def _wait_for_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second signal: exiting now")
                os._exit(130)
            print(f"received {signal.Signals(signum).name}, shutting down "
                  "(in-flight requests get 10 s)", flush=True)
            shutdown.set()
