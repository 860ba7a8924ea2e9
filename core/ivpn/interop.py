"""The IVPN interop rules on the verdict path: the interceptor's external verdict handler
(core/verdict_handler.py), registered at interceptor start by name (`--verdict-handler`, default
`core.ivpn.interop:interceptor_verdict_handler`), before any IVPN status is known.

IVPN's own traffic must never be split, re-routed or dropped by splittun, whatever the user's rules say:
- IVPN's own processes (daemon, UI, CLI, the bundled WireGuard/OpenVPN/obfs4proxy/v2ray/dnscrypt-proxy/
  kem-helper): accept-final (mark 1709), so a later kill-switch rule cannot drop them either;
- the daemon's local control port, to and from: accept-final;
- the VPN carrier (server IP and port, UDP and TCP, outbound and inbound): accept-final. The carrier is
  taken from the last status that named one, kept while the daemon restarts (the tunnel outlives it);
- before the first status, the carrier is not known: a connection whose process was looked for and not
  found (a kernel WireGuard socket has none) is kept in the VPN rather than split, until the status says
  where the carrier is.

Pure: one `ConnectionView` in, an answer out; the executables are configuration (`IVPN_EXECUTABLES_ENV` replaces
the platform's list, for tests). Cheap by construction: a dict/set lookup per connection, no process needed
before a verdict (`needs_process = False`: the engine still looks up a root-owned socket's process before
splitting it, as for its own), and cacheable per destination (`by_destination`), so a connection the handler
has no opinion on pays nothing measurable.
"""

from __future__ import annotations

import ntpath
import os
import sys
from collections.abc import Iterable, Mapping

from core.verdict_handler import AcceptFinal, ConnectionView, HandlerResult
from messages import Verdict
from messages.flows import IpProtocol

from .portfile import WINDOWS_DEFAULT_INSTALL_DIR, windows_install_dir

#: Replaces the platform's list of IVPN executables (os.pathsep-separated paths), e.g. for the lab tests.
IVPN_EXECUTABLES_ENV = "SPLITTUN_IVPN_EXECUTABLES"

LINUX_EXECUTABLES = (
    "/usr/bin/ivpn-service",
    "/usr/bin/ivpn",
    "/opt/ivpn/ui/bin/ivpn-ui",
    "/opt/ivpn/wireguard-tools/wg-quick",
    "/opt/ivpn/wireguard-tools/wg",
    "/opt/ivpn/obfsproxy/obfs4proxy",
    "/opt/ivpn/v2ray/v2ray",
    "/opt/ivpn/dnscrypt-proxy/dnscrypt-proxy",
    "/opt/ivpn/kem/kem-helper",
    "/usr/sbin/openvpn",  # IVPN uses the system's OpenVPN on Linux
)
WINDOWS_EXECUTABLES = (  # relative to the installation directory
    "IVPN Service.exe",
    r"ui\IVPN Client.exe",
    r"cli\ivpn.exe",
    r"OpenVPN\x86_64\openvpn.exe",
    r"WireGuard\x86_64\wireguard.exe",
    r"WireGuard\x86_64\wg.exe",
)

_CARRIER_PROTOCOLS = (IpProtocol.TCP, IpProtocol.UDP)
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:7f00:1"})


def ivpn_executables(platform: str | None = None, install_dir: str | None = None) -> tuple[str, ...]:
    """The executables of IVPN's own processes on this platform (Windows: under its installation directory)."""
    platform = platform or sys.platform
    if platform.startswith("win"):
        base = install_dir or WINDOWS_DEFAULT_INSTALL_DIR
        return tuple(ntpath.join(base, rel) for rel in WINDOWS_EXECUTABLES)
    return LINUX_EXECUTABLES


def _norm(path: str) -> str:
    """Windows paths compare without case; POSIX paths as they are."""
    return path.lower() if "\\" in path else path


class IvpnVerdictHandler:
    """The external verdict handler for IVPN. Immutable configuration; the status comes with each view."""

    #: The process matters only where a connection would otherwise be split, and there the engine looks it up
    #: first whenever the socket belongs to a uid splittun runs as (root): so do IVPN's daemon and what it
    #: starts (its UI and CLI, run by the user, talk to the daemon on loopback, which is never split).
    needs_process = False
    #: Without a process, the answer depends only on the destination, the direction and the VPN status.
    by_destination = True

    def __init__(self, executables: Iterable[str]) -> None:
        self.executables = frozenset(_norm(p) for p in executables if p)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], platform: str | None = None) -> IvpnVerdictHandler:
        """`IVPN_EXECUTABLES_ENV` when set, else this platform's list (Windows: under the installation directory
        the registry names, read once here)."""
        listed = [p for p in environ.get(IVPN_EXECUTABLES_ENV, "").split(os.pathsep) if p]
        if listed:
            return cls(listed)
        windows = (platform or sys.platform).startswith("win")
        return cls(ivpn_executables(platform, windows_install_dir() if windows else None))

    def __call__(self, view: ConnectionView) -> HandlerResult:
        process = view.process
        if process is not None and process.exe and _norm(process.exe) in self.executables:
            return AcceptFinal(f"IVPN's own process ({process.name or process.exe})")
        status = view.ivpn
        flow = view.flow
        if status is not None and status.server_ip and flow.protocol in _CARRIER_PROTOCOLS:
            peer_ip, peer_port = (flow.src_ip, flow.src_port) if view.inbound else (flow.dst_ip, flow.dst_port)
            if peer_port == status.server_port and _same_ip(peer_ip, status.server_ip):
                return AcceptFinal(f"IVPN's VPN carrier ({status.server_ip}:{status.server_port})")
        if status is not None and status.daemon_port and flow.protocol == IpProtocol.TCP and _daemon_port(view):
            return AcceptFinal("IVPN daemon's control port")
        if status is None and process is None and view.attributed and not view.inbound:
            # Before the first status the carrier is unknown; a socket without a process may be it.
            return Verdict.REROUTE_TO_TUNNEL, "IVPN status not known yet: no process, kept in the VPN"
        return None


def _same_ip(a: str, b: str) -> bool:
    if a == b:
        return True
    return a.removeprefix("::ffff:") == b.removeprefix("::ffff:")


def _daemon_port(view: ConnectionView) -> bool:
    """A connection to or from the daemon's port on loopback (it only listens on 127.0.0.1)."""
    port, flow = view.ivpn.daemon_port if view.ivpn else 0, view.flow
    return (flow.dst_port == port and flow.dst_ip in _LOOPBACK) or (flow.src_port == port and flow.src_ip in _LOOPBACK)


#: The interceptor's default handler (`--verdict-handler`): IVPN's executables, from the environment or the
#: platform's list, read once when the interceptor loads this module.
interceptor_verdict_handler = IvpnVerdictHandler.from_env(os.environ)
