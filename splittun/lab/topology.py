"""Names, addresses and numbers of the lab, in one place.

Tests and later code import these instead of repeating literals, so changing the lab's shape is a
one-file edit. Addresses come only from documentation ranges (RFC 5737, RFC 3849) and ULA space.

    host ──eth0/lan0── isp ──vpnsrv0/eth0── vpnsrv  (VPN server, NATs tunnel traffic)
                        └───inet0/eth0───── inet    (whoami servers)
    host ══wgivpn (TUN) ══ UDP 51820 over the isp ══ tunsrv (TUN) on vpnsrv
"""

from __future__ import annotations

#: Namespace names are ``splittun-<lab name>-<role>``.
NS_PREFIX = "splittun-"
ROLES: tuple[str, ...] = ("host", "isp", "vpnsrv", "inet")
DEFAULT_LAB_NAME = "lab"

#: Per-lab state (pid files, logs, style JSON) lives in ``STATE_ROOT/<name>/``.
STATE_ROOT = "/run/splittun-lab"

STYLES: tuple[str, ...] = ("replaced", "wgquick")

#: Interface indexes for the veths. Fresh namespaces would give both ends of each pair ifindex 2; the
#: kernel's linkwatch then treats their carrier changes as non-urgent and applies them up to 1 s late
#: (operstate, qdisc, IPv6 addrconf readiness). Distinct indexes make lab links usable at once.
IFINDEX: dict[str, int] = {"host:eth0": 10, "isp:lan0": 11, "isp:vpnsrv0": 20, "vpnsrv:eth0": 21,
                           "isp:inet0": 30, "inet:eth0": 31, "host:eth1": 12, "isp:lan1": 13}  # fmt: skip

# --- host <-> isp: the laptop's physical uplink (a veth standing in for Wi-Fi/Ethernet) -------------
HOST_IF = "eth0"
HOST_V4 = "192.0.2.10"
HOST_V6 = "2001:db8:10::10"
ISP_LAN_IF = "lan0"
ISP_LAN_V4 = "192.0.2.1"  # the host's IPv4 default gateway ("home router")
ISP_LAN_V6 = "2001:db8:10::1"
HOST_NET_V4 = "192.0.2.0/26"
HOST_NET_V6 = "2001:db8:10::/64"
HOST_PLEN_V4 = 26
HOST_PLEN_V6 = 64

# --- host <-> isp, optional second uplink (Lab(second_uplink=True)): Wi-Fi next to Ethernet --------
# Its default route has a higher metric, as DHCP leaves it on a second adapter; a split rule can choose it.
HOST2_IF = "eth1"
HOST2_V4 = "192.0.2.130"
HOST2_V6 = "2001:db8:11::10"
ISP_LAN2_IF = "lan1"
ISP_LAN2_V4 = "192.0.2.129"
ISP_LAN2_V6 = "2001:db8:11::1"
HOST2_PLEN_V4 = 26
HOST2_PLEN_V6 = 64
SECOND_UPLINK_METRIC = 2048  # above IPv6 routes' default 1024: the VPN default still wins

# --- isp <-> vpnsrv: the VPN server's public side ------------------------------------------------
ISP_VPNSRV_IF = "vpnsrv0"
ISP_VPNSRV_V4 = "198.51.100.1"
ISP_VPNSRV_V6 = "2001:db8:20::1"
VPNSRV_IF = "eth0"
VPNSRV_V4 = "198.51.100.2"  # public address of the VPN server = exit address of tunnelled traffic
VPNSRV_V6 = "2001:db8:20::2"
VPNSRV_PLEN_V4 = 24
VPNSRV_PLEN_V6 = 64

# --- isp <-> inet: "the internet" with its test servers ------------------------------------------
ISP_INET_IF = "inet0"
ISP_INET_V4 = "203.0.113.1"
ISP_INET_V6 = "2001:db8:30::1"
INET_IF = "eth0"
INET_V4 = "203.0.113.2"
INET_V6 = "2001:db8:30::2"
INET_PLEN_V4 = 24
INET_PLEN_V6 = 64
#: Extra server addresses on inet (two, so tests can split one destination and keep the other).
SERVER_V4: tuple[str, ...] = ("203.0.113.80", "203.0.113.81")
SERVER_V6: tuple[str, ...] = ("2001:db8:30::80", "2001:db8:30::81")
WHOAMI_V4 = SERVER_V4[0]
WHOAMI_V6 = SERVER_V6[0]
WHOAMI_TCP_PORT = 80
WHOAMI_UDP_PORT = 5300

# --- the VPN tunnel --------------------------------------------------------------------------------
TUN_HOST_IF = "wgivpn"  # VPN-like name (IVPN's WireGuard interface is called wgivpn)
TUN_SRV_IF = "tunsrv"
TUN_HOST_V4 = "192.0.2.66"  # /32 point-to-point, peer TUN_SRV_V4
TUN_SRV_V4 = "192.0.2.65"
TUN_NET_V4 = "192.0.2.64/26"
TUN_HOST_V6 = "fd00:5717::2"
TUN_SRV_V6 = "fd00:5717::1"
TUN_NET_V6 = "fd00:5717::/64"
TUN_PLEN_V6 = 64
#: Same headroom as WireGuard (1500 - 80), so tunnelled packets never need outer fragmentation.
TUN_MTU = 1420
VPN_SERVER_PORT = 51820  # UDP transport port on vpnsrv
VPN_CLIENT_PORT = 51821  # fixed source port of the host-side forwarder (deterministic conntrack)

# --- wg-quick style -----------------------------------------------------------------------------
WG_TABLE = 51820
WG_FWMARK = 51820
WG_RULE_PREF_SUPPRESS = 32764  # "lookup main suppress_prefixlength 0"
WG_RULE_PREF_FWMARK = 32765  # "not fwmark 51820 lookup 51820"
WG_NFT_TABLE = "wg-quick-wgivpn"

# --- the test client's forced ISP path (whoami path="isp") -----------------------------------------
ISP_PATH_MARK = 0x5157
ISP_PATH_TABLE = 5157
ISP_PATH_RULE_PREF = 5157  # well before wg-quick's 32764/32765

#: Sysctl value for host rp_filter; see lab.py for why it is loose.
HOST_RP_FILTER = 2

# --- the leak monitor on the physical link (splittun.lab.leakmon) ----------------------------------
#: IP TTL / IPv6 hop limit of the lab's own deliberate ISP-path probes (Lab.whoami(path="isp"),
#: Lab.wait_ready): the leak monitor captures before isp decrements it and counts them as probes.
PROBE_TTL = 37
#: UDP port of the monitor's sync frames: injected on the host's uplinks (AF_PACKET, never routed), sent
#: to a MAC nobody owns so isp drops them, and recognised by the monitor by port, TTL and payload.
LEAKMON_SYNC_PORT = 4737
#: The monitor's flow log (one JSON object a line) in the lab's state dir.
LEAKMON_LOG = "leakmon.jsonl"
