"""The snapshot as the bus message `ivpn.status` (messages/events.py), the one shape other actors read."""

from __future__ import annotations

import sys

from messages.events import IvpnDns, IvpnStatus

from .protocol import IvpnSnapshot

# IVPN's WireGuard interface per platform (Linux: wg-quick with wgivpn.conf; Windows: the tunnel "IVPN").
WIREGUARD_INTERFACES = {"linux": "wgivpn", "win32": "IVPN"}


def to_status(snap: IvpnSnapshot, ts: float, platform: str | None = None) -> IvpnStatus:
    """`ivpn.status` for this snapshot; `interface` is known only for WireGuard (OpenVPN picks a tun)."""
    platform = platform or sys.platform
    interface = WIREGUARD_INTERFACES.get(platform, "") if snap.vpn_type == "wireguard" else ""
    return IvpnStatus(
        ts=ts,
        daemon=snap.daemon,
        state=snap.state,
        connected=snap.connected,
        vpn_type=snap.vpn_type,
        client_ip=snap.client_ip,
        client_ipv6=snap.client_ipv6,
        server_ip=snap.server_ip,
        interface=interface,
        paused=snap.paused,
        server_port=snap.server_port,
        is_tcp=snap.is_tcp,
        exit_hostname=snap.exit_hostname,
        dns=[IvpnDns(address=d.address, encryption=d.encryption, template=d.template) for d in snap.dns],
        kill_switch=snap.kill_switch.enabled,
        daemon_version=snap.daemon_version,
        last_error=snap.last_error,
        daemon_port=snap.daemon_port,
    )
