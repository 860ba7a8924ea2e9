"""The IVPN daemon's line protocol, as pure functions over bytes.

One JSON object per `\\n`-terminated line, field names exactly the daemon's Go names, `Command` naming the
type. `Session` is the whole client-side state machine: feed it lines, it returns the new `IvpnSnapshot`
(immutable; the same object when nothing changed) or raises `ProtocolError` with a one-line reason, after
which the caller resets the connection. The snapshot is what `ivpn.status` publishes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

MAX_LINE_BYTES = 1 << 20  # HelloResp without a server list is a few KiB; a longer line is not the daemon
CLIENT_TYPE_CLI = 1

# VpnStateResp's StateVal → name (the daemon's vpn.State enum).
VPN_STATES = (
    "DISCONNECTED",
    "CONNECTING",
    "WAIT",
    "AUTH",
    "GETCONFIG",
    "ASSIGNIP",
    "ADDROUTES",
    "CONNECTED",
    "RECONNECTING",
    "TCP_CONNECT",
    "EXITING",
    "INITIALISED",
)
VPN_TYPES = {0: "openvpn", 1: "wireguard"}
DNS_ENCRYPTIONS = {0: "none", 1: "dot", 2: "doh"}
SECRET_ERROR = "Secret verification error"


class ProtocolError(ValueError):
    """A line the client cannot accept (bad JSON, too long, unknown shape, wrong order): reset the connection."""


class DaemonRejected(ProtocolError):
    """The daemon refused our Hello (wrong secret): re-read the port file before the next attempt."""


class DaemonExiting(ProtocolError):
    """ServiceExitingResp: the daemon is stopping and closes the connection."""


@dataclass(frozen=True, slots=True)
class DnsServer:
    """One DNS server IVPN uses: address, encryption ("none" | "dot" | "doh") and DoH template."""

    address: str
    encryption: str = "none"
    template: str = ""


@dataclass(frozen=True, slots=True)
class KillSwitch:
    """IVPN's firewall (kill switch) as KillSwitchStatusResp reports it."""

    enabled: bool = False
    persistent: bool = False
    allow_lan: bool = False


@dataclass(frozen=True, slots=True)
class IvpnSnapshot:
    """Everything splittun knows about IVPN at one moment. Replaced whole, never mutated."""

    daemon: bool = False  # a session with the daemon is open (Hello answered)
    daemon_version: str = ""
    state: str = "UNKNOWN"  # a VPN_STATES name; "UNKNOWN" before the daemon said
    vpn_type: str = ""  # "openvpn" | "wireguard" while connected
    server_ip: str = ""
    server_port: int = 0
    is_tcp: bool = False
    client_ip: str = ""
    client_ipv6: str = ""
    exit_hostname: str = ""
    dns: tuple[DnsServer, ...] = ()  # IVPN's custom DNS; empty = IVPN's default
    kill_switch: KillSwitch = field(default_factory=KillSwitch)
    paused: bool = False
    paused_till: str = ""
    last_error: str = ""  # the daemon's last ErrorResp/ErrorRespDelayed message
    daemon_port: int = 0  # where the daemon listens (127.0.0.1) while a session is open

    @property
    def connected(self) -> bool:
        return self.state == "CONNECTED"


NOT_RUNNING = IvpnSnapshot()


# --- framing ----------------------------------------------------------------------------------------


class LineSplitter:
    """Cuts a byte stream into lines; a line longer than MAX_LINE_BYTES is a ProtocolError."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        if len(self._buf) > self._max or any(len(line) > self._max for line in lines):
            raise ProtocolError(f"line longer than {self._max} bytes")
        return [bytes(line) for line in lines if line.strip()]


def parse_line(line: bytes) -> tuple[str, int, Mapping[str, Any]]:
    """One line → (Command, Idx, the object). Raises ProtocolError in one line for anything else."""
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {_excerpt(line)} ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"not a JSON object: {_excerpt(line)}")
    command, idx = obj.get("Command"), obj.get("Idx", 0)
    if not isinstance(command, str) or not command:
        raise ProtocolError(f"no Command: {_excerpt(line)}")
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise ProtocolError(f"{command}: Idx is not an integer")
    return command, idx, obj


def hello_request(secret: int, idx: int = 1, version: str = "splittun") -> bytes:
    """The first line a client sends: Hello as a CLI client, asking for the VPN and kill-switch state."""
    hello = {
        "Command": "Hello",
        "Idx": idx,
        "ProtocolSecret": "",
        "ClientType": CLIENT_TYPE_CLI,
        "Version": version,
        "Secret": secret,
        "SendResponseToAllClients": False,
        "GetServersList": False,
        "GetStatus": True,
        "GetSplitTunnelStatus": False,
        "GetWiFiCurrentState": False,
    }
    return json.dumps(hello, separators=(",", ":")).encode() + b"\n"


def request(command: str, idx: int) -> bytes:
    """A request without arguments (GetVPNState, KillSwitchGetStatus)."""
    return json.dumps({"Command": command, "Idx": idx, "ProtocolSecret": ""}).encode() + b"\n"


# --- message bodies -----------------------------------------------------------------------------------


def parse_dns(value: Any) -> tuple[DnsServer, ...]:
    """IVPN's DNS settings in either shape: newer `{"Servers": [{Address, Encryption, Template}]}`, releases up
    to mid-2025 `{DnsHost, Encryption, DohTemplate}`; also unwraps a DnsStatus `{"Dns": settings, ...}`."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ProtocolError("Dns is not an object")
    if "Dns" in value and "Servers" not in value and "DnsHost" not in value:
        return parse_dns(value["Dns"])
    if "Servers" in value:
        servers = value["Servers"] or []
        if not isinstance(servers, list) or not all(isinstance(s, dict) for s in servers):
            raise ProtocolError("Dns.Servers is not a list of objects")
        return tuple(
            DnsServer(_str(s, "Address"), _encryption(s), _str(s, "Template")) for s in servers if s.get("Address")
        )
    host = _str(value, "DnsHost")
    return (DnsServer(host, _encryption(value), _str(value, "DohTemplate")),) if host else ()


