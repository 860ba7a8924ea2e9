"""A proxy_udp worker process: the UDP split proxy (actors/proxy) behind the shared proxy actor."""

from __future__ import annotations

from core.proxy.service import ProxyActor
from core.proxy.udp import UdpProxy


class ProxyUdpActor(ProxyActor):
    """Transparent UDP split proxy worker."""

    name = "proxy_udp"
    proxy_class = UdpProxy
