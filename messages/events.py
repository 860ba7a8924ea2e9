"""The bus messages: one schema per topic (ARCHITECTURE.md, "How processes talk"). Fields grow; keep old ones
readable.

Every event carries `ts` (sender's wall clock, seconds since the epoch). Addresses are text, in the
compressed form `flows.canonical_ip` gives, so a third party can compare them as strings.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from .schema import Message, Struct, message, record
from .verdict import Verdict, verdict_verb

# --- actors -----------------------------------------------------------------------------------------


# The heartbeat's cadence is part of its contract: consumers judge "gone" by HEARTBEAT_TTL. Beats fall on the
# wall clock's multiples of their period (runtime/loop.py until_slot), the same instant in every process, so
# the bus and each subscriber (controller, interceptors) wake once per slot for all of them.
HEARTBEAT_INTERVAL = 5.0  # steady state
HEARTBEAT_FAST = 1.0  # while starting or not ready; also how often a sender looks at its readiness
HEARTBEAT_STARTUP = 10.0  # seconds of fast beats after start (`up` waits for them)
HEARTBEAT_TTL = 3 * HEARTBEAT_INTERVAL  # a process not heard from for this long is gone


@message("actor.heartbeat")
class Heartbeat(Message):
    """Proof of life plus the actor's own counters, from every actor and the bus: every HEARTBEAT_FAST s
    while starting or not ready (so "ready" is seen within a second), else every HEARTBEAT_INTERVAL s, on
    the wall clock's multiples of the period (so several may arrive in one bus message)."""

    name: str  # program: bus, controller, proxy_tcp…
    instance: str  # supervisord process name: proxy_tcp_00…
    pid: int
    started: float
    uptime: float
    ts: float
    counters: dict[str, int] = field(default_factory=dict)
    ready: bool = True  # alive is not enough: e.g. a proxy without an egress refuses every session
    not_ready: str = ""  # why not, in a few words


# --- connections (interceptor) ----------------------------------------------------------------------


@record
class ProcessInfo(Struct):
    """A process: the one description of it splittun has (events, the external handler, app rules)."""

    pid: int = -1
    ppid: int = -1
    uid: int = -1  # effective uid
    name: str = ""  # comm (/proc/<pid>/status Name: cut at 15 characters)
    exe: str = ""  # "" when unreadable
    cmdline: list[str] = field(default_factory=list)
    # The parent chain, parent first: each one's executable (its name when the executable is unreadable)…
    ancestors: list[str] = field(default_factory=list)
    # …and each one's name, in the same order (app rules with `children` match either).
    ancestor_names: list[str] = field(default_factory=list)


@message("conn.new", version=2)
class ConnNew(Message):
    """A connection the interceptor decided. Version 2 carries its verdict too (the fields of conn.verdict,
    same names), so a decided connection is one event instead of two; a version 1 sender's conn.new has no
    verdict (`verdict` None) and its conn.verdict follows. messages/compat.py gives the version 1 shapes."""

    conn_id: str
    ts: float
    ip_version: int
    protocol: int  # IANA number: 6 tcp, 17 udp, 1 icmp, 58 icmpv6
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    inbound: bool = False
    process: ProcessInfo | None = None
    domain: str = ""
    # version 2: the verdict, as in conn.verdict (None: a version 1 sender; its conn.verdict follows)
    verdict: Verdict | None = None
    verb: str = ""
    rule: str = ""
    reason: str = ""
    split_key: str = ""
    interface: str = ""
    data_path: str = ""
    local_ip: str = ""

    def __post_init__(self) -> None:
        if self.verdict is not None and not self.verb:
            object.__setattr__(self, "verb", verdict_verb(self.verdict))


@message("conn.verdict")
class ConnVerdict(Message):
    """A verdict on its own: from a version 1 interceptor (after its conn.new), or a verdict that changed.
    A new connection's verdict travels in its conn.new (version 2)."""

    conn_id: str
    ts: float
    verdict: Verdict
    verb: str = ""  # filled from verdict when empty, for subscribers without our enum
    rule: str = ""  # id of the rule that decided; "" = the default
    reason: str = ""
    split_key: str = ""  # flows.flow_key of the connection when split: the proxies publish the same key
    interface: str = ""
    data_path: str = ""  # split connections: "kernel" (re-routed + source NAT) or "proxy" (a proxy session)
    local_ip: str = ""  # kernel path: the address it leaves from (the proxies report theirs per session)

    def __post_init__(self) -> None:
        if not self.verb:
            object.__setattr__(self, "verb", verdict_verb(self.verdict))


@message("conn.end")
class ConnEnd(Message):
    conn_id: str
    ts: float
    reason: str = ""
    counters: SessionCounters | None = None  # kernel path: conntrack's accounting of the whole connection


# --- proxies ----------------------------------------------------------------------------------------


