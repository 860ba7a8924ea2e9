"""Wire schemas, constants and ZeroMQ plumbing shared by every splittun process.

- `verdict`, `marks`: Portmaster's verdict enum and packet marks, defined once.
- `schema`, `events`, `control`: typed msgpack schemas for bus messages and control requests; `schema`
  also says how events are framed on the bus (`WIRE_VERSION`: one or more events of one topic per message).
- `compat`: the version 1 shapes of events version 2 merged, for views that show the bus.
- `flows`: the flow key the interceptor and the proxies both use for a connection.
- `endpoints`, `transport`, `loop`, `log`: where sockets live, publish/subscribe/request/reply helpers,
  the poll loop every process runs, and the one log-line format.
- `bus`: the XSUB/XPUB forwarder program (`python -m runtime.bus`).
"""

from .control import Reply, Request, RequestFailed
from .events import (
    ConnEnd,
    ConnNew,
    ConnVerdict,
    DnsQuery,
    GatewayRecord,
    Heartbeat,
    InterceptionState,
    InterfaceRecord,
    IvpnStatus,
    NetenvChanged,
    Notification,
    NotificationAction,
    PolicyRule,
    PolicySnapshot,
    ProcessInfo,
    ProxySessionClose,
    ProxySessionOpen,
    ProxySessionStats,
    SessionCounters,
    UpdatesStale,
)
from .flows import canonical_ip, flow_key
from .marks import Mark, Queue
from .schema import WIRE_VERSION, Message, MessageError, decode, decode_all, known_topics, schema_for_topic, unbatch
from .verdict import Verdict, verdict_string, verdict_verb

__all__ = [
    "WIRE_VERSION",
    "ConnEnd",
    "ConnNew",
    "ConnVerdict",
    "DnsQuery",
    "GatewayRecord",
    "Heartbeat",
    "InterceptionState",
    "InterfaceRecord",
    "IvpnStatus",
    "Mark",
    "Message",
    "MessageError",
    "NetenvChanged",
    "Notification",
    "NotificationAction",
    "PolicyRule",
    "PolicySnapshot",
    "ProcessInfo",
    "ProxySessionClose",
    "ProxySessionOpen",
    "ProxySessionStats",
    "Queue",
    "Reply",
    "Request",
    "RequestFailed",
    "SessionCounters",
    "UpdatesStale",
    "Verdict",
    "canonical_ip",
    "decode",
    "decode_all",
    "flow_key",
    "known_topics",
    "schema_for_topic",
    "unbatch",
    "verdict_string",
    "verdict_verb",
]
