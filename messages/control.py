"""The control plane: every request an actor answers, declared once (docs/control-plane.md).

On the wire nothing changed: a client sends `Request{op, args}`, the server answers `Reply{ok, result}` or
`Reply{ok: false, error: {code, message}}`; codes are short words a script can branch on. What this module
adds is the declaration of each op: an `Op` names it, says which record its arguments are (validated like
bus events: a wrong field is `invalid_argument` naming it), what its result is (a record when its shape is
fixed, a plain `dict`/`list` type when it is genuinely open-ended) and what it does, in one line. Ops are
grouped by who answers them: `AnyActor` (every actor's runtime), `Controller`, `Interceptor`, `Netenv`,
`Proxy` (every proxy_tcp and proxy_udp worker).

Servers bind a handler to an op with `runtime.actor.answers(OP)`; clients call `runtime.transport.ask(
endpoint, OP, args_record)` and get the decoded result. `runtime.transport.request(endpoint, "op", {...})`
still sends raw requests (third-party scripts do the same with pyzmq + msgpack).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import field
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from .events import DnsQuery, InterfaceRecord, IvpnStatus, NetenvChanged, Notification, PolicyRule, PolicySnapshot
from .schema import VERSION_KEY, Message, Struct, _decoder_for, record

BAD_REQUEST = "bad_request"  # undecodable or schema-invalid request
UNKNOWN_OP = "unknown_op"
INVALID_ARGUMENT = "invalid_argument"  # the op exists; its arguments are wrong (the message names the field)
NOT_FOUND = "not_found"
INTERNAL = "internal"  # the handler failed; the server keeps running
UNAVAILABLE = "unavailable"  # client side: nobody answered in time


@record
class Request(Struct):
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@record
class ErrorInfo(Struct):
    code: str
    message: str


@record
class Reply(Struct):
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


class RequestFailed(Exception):
    """Raised by a handler to answer with an error, or by `request()` when the answer is an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- declaring ops ----------------------------------------------------------------------------------

A = TypeVar("A", bound=Struct)
R = TypeVar("R")


class Op(Generic[A, R]):
    """One control op: its name, argument record, result type and a one-line description.

    Declared as an attribute of an `Ops` group, which says who answers it. `result` is a type the schema
    validators understand: a record, `list[...]`, `dict[str, ...]`, `X | None` or `Any`.
    """

    __slots__ = ("_check", "_decode", "actor", "args", "doc", "name", "result")

    def __init__(self, name: str, args: type[A], result: Any, doc: str) -> None:
        if not (isinstance(args, type) and issubclass(args, Struct)):
            raise TypeError(f"op {name}: args must be a @record Struct, got {args!r}")
        self.name = name
        self.args = args
        self.result = result
        self.doc = doc
        self.actor = ""  # set by the Ops group it is declared in
        self._decode = _decoder_for(result)
        self._check = _checker_for(result)

    def __repr__(self) -> str:
        return f"<op {self.actor}:{self.name}>"

    # client side

    def encode_args(self, args: A | None = None) -> dict[str, Any]:
        """The `args` map of a request; None = the record's defaults (every field must have one)."""
        if args is None:
            args = self.args()
        if not isinstance(args, self.args):
            raise TypeError(f"op {self.name} takes {self.args.__name__}, got {type(args).__name__}")
        return args.to_wire()

    def decode_result(self, raw: Any) -> R:
        """A reply's `result` as the declared type; MessageError when it does not match."""
        return self._decode(raw, f"{self.name} result", "")

    # server side

    def decode_args(self, raw: dict[str, Any]) -> A:
        """A request's `args` as the op's record; MessageError naming the field when they do not match."""
        return self.args.from_wire(raw, self.name)

    def encode_result(self, value: Any) -> Any:
        """The handler's return value as it goes on the wire (records become maps; nested ones are packed
        by msgpack). TypeError when it is not what the op declares: a handler bug, answered as internal."""
        problem = self._check(value)
        if problem:
            raise TypeError(f"{self.name} handler returned {problem}")
        if isinstance(value, Message):
            return value.to_wire() | {VERSION_KEY: value.VERSION}  # a bus message keeps its version
        if isinstance(value, Struct):
            return value.to_wire()
        return value