@record
class SessionCounters(Struct):
    bytes_up: int = 0  # client → remote
    bytes_down: int = 0  # remote → client
    packets_up: int = 0
    packets_down: int = 0


@message("proxy.session.open")
class ProxySessionOpen(Message):
    session_id: str
    worker: str
    protocol: str  # "tcp" | "udp"
    split_key: str
    ts: float
    client_ip: str
    client_port: int
    orig_dst_ip: str
    orig_dst_port: int
    local_ip: str = ""  # upstream socket's local address
    local_port: int = 0
    interface: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    remote_ip: str = ""  # where the upstream goes (the decider's choice; usually the original destination)
    remote_port: int = 0


@message("proxy.session.stats")
class ProxySessionStats(Message):
    """Periodic counters of a long-lived session, so byte counts are live before close."""

    session_id: str
    worker: str
    split_key: str
    ts: float
    counters: SessionCounters


@message("proxy.session.close", version=2)
class ProxySessionClose(Message):
    """A session ended. Version 2: a session that ended before its open left (the proxies hold an open back
    for a moment) carries that open here, one message instead of two; version 1 bytes have none."""

    session_id: str
    worker: str
    split_key: str
    ts: float
    counters: SessionCounters
    duration: float = 0.0
    reason: str = ""  # "closed", "reset", "idle", "refused: …", "dial failed: …"
    opened: ProxySessionOpen | None = None  # version 2: its open, when that was never published on its own


# --- resolver ---------------------------------------------------------------------------------------


@message("dns.query")
class DnsQuery(Message):
    """One query the resolver answered (or could not), published once the answer left. Which app asked is
    in the interceptor's conn.new of the same flow (the registry joins them); the resolver never reads /proc."""

    ts: float
    flow: str  # the query as the app made it (flow key: "udp 192.0.2.66:40000 192.0.2.65:53")
    name: str  # the question's name, no trailing dot
    qtype: str  # A, AAAA, …
    path: str  # "vpn" | "split" | "" (not sent anywhere: refused, malformed)
    upstream: str = ""  # the server that answered ("" = the cache, or none)
    interface: str = ""  # split: the interface the query left through
    rcode: str = "NOERROR"
    answers: int = 0  # records in the answer section
    addresses: list[str] = field(default_factory=list)  # A/AAAA reached from the question (at most 8)
    latency_ms: float = 0.0  # from the query's arrival to the answer leaving
    cached: bool = False
    transport: str = "udp"  # how the upstream was asked: udp, tcp (after truncation), tls, https


# --- network environment ----------------------------------------------------------------------------


@record
class InterfaceRecord(Struct):
    name: str
    index: int
    mac: str = ""
    kind: str = ""  # physical, wifi, virtual, bridge, tunnel, loopback
    is_physical: bool = False
    mtu: int = 0
    flags: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # "addr/prefix"
    ipv4: str = ""  # first routable IPv4
    ipv6: str = ""  # first routable IPv6
    operstate: str = ""  # the kernel's: up, unknown (tun, loopback), dormant…
    link_kind: str = ""  # the kernel's link type: veth, bridge, wireguard, tun… ("" for hardware)


@record
class GatewayRecord(Struct):
    gateway: str
    interface: str
    family: int  # 4 | 6
    prefix: str = "default"
    table: int = 254  # 0: inferred, not in any routing table (see origin)
    metric: int = 0
    origin: str = "route"  # route | remembered (last default before a VPN took it) | neighbour (IPv6 router)


@message("netenv.changed")
class NetenvChanged(Message):
    """The whole snapshot, so a subscriber never has to ask back."""

    seq: int
    ts: float
    interfaces: list[InterfaceRecord] = field(default_factory=list)
    gateways: list[GatewayRecord] = field(default_factory=list)
    uplink_ipv4: str = ""  # interface carrying the physical default route, "" = none
    uplink_ipv6: str = ""
    uplink_gateway_ipv4: str = ""  # next hop on the uplink (also while a VPN owns the default), "" = unknown
    uplink_gateway_ipv6: str = ""
    default_ipv4: str = ""  # interface unmarked traffic takes now after policy rules (the VPN's while on)
    default_ipv6: str = ""
    location_disabled: bool = False  # network-derived location lookups are off (a VPN is connecting)


# --- IVPN -------------------------------------------------------------------------------------------


@record
class IvpnDns(Struct):
    """One DNS server IVPN uses (its custom DNS)."""

    address: str
    encryption: str = "none"  # "none" | "dot" | "doh"
    template: str = ""  # DoH URL template


