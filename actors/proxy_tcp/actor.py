"""A proxy_tcp worker process: the TCP split proxy (actors/proxy) behind the shared proxy actor."""

from __future__ import annotations

from core.proxy.service import ProxyActor
from core.proxy.tcp import TcpProxy


class ProxyTcpActor(ProxyActor):
    """Transparent TCP split proxy worker."""

    name = "proxy_tcp"
    proxy_class = TcpProxy