_GROUPS: list[type[Ops]] = []


class Ops:
    """A group of ops answered by one actor. Subclass with `actor=`; every `Op` attribute joins it."""

    actor: ClassVar[str] = ""
    ops: ClassVar[tuple[Op[Any, Any], ...]] = ()

    def __init_subclass__(cls, *, actor: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, Op[Any, Any]] = {}
        for value in vars(cls).values():
            if isinstance(value, Op):
                if value.actor:
                    raise TypeError(f"op {value.name} is declared twice ({value.actor} and {actor})")
                if value.name in found:
                    raise TypeError(f"two ops named {value.name!r} in {cls.__name__}")
                value.actor = actor
                found[value.name] = value
        cls.actor = actor
        cls.ops = tuple(found.values())
        _GROUPS.append(cls)

    @classmethod
    def get(cls, name: str) -> Op[Any, Any] | None:
        return next((op for op in cls.ops if op.name == name), None)


def groups() -> list[type[Ops]]:
    """Every group of ops, in declaration order."""
    return list(_GROUPS)


def all_ops() -> Iterator[Op[Any, Any]]:
    for group in _GROUPS:
        yield from group.ops


def to_plain(value: Any) -> Any:
    """Records → dicts, all the way down (for JSON output); everything else as it is."""
    if isinstance(value, Struct):
        return {k: to_plain(v) for k, v in value.to_wire().items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _checker_for(tp: Any) -> Callable[[Any], str]:
    """What is wrong with a handler's result for declared type `tp` ("" = fine). Records are checked by
    class (their fields were typed when built); open-ended types are not checked."""
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, Struct):
        return lambda v: "" if isinstance(v, tp) else f"{type(v).__name__}, not {tp.__name__}"
    if args and type(None) in args:
        inner = _checker_for(next(a for a in args if a is not type(None)))
        return lambda v: "" if v is None else inner(v)
    if origin is list:
        item = _checker_for(args[0]) if args else (lambda v: "")

        def check_list(v: Any) -> str:
            if not isinstance(v, (list, tuple)):
                return f"{type(v).__name__}, not a list"
            return next((f"{p} (item {i})" for i, p in enumerate(map(item, v)) if p), "")

        return check_list
    if origin is dict or tp is dict:
        return lambda v: "" if isinstance(v, dict) else f"{type(v).__name__}, not a map"
    return lambda v: ""


# --- the ops ----------------------------------------------------------------------------------------


@record
class NoArgs(Struct):
    """The arguments of an op that takes none (extra fields a newer client sends are ignored)."""


# every actor (runtime/actor.py)


@record
class Ping(Struct):
    name: str  # program: controller, proxy_tcp…
    instance: str  # supervisord process name: proxy_tcp_00…
    pid: int
    uptime: float


class AnyActor(Ops, actor="*"):
    """Answered by every actor's runtime."""

    PING = Op("ping", NoArgs, Ping, "Who answers: program, instance, pid and seconds since it started.")
    COUNTERS = Op("counters", NoArgs, dict[str, int], "The runtime's and the actor's counters, as in its heartbeat.")


# controller (actors/controller/actor.py): the CLI's endpoint, controller.ctl.sock


@record
class ActorInfo(Struct):
    instance: str
    name: str
    pid: int
    uptime: float
    age: float  # seconds since its last heartbeat reached the controller
    counters: dict[str, int] = field(default_factory=dict)
    ready: bool = True
    not_ready: str = ""


@record
class ReloadOutcome(Struct):
    applied: bool
    version: int  # the policy version in force afterwards
    error: str = ""  # why the file was refused


@record
class ConfigState(Struct):
    config: dict[str, Any]  # the config in force, as in the file: {"splittun/enable": …, …}
    version: int
    last_error: str = ""  # why the file was last refused ("" = it is what is in force)


@record
class ConnectionsArgs(Struct):
    verdict: str = ""  # a verb, name or number: split, accept, block…; "" = any
    app: str = ""  # text in the process name, path or command line; "" = any
    limit: int = 200
    since: float = 0.0  # seen at or after this time (seconds since the epoch); 0 = any
    until: float = 0.0  # started at or before this time; 0 = now


