"""mDNS discovery on the LAN (zeroconf), confined to chosen interfaces.

zeroconf blocks while it registers (~1.7 s) and calls back on its own thread: both stay
off the trio loop (a worker thread registers; callbacks hand results back through trio's
token).  Each node announces ``_rbee-p2p._udp.local.`` with its peer ID, swarm and
multiaddrs; nodes of the same swarm that see each other dial each other.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .service import Mesh

__all__ = ["run_mdns", "SERVICE_TYPE", "interface_ips"]

log = logging.getLogger(__name__)
SERVICE_TYPE = "_rbee-p2p._udp.local."


def interface_ips(names: tuple[str, ...]) -> list[str]:
    """IPv4 addresses of the named interfaces (names or addresses may be given)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (adapter.nice_name in names or ip.ip in names):
                out.append(ip.ip)
    return out


async def run_mdns(mesh: Mesh, interfaces: tuple[str, ...]) -> None:
    from zeroconf import (
        InterfaceChoice,
        IPVersion,
        ServiceBrowser,
        ServiceInfo,
        ServiceStateChange,
        Zeroconf,
    )

    ips = interface_ips(interfaces) if interfaces else None
    if interfaces and not ips:
        log.warning("mDNS: none of the interfaces %s has an IPv4 address; mDNS is off",
                    interfaces)
        return
    addrs = [a for a in mesh.addrs() if "/ip4/" in a]
    announce = [a.split("/")[2] for a in addrs if ips is None or a.split("/")[2] in ips]
    if not announce:
        log.warning("mDNS: no listen address on the chosen interfaces; mDNS is off")
        return
    port = int(addrs[0].split("/tcp/")[1].split("/")[0])
    name = f"{mesh.key.peer_id_str[-20:]}.{SERVICE_TYPE}"
    info = ServiceInfo(
        SERVICE_TYPE, name, port=port,
        addresses=[socket.inet_aton(ip) for ip in announce],
        properties={"id": mesh.key.peer_id_str, "swarm": mesh.config.swarm})
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[str](64)

    def on_change(zeroconf: Any, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:  # zeroconf's thread
        if state_change is not ServiceStateChange.Added:
            return
        found = zeroconf.get_service_info(service_type, name, timeout=2000)
        if found is None:
            return
        props = {k.decode(): (v or b"").decode() for k, v in found.properties.items()}
        if props.get("swarm") != mesh.config.swarm or props.get("id") == mesh.key.peer_id_str:
            return
        for ip in found.parsed_addresses(IPVersion.V4Only):
            addr = f"/ip4/{ip}/tcp/{found.port}/p2p/{props['id']}"
            try:
                token.run_sync_soon(send.send_nowait, addr)
            except (trio.RunFinishedError, trio.WouldBlock):
                pass

    def start() -> tuple[Any, Any]:
        zc = Zeroconf(interfaces=ips if ips else InterfaceChoice.All,
                      ip_version=IPVersion.V4Only)
        zc.register_service(info)
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        return zc, browser

    try:
        zc, browser = await trio.to_thread.run_sync(start)
    except Exception as exc:  # no multicast here, no such interface, ...: run without
        log.error("mDNS discovery is off: %s: %s", type(exc).__name__, exc)
        return
    log.info("mDNS: announcing %s on %s", mesh.key.peer_id_str[:16], announce)
    try:
        async for addr in receive:
            log.info("mDNS: found %s", addr)
            await mesh.connect_addr(addr)
    finally:
        def stop() -> None:
            browser.cancel()
            zc.unregister_all_services()
            zc.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(stop)
