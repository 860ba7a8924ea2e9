"""interceptor: the firewall half of the split tunnel (on the packet hot path).

Linux: iptables-legacy rules queue the first packet of each new connection to NFQUEUE; this actor
attributes it to a process, evaluates its own copy of the policy snapshot and sets a verdict and mark
(1719 = split, DNAT'd to the proxies). It never waits on another process to decide a packet.
"""