@record
class ConnectionArgs(Struct):
    id: str


@record
class SplitInfo(Struct):
    """Where a split connection went: its proxy session, or (data_path "kernel") the interface and address
    the kernel sent it from, with conntrack's counts once it ended."""

    session_id: str
    worker: str
    interface: str
    local_ip: str
    local_port: int
    opened: float
    closed: float | None = None
    reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    packets_up: int = 0
    packets_down: int = 0
    data_path: str = "proxy"


@record
class ConnectionInfo(Struct):
    """One connection as the controller's registry knows it (interceptor and proxy events joined)."""

    conn_id: str
    started: float
    protocol: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    ip_version: int = 4
    inbound: bool = False
    domain: str = ""
    pid: int = -1
    exe: str = ""
    process_name: str = ""
    cmdline: list[str] = field(default_factory=list)
    uid: int = -1
    verdict: int = 0
    rule: str = ""
    reason: str = ""
    split_key: str = ""
    interface: str = ""
    ended: float | None = None
    end_reason: str = ""
    split: SplitInfo | None = None
    resolved_via: str = ""  # DNS: the path and server that answered (the query's own connection, or its answer's)
    verb: str = ""
    state: str = "open"  # open | closed


@record
class TimeWindow(Struct):
    since: float = 0.0  # seconds since the epoch; 0 = the oldest history kept
    until: float = 0.0  # 0 = now


@record
class NotificationsArgs(Struct):
    all: bool = False  # also the ones responded to, executed or expired


@record
class NotificationResponse(Struct):
    id: str
    action: str  # the id of one of its actions (suppress = "Don't show again")


@record
class NotificationsReset(Struct):
    """What `notifications reset` deleted."""

    notifications: int
    markers: int


@record
class Edited(Struct):
    """A config edit the controller accepted: written to the file and in force."""

    applied: bool
    version: int  # the policy version that carries it
    rule: PolicyRule | None = None  # rules.add: the rule as stored (with the id it was given)


@record
class InterfaceChoice(Struct):
    choice: str  # auto (or ""), an interface name, IP or MAC


@record
class RuleAdd(Struct):
    """A new rule as `splittun rules add` gives it (same names as its flags)."""

    app: str = ""  # executable path or glob
    name: str = ""  # process name
    uid: int = -1
    children: bool = False
    dest: str = ""  # domain, IP or CIDR
    proto: str = ""  # tcp | udp | ""
    port: str = ""  # N or A-B
    keep: bool = False  # keep matching connections in the VPN
    interface: str = ""  # leave through this interface instead of the global choice
    endpoint: str = ""  # a Portmaster endpoint-list line instead of the conditions above
    position: int = 0  # 1 = first; 0 = last


@record
class RuleRef(Struct):
    id: str


@record
class RuleMove(Struct):
    id: str
    position: int  # 1 = first


@record
class ConfigSet(Struct):
    key: str  # splittun/enable, splittun/interface, splittun/rules
    value: str  # as typed on the command line (JSON for splittun/rules)


@record
class PresetApply(Struct):
    """`splittun presets apply NAME`: one rule that stands for the preset's destinations (same names as its flags)."""

    name: str
    keep: bool = False  # keep the preset's connections in the VPN (an exception) instead of splitting them
    interface: str = ""  # leave through this interface instead of the global choice
    position: int = 0  # 1 = first; 0 = last


@record
class PresetRef(Struct):
    name: str


@record
class UpdateApply(Struct):
    staging: str  # the staging directory the CLI downloaded and verified (a name in $SPLITTUN_HOME)


@record
class UpdateOutcome(Struct):
    """A preset version switch the controller made: now in force, the one before it, the policy carrying it."""

    kind: str  # bootstrap | upgrade | downgrade | republish | rollback
    current: str  # "splittun-presets 1.2.0 (2026-12-01 10:00 UTC)"
    previous: str
    version: int  # the policy version compiled from the presets now in force