@message("ivpn.status")
class IvpnStatus(Message):
    """IVPN as the ivpn actor sees it (core/ivpn), published on every change. While the daemon is away
    (`daemon` false) the last known carrier (server_ip, server_port) stays: the tunnel outlives a restart."""

    ts: float
    daemon: bool  # connected to the IVPN daemon
    state: str = "UNKNOWN"  # DISCONNECTED, CONNECTING, CONNECTED…
    connected: bool = False
    vpn_type: str = ""  # "openvpn" | "wireguard"
    client_ip: str = ""
    client_ipv6: str = ""
    server_ip: str = ""
    interface: str = ""
    paused: bool = False
    server_port: int = 0  # the carrier: server_ip:server_port, TCP when is_tcp else UDP
    is_tcp: bool = False
    exit_hostname: str = ""
    dns: list[IvpnDns] = field(default_factory=list)  # empty: IVPN's default DNS
    kill_switch: bool = False  # IVPN's firewall is on
    daemon_version: str = ""
    last_error: str = ""  # the daemon's last error message
    daemon_port: int = 0  # the daemon's control port on 127.0.0.1 while connected to it (0 = none)
    bypass: str = ""  # splittun/bypassHosts routes outside the VPN now, or why not ("refused: …")
    dns_delegated: bool = False  # IVPN's custom DNS serves VPN apps through splittun's resolver now


# --- policy -----------------------------------------------------------------------------------------


@record
class PolicyRule(Struct):
    """One user rule. Every condition set must hold (AND); an empty condition matches anything."""

    id: str
    action: str  # "split" | "keep"
    app_path: str = ""  # executable path or glob
    app_name: str = ""  # process name
    uid: int = -1
    children: bool = False  # also the app's child processes
    dest: str = ""  # domain (wildcards), IP or CIDR
    proto: str = ""  # "tcp" | "udp" | ""
    port_lo: int = 0
    port_hi: int = 0
    interface: str = ""  # "" = the global choice
    source: str = ""  # original text (Portmaster endpoint string) when it came from one
    # An applied preset (core/presets): its destinations come from the preset in force, filled in when the
    # controller compiles the policy; a snapshot never carries an unexpanded one.
    preset: str = ""


@message("policy.snapshot")
class PolicySnapshot(Message):
    version: int  # increases with every compile
    ts: float
    enabled: bool = False
    interface: str = ""  # configured: "" = auto, else name, IP or MAC
    rules: list[PolicyRule] = field(default_factory=list)
    split_dns: list[str] = field(default_factory=list)  # splittun/splitDNS: servers for split apps' queries
    vpn_domains: list[str] = field(default_factory=list)  # splittun/vpnDomains: always resolved through the VPN
    bypass_hosts: list[str] = field(default_factory=list)  # splittun/bypassHosts: routed outside the VPN (717)
    data_path: str = "proxy"  # splittun/dataPath: "kernel" or "proxy" (the one that works everywhere)


# --- interception -----------------------------------------------------------------------------------


@message("interceptor.state")
class InterceptionState(Message):
    """Whether splittun intercepts now (the interceptor's worker 0: its rules are in place, or gone again), on
    every change and with every heartbeat-slow repeat; `Interceptor.STATUS` (`active`) answers the same. Other
    actors follow it: IVPN's DNS is delegated only while interception runs."""

    ts: float
    active: bool
    reason: str = ""  # "rules installed", "stopping", "passive: …"


# --- updates ----------------------------------------------------------------------------------------


@message("updates.stale")
class UpdatesStale(Message):
    """The preset index in force is older than `splittun/updateStaleAfterDays` (the controller, at start, after
    each switch and then hourly while it stays stale). Notifications turn it into a notice the user can silence."""

    ts: float
    name: str  # the index's name: splittun-presets
    version: str
    published: float  # seconds since the epoch
    age_days: float
    max_age_days: int


# --- notifications ----------------------------------------------------------------------------------


@record
class NotificationAction(Struct):
    id: str
    text: str
    type: str = ""  # open-url, open-page, open-setting, open-profile, inject-event, call-webhook
    payload: Any = None
    visibility: str = ""  # "", "detailed", "in-app-only"


@message("notify.", family=True)
class Notification(Message):
    topic: str  # full topic, e.g. notify.ivpn.connected
    id: str
    ts: float
    title: str = ""
    message: str = ""
    level: str = "info"  # info | warning | error | prompt
    state: str = "active"  # active | responded | executed
    actions: list[NotificationAction] = field(default_factory=list)
    expires: float = 0.0  # seconds since the epoch after which it is no longer shown; 0 = never
    responded: str = ""  # the id of the action the user chose (state responded or executed)

    def __post_init__(self) -> None:
        if not self.topic.startswith("notify.") or self.topic == "notify.":
            raise ValueError(f"notification topic must be notify.<category>, got {self.topic!r}")

    def wire_topic(self) -> str:
        return self.topic

    # The topic also stays in the payload: a notification inside a reply (the `notifications` op, the API) has
    # no topic frame. On the bus the frame decides (schema.decode).
