"""The splittun actors: one package per OS process, all built on `runtime.actor`.

interceptor (verdicts, firewall rules), proxy_tcp / proxy_udp (the split data path), netenv (interfaces
and the physical uplink), ivpn (IVPN daemon interop), controller (config, policy, connection registry,
the CLI's endpoint). Each runs as `python -m actors.<name>` under supervisord.

Code that two actors share lives here, once: runtime.py (the actor runtime), netlink.py (netlink framing
and socket: interceptor, proxies, netenv), conntrack.py (ctnetlink: interceptor and proxies).
"""