class Controller(Ops, actor="controller"):
    """Config, policy, connection registry. While splittun runs it is the only writer of the config file:
    every edit below is validated, written atomically and applied, or refused with one line."""

    ACTORS = Op("actors", NoArgs, list[ActorInfo], "Every actor instance's last heartbeat, with its age.")
    POLICY = Op("policy", NoArgs, PolicySnapshot, "The policy snapshot in force (actors ask for it when they start).")
    RELOAD = Op("reload", NoArgs, ReloadOutcome, "Read the config file now; apply it when valid, else keep the old.")
    CONFIG = Op("config", NoArgs, ConfigState, "The config in force, its policy version and the last refusal.")
    NETENV = Op("netenv", NoArgs, NetenvChanged | None, "The last network snapshot netenv published (nil: none yet).")
    CONNECTIONS = Op("connections", ConnectionsArgs, list[ConnectionInfo], "Recent connections, newest first.")
    CONNECTION = Op("connection", ConnectionArgs, ConnectionInfo, "One connection, live or from history.")
    COUNTS = Op("connections.counts", TimeWindow, dict[str, int], "Connections per verdict verb in a time window.")
    NOTIFICATIONS = Op("notifications", NotificationsArgs, list[Notification], "Notifications, newest first.")
    RESPOND = Op("notifications.respond", NotificationResponse, Notification, "Answer a notification with an action.")
    NOTIFY = Op(
        "notify", Notification, Notification | None, "Show a notification (nil: suppressed, or already showing)."
    )
    RESET_NOTIFICATIONS = Op(
        "notifications.reset", NoArgs, NotificationsReset, "Delete every notification state and suppression marker."
    )
    ENABLE = Op("enable", NoArgs, Edited, "Split tunnelling on.")
    DISABLE = Op("disable", NoArgs, Edited, "Split tunnelling off: every connection stays in the VPN.")
    SET_INTERFACE = Op("interface.set", InterfaceChoice, Edited, "Choose the split interface (auto, name, IP, MAC).")
    ADD_RULE = Op("rules.add", RuleAdd, Edited, "Add a rule (split unless keep) at a position, last by default.")
    REMOVE_RULE = Op("rules.remove", RuleRef, Edited, "Remove a rule by id.")
    MOVE_RULE = Op("rules.move", RuleMove, Edited, "Move a rule to a position (1 = first; first match wins).")
    SET_CONFIG = Op("config.set", ConfigSet, Edited, "Set one option from its command-line text.")
    APPLY_PRESET = Op("presets.apply", PresetApply, Edited, "Apply a preset: one rule expanded at compile time.")
    REMOVE_PRESET = Op("presets.remove", PresetRef, Edited, "Remove an applied preset's rule.")
    APPLY_UPDATE = Op("update.apply", UpdateApply, UpdateOutcome, "Install a staged preset version if the rules allow.")
    ROLLBACK_UPDATE = Op("update.rollback", NoArgs, UpdateOutcome, "Go back to the previous preset version.")


# interceptor (actors/interceptor/actor.py)


@record
class RulesChecked(Struct):
    moved: list[str]  # jump rules that had been displaced and were put back on top


class Interceptor(Ops, actor="interceptor"):
    """Every interceptor worker (interceptor, interceptor_01…)."""

    CHECK_RULES = Op("check_rules", NoArgs, RulesChecked, "Put displaced jump rules back on top now (worker 0).")
    STATUS = Op("status", NoArgs, dict[str, Any], "Queues, policy version, routing and the engine's counters.")


# netenv (actors/netenv/actor.py)


@record
class Lookup(Struct):
    """Exactly one of these: `query` is an IP, MAC or name, tried in that order."""

    query: str | None = None
    ip: str | None = None
    mac: str | None = None
    name: str | None = None


@record
class Location(Struct):
    disabled: bool  # network-derived location lookups off (a VPN is connecting)


class Netenv(Ops, actor="netenv"):
    """The network environment actor."""

    SNAPSHOT = Op("snapshot", NoArgs, NetenvChanged, "The last published snapshot (unavailable before the first).")
    LOOKUP = Op("lookup", Lookup, InterfaceRecord | None, "The usable interface with that IP, MAC or name, or nil.")
    LOCATION = Op("location", Location, Location, "Turn network-derived location off or on; answers the new state.")


# proxies (core/proxy/service.py): every proxy_tcp_NN and proxy_udp_NN worker