def _connected(snap: IvpnSnapshot, obj: Mapping[str, Any]) -> IvpnSnapshot:
    vpn_type = obj.get("VpnType", 0)
    if vpn_type not in VPN_TYPES:
        raise ProtocolError(f"ConnectedResp: unknown VpnType {vpn_type!r}")
    return replace(
        snap,
        state="CONNECTED",
        vpn_type=VPN_TYPES[vpn_type],
        server_ip=_str(obj, "ServerIP"),
        server_port=_int(obj, "ServerPort"),
        is_tcp=bool(obj.get("IsTCP", False)),
        client_ip=_str(obj, "ClientIP"),
        client_ipv6=_str(obj, "ClientIPv6"),
        exit_hostname=_str(obj, "ExitHostname"),
        dns=parse_dns(obj.get("Dns")),
        paused=bool(obj.get("IsPaused", False)),
        paused_till=_str(obj, "PausedTill"),
    )


def _disconnected(snap: IvpnSnapshot, obj: Mapping[str, Any]) -> IvpnSnapshot:
    error = _str(obj, "ReasonDescription") if obj.get("Failure") else snap.last_error
    return replace(
        NOT_RUNNING,
        daemon=snap.daemon,
        daemon_version=snap.daemon_version,
        daemon_port=snap.daemon_port,
        state="DISCONNECTED",
        dns=snap.dns,
        kill_switch=snap.kill_switch,
        last_error=error,
    )


def _vpn_state(snap: IvpnSnapshot, obj: Mapping[str, Any]) -> IvpnSnapshot:
    state, val = obj.get("State"), obj.get("StateVal")
    if not isinstance(state, str) or state not in VPN_STATES:
        if not isinstance(val, int) or not 0 <= val < len(VPN_STATES):
            raise ProtocolError(f"VpnStateResp: unknown state {state!r}/{val!r}")
        state = VPN_STATES[val]
    if state == "DISCONNECTED":
        return _disconnected(snap, {})
    if state == "CONNECTED":
        return replace(snap, state=state)  # details come with ConnectedResp
    # Connecting, reconnecting…: the carrier may still be the old server; keep it until told otherwise.
    return replace(snap, state=state)


def _kill_switch(snap: IvpnSnapshot, obj: Mapping[str, Any]) -> IvpnSnapshot:
    ks = KillSwitch(bool(obj.get("IsEnabled")), bool(obj.get("IsPersistent")), bool(obj.get("IsAllowLAN")))
    return replace(snap, kill_switch=ks)


def _hello(snap: IvpnSnapshot, obj: Mapping[str, Any]) -> IvpnSnapshot:
    dns = parse_dns(obj.get("Dns")) if obj.get("Dns") is not None else snap.dns
    return replace(snap, daemon=True, daemon_version=_str(obj, "Version"), dns=dns)


def _error(snap: IvpnSnapshot, obj: Mapping[str, Any]) -> IvpnSnapshot:
    return replace(snap, last_error=_str(obj, "ErrorMessage"))


_APPLY = {
    "HelloResp": _hello,
    "ConnectedResp": _connected,
    "DisconnectedResp": _disconnected,
    "VpnStateResp": _vpn_state,
    "KillSwitchStatusResp": _kill_switch,
    "ErrorResp": _error,
    "ErrorRespDelayed": _error,
}


class Session:
    """One connection's protocol state: before HelloResp only HelloResp (or the secret error) is acceptable."""

    def __init__(self, daemon_port: int = 0) -> None:
        self.snapshot = replace(NOT_RUNNING, daemon_port=daemon_port)
        self.greeted = False

    def feed(self, line: bytes) -> IvpnSnapshot:
        """Apply one line; returns the (possibly unchanged) snapshot. Raises ProtocolError to reset."""
        command, _idx, obj = parse_line(line)
        if command == "ServiceExitingResp":
            raise DaemonExiting("daemon is exiting")
        if not self.greeted:
            if command in ("ErrorResp", "ErrorRespDelayed"):
                message = _str(obj, "ErrorMessage")
                kind = DaemonRejected if SECRET_ERROR.lower() in message.lower() else ProtocolError
                raise kind(f"daemon refused Hello: {message[:120]}")
            if command != "HelloResp":
                raise ProtocolError(f"{command} before HelloResp")
            self.greeted = True
        elif command == "HelloResp":
            raise ProtocolError("second HelloResp")
        apply = _APPLY.get(command)
        if apply is None:  # EmptyResp, ServerListResp, settings broadcasts…: the daemon sends many we ignore
            return self.snapshot
        try:
            new = apply(self.snapshot, obj)
        except (TypeError, AttributeError) as exc:
            raise ProtocolError(f"{command}: malformed ({exc})") from None
        if new != self.snapshot:
            self.snapshot = new
        return self.snapshot


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"{key} is not a string")
    return value


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{key} is not an integer")
    return value


def _encryption(obj: Mapping[str, Any]) -> str:
    value = obj.get("Encryption", 0)
    if value not in DNS_ENCRYPTIONS:
        raise ProtocolError(f"unknown DNS Encryption {value!r}")
    return DNS_ENCRYPTIONS[value]


def _excerpt(line: bytes) -> str:
    return repr(line[:60]) + ("…" if len(line) > 60 else "")
