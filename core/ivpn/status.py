"""The snapshot as the bus message `ivpn.status` (messages/events.py), the one shape other actors read, and what
it means for the rest of splittun (the location gate)."""

from __future__ import annotations

import ipaddress
import sys

from messages.events import IvpnDns, IvpnStatus, Notification, NotificationAction

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


#: States in which IVPN is bringing its tunnel up or holds it: the device's addresses are the VPN's.
TUNNEL_STATES = frozenset(
    {"CONNECTING", "WAIT", "AUTH", "GETCONFIG", "ASSIGNIP", "ADDROUTES", "CONNECTED", "RECONNECTING", "TCP_CONNECT"}
)


def location_gate(snap: IvpnSnapshot) -> bool:
    """Should netenv's interface-derived location be off? While IVPN is connecting or connected (its tunnel's
    addresses are not where the device is); on again on disconnect, on daemon exit and on an unexpected drop
    of the daemon connection (then nobody vouches for the tunnel any more)."""
    return snap.daemon and snap.state in TUNNEL_STATES


#: The "connected" notice (Portmaster's IVPN interop has one): its id is what "Do not notify me anymore" marks.
CONNECTED_NOTICE = "ivpn.connected"
#: The action that writes the suppression marker (core/state/notifications.py's SUPPRESS).
SUPPRESS_ACTION = NotificationAction(id="suppress", text="Do not notify me anymore")


def connected_notice(snap: IvpnSnapshot, ts: float) -> Notification:
    """What the user is told when IVPN connects while splittun runs: that both work side by side."""
    where = snap.exit_hostname or snap.server_ip or "its server"
    return Notification(
        topic=f"notify.{CONNECTED_NOTICE}",
        id=CONNECTED_NOTICE,
        ts=ts,
        title="IVPN connected",
        message=(
            f"IVPN connected to {where}. splittun keeps working beside it: split apps still leave outside the "
            "tunnel, everything else stays in IVPN's, and IVPN's own connections are never touched."
        ),
        level="info",
        actions=[NotificationAction(id="ack", text="OK"), SUPPRESS_ACTION],
    )


def delegated_dns(status: IvpnStatus | None) -> tuple[str, ...]:
    """DNS delegation: IVPN's own DNS as the resolver's upstream for VPN-path queries, while IVPN is connected and
    reports custom DNS (core/dns/route.py `vpn_servers`). Plain servers as their address, DNS over TLS as
    `tls://ADDRESS` (the certificate checked for the address); DNS over HTTPS, which the resolver does not
    speak, is left out rather than downgraded to plain DNS (those queries go where the app sent them, through
    the VPN, as without IVPN)."""
    if status is None or not status.connected:
        return ()
    servers = []
    for server in status.dns:
        try:
            address = str(ipaddress.ip_address(server.address.strip("[]")))
        except ValueError:
            continue
        if server.encryption == "none":
            servers.append(address)
        elif server.encryption == "dot":
            servers.append(f"tls://{address}")
    return tuple(servers)


PRECONNECT_NOTICE = "ivpn.preconnect"


def preconnect_notice(reason: str, ts: float) -> Notification:
    """What the user is told when a pre-connect hook refused (e.g. the bypass routes: two default gateways)."""
    return Notification(
        topic=f"notify.{PRECONNECT_NOTICE}",
        id=PRECONNECT_NOTICE,
        ts=ts,
        title="IVPN connects without splittun's preparations",
        message=f"IVPN is connecting, but splittun could not prepare for it: {reason}.",
        level="warning",
        actions=[NotificationAction(id="ack", text="OK")],
    )