@record
class Upstream(Struct):
    ip: str
    port: int


@record
class SessionsArgs(Struct):
    limit: int = 200


@record
class ProxyStatus(Struct):
    protocol: str  # tcp | udp
    listen: list[list[Any]]  # [ip, port] pairs
    egress: dict[str, str]  # ipv4/ipv6 → "eth0 src 192.0.2.10 via 192.0.2.1" or "none (why)"
    counters: dict[str, int]


@record
class DnsStatus(Struct):
    """What the resolver does now: where each path's queries go, its cache and counters."""

    listen: list[str]  # addresses it answers on (127.0.0.17:53, [::1]:53; UDP and TCP)
    rerouting: bool  # ready: the interceptor sends DNS here
    not_ready: str  # why not ("" = ready)
    upstreams: dict[str, list[str]]  # path → servers ("vpn": the server each app asked, …)
    split_dns_source: str  # where the split servers come from: "splittun/splitDNS", "netenv (…)", "none"
    vpn_domains: list[str]
    cache_entries: int
    cache_hit_rate: float
    counters: dict[str, int]
    recent: list[DnsQuery] = field(default_factory=list)  # the last queries answered, newest last
    vpn_dns_source: str = ""  # where the vpn path's servers come from: "" (each app's own), "IVPN (delegated)"


@record
class DnsFlushed(Struct):
    dropped: int  # cached answers forgotten


class Resolver(Ops, actor="resolver"):
    """Answered by the resolver (actors/resolver): the host's DNS path while splittun runs."""

    STATUS = Op("status", NoArgs, DnsStatus, "Mode, upstreams per path, cache size and hit rate, counters.")
    FLUSH = Op("flush", NoArgs, DnsFlushed, "Forget every cached answer now.")


class Proxy(Ops, actor="proxy"):
    """Every proxy worker (proxy_tcp_NN, proxy_udp_NN)."""

    EGRESS = Op("egress", Upstream, list[dict[str, Any]], "The sessions whose upstream goes to ip:port.")
    SESSIONS = Op("sessions", SessionsArgs, list[dict[str, Any]], "Open sessions, at most limit.")
    STATUS = Op("status", NoArgs, ProxyStatus, "Protocol, listen addresses, egress per family and counters.")


class Ivpn(Ops, actor="ivpn"):
    """Answered by the ivpn actor (actors/ivpn): the IVPN daemon client."""

    STATUS = Op("status", NoArgs, IvpnStatus, "IVPN as last heard from its daemon (daemon false: not running).")
    CONNECT = Op("daemon.connect", NoArgs, IvpnStatus, "Look for the daemon now, not after the backoff; the status.")


# api (actors/api/actor.py): the local HTTP API


@record
class LoginCode(Struct):
    url: str  # open it in a browser on this machine: the code in it works once
    expires: float  # seconds since the epoch


class Api(Ops, actor="api"):
    """The local HTTP API actor."""

    LOGIN = Op("login", NoArgs, LoginCode, "A one-time login URL for a browser (splittun ui): code → session cookie.")


__all__ = [
    "BAD_REQUEST",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "UNAVAILABLE",
    "UNKNOWN_OP",
    "ActorInfo",
    "AnyActor",
    "Api",
    "ConfigSet",
    "ConfigState",
    "ConnectionArgs",
    "ConnectionInfo",
    "ConnectionsArgs",
    "Controller",
    "Edited",
    "ErrorInfo",
    "Interceptor",
    "InterfaceChoice",
    "Location",
    "LoginCode",
    "Lookup",
    "Netenv",
    "NoArgs",
    "NotificationResponse",
    "NotificationsArgs",
    "NotificationsReset",
    "Op",
    "Ops",
    "Ping",
    "PresetApply",
    "PresetRef",
    "Proxy",
    "ProxyStatus",
    "ReloadOutcome",
    "Reply",
    "Request",
    "RequestFailed",
    "RuleAdd",
    "RuleMove",
    "RuleRef",
    "RulesChecked",
    "SessionsArgs",
    "SplitInfo",
    "TimeWindow",
    "UpdateApply",
    "UpdateOutcome",
    "Upstream",
    "all_ops",
    "groups",
    "to_plain",
]
