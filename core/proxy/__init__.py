"""The split proxies' library: transparent TCP and UDP proxies usable with or without the actors.

    from core.proxy import TcpProxy, UdpProxy, SplitDecider, static_egress
    decider = SplitDecider(static_egress("eth0", source4="192.0.2.10", gateway4="192.0.2.1"))
    proxy = TcpProxy([("127.0.0.17", 719)], decider)
    proxy.start()          # its own data thread
    ...
    proxy.shutdown(5.0)    # stop accepting, drain, close

README.md explains how the proxies sit in the data path. The split policy routing their upstream sockets
need is not theirs to install: kernel/routing.py (kept by the interceptor; applied by hand when the proxies
run standalone).
"""

from core.egress import Egress, EgressSet, resolve_egress, static_egress

from .base import ProxyBase, SessionHooks, parse_address
from .config import ProxyConfig
from .decider import (
    Address,
    Binding,
    Decider,
    Refusal,
    SessionRequest,
    SplitDecider,
    UpstreamPlan,
    to_original_destination,
)
from .session import Session, SessionTable
from .tcp import TcpProxy
from .udp import UdpProxy

__all__ = [
    "Address",
    "Binding",
    "Decider",
    "Egress",
    "EgressSet",
    "ProxyBase",
    "ProxyConfig",
    "Refusal",
    "Session",
    "SessionHooks",
    "SessionRequest",
    "SessionTable",
    "SplitDecider",
    "TcpProxy",
    "UdpProxy",
    "UpstreamPlan",
    "parse_address",
    "resolve_egress",
    "static_egress",
    "to_original_destination",
]
