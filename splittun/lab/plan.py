"""What the lab is made of, as data: the `ip -batch` lines, sysctls, nft scripts and firewall commands.

Pure: nothing here runs a program or touches a namespace, so the whole shape of the lab is unit-tested
without root (tests/unit/splittun/test_lab_plan.py), the way the interceptor's firewall rules are. `lab.py`
applies these plans in the lab's namespaces and orders the steps (links first, style switches so that nothing
leaks).

Roles are the lab's namespaces: "host" (the laptop), "isp", "vpnsrv", "inet". A batch is a list of `ip -batch`
lines for one role, optionally for one address family ("-4"/"-6": routes and rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splittun.lab import topology as T

FAMILIES = ("-4", "-6")

#: Kept identical in every namespace (each new namespace inherits IPv4 settings from the root one: pin them).
COMMON_SYSCTLS: dict[str, int] = {
    # Addresses usable at once: no DAD, no RA-learned routes that would blur the topology.
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
    "net.ipv6.conf.all.accept_ra": 0,
    "net.ipv6.conf.default.accept_ra": 0,
    "net.ipv4.conf.all.accept_redirects": 0,
    "net.ipv4.conf.default.accept_redirects": 0,
    "net.ipv6.conf.all.accept_redirects": 0,
    "net.ipv6.conf.default.accept_redirects": 0,
    # No proxy ARP/NDP anywhere, so on-link guesses get no answer.
    "net.ipv4.conf.all.proxy_arp": 0,
    "net.ipv4.conf.default.proxy_arp": 0,
    "net.ipv6.conf.all.proxy_ndp": 0,
    "net.ipv6.conf.default.proxy_ndp": 0,
    "net.ipv4.conf.all.src_valid_mark": 0,
}


def sysctls(role: str, host_rp_filter: int = T.HOST_RP_FILTER) -> dict[str, int]:
    """Every sysctl a role's namespace gets when the lab is built.

    The laptop: no forwarding, rp_filter loose (2) as systemd-based distros ship it — strict (1) drops replies
    to marked split traffic arriving on eth0, because the reverse lookup is done without the mark and finds
    the VPN default; Lab(rp_filter=1) reproduces that harsher setup on purpose. Routers forward and keep
    strict rp_filter (their paths are symmetric, and it stops tunnel-internal addresses leaking out).
    """
    forwarding = 1 if role in ("isp", "vpnsrv") else 0
    rp = host_rp_filter if role == "host" else 1
    return {
        **COMMON_SYSCTLS,
        "net.ipv4.ip_forward": forwarding,
        "net.ipv6.conf.all.forwarding": forwarding,
        "net.ipv4.conf.all.rp_filter": rp,
        "net.ipv4.conf.default.rp_filter": rp,
    }


@dataclass(frozen=True)
class Veth:
    """A veth pair created straight between two lab namespaces (nothing ever appears in the root one)."""

    a_role: str
    a_if: str
    b_role: str
    b_if: str

    def argv(self, ns_a: str, ns_b: str) -> list[str]:
        """The `ip` command that creates it (with fixed interface indexes: see topology.IFINDEX)."""
        return [
            "ip",
            "-n",
            ns_a,
            "link",
            "add",
            self.a_if,
            "index",
            str(T.IFINDEX[f"{self.a_role}:{self.a_if}"]),
            "type",
            "veth",
            "peer",
            "name",
            self.b_if,
            "index",
            str(T.IFINDEX[f"{self.b_role}:{self.b_if}"]),
            "netns",
            ns_b,
        ]


def veths(second_uplink: bool = False) -> list[Veth]:
    pairs = [
        Veth("host", T.HOST_IF, "isp", T.ISP_LAN_IF),
        Veth("isp", T.ISP_VPNSRV_IF, "vpnsrv", T.VPNSRV_IF),
        Veth("isp", T.ISP_INET_IF, "inet", T.INET_IF),
    ]
    if second_uplink:
        pairs.append(Veth("host", T.HOST2_IF, "isp", T.ISP_LAN2_IF))
    return pairs


def veth_interfaces(second_uplink: bool = False) -> dict[str, set[str]]:
    """Role → the veth interfaces it has: what must report operstate UP before the lab is usable."""
    out: dict[str, set[str]] = {}
    for v in veths(second_uplink):
        out.setdefault(v.a_role, set()).add(v.a_if)
        out.setdefault(v.b_role, set()).add(v.b_if)
    return out


@dataclass
class Batch:
    """`ip -batch` lines for one role; `family` "-4"/"-6" for routes and rules, "" for links and addresses."""

    role: str
    lines: list[str]
    family: str = ""


def _addr_lines(v4: str, plen4: int, v6: str, plen6: int, dev: str) -> list[str]:
    return [f"addr add {v4}/{plen4} dev {dev}", f"addr add {v6}/{plen6} dev {dev} nodad"]


def addresses(second_uplink: bool = False) -> list[Batch]:
    """Loopback, addresses, TUN devices and the routers' default routes, in the order they are applied."""
    host = [
        "link set lo up",
        *_addr_lines(T.HOST_V4, T.HOST_PLEN_V4, T.HOST_V6, T.HOST_PLEN_V6, T.HOST_IF),
        f"link set {T.HOST_IF} up",
        # The VPN client's TUN: persistent, so routes can be set before the forwarder attaches and
        # survive a forwarder restart (as with a kernel WireGuard interface).
        f"tuntap add dev {T.TUN_HOST_IF} mode tun",
        f"link set {T.TUN_HOST_IF} mtu {T.TUN_MTU} up",
        f"addr add {T.TUN_HOST_V4}/32 peer {T.TUN_SRV_V4}/32 dev {T.TUN_HOST_IF}",
        f"addr add {T.TUN_HOST_V6}/{T.TUN_PLEN_V6} dev {T.TUN_HOST_IF} nodad",
    ]
    isp = [
        "link set lo up",
        *_addr_lines(T.ISP_LAN_V4, T.HOST_PLEN_V4, T.ISP_LAN_V6, T.HOST_PLEN_V6, T.ISP_LAN_IF),
        *_addr_lines(T.ISP_VPNSRV_V4, T.VPNSRV_PLEN_V4, T.ISP_VPNSRV_V6, T.VPNSRV_PLEN_V6, T.ISP_VPNSRV_IF),
        *_addr_lines(T.ISP_INET_V4, T.INET_PLEN_V4, T.ISP_INET_V6, T.INET_PLEN_V6, T.ISP_INET_IF),
        f"link set {T.ISP_LAN_IF} up",
        f"link set {T.ISP_VPNSRV_IF} up",
        f"link set {T.ISP_INET_IF} up",
    ]
    batches = [Batch("host", host), Batch("isp", isp)]
    if second_uplink:
        batches += [
            Batch(
                "host",
                [
                    *_addr_lines(T.HOST2_V4, T.HOST2_PLEN_V4, T.HOST2_V6, T.HOST2_PLEN_V6, T.HOST2_IF),
                    f"link set {T.HOST2_IF} up",
                ],
            ),
            Batch(
                "isp",
                [
                    *_addr_lines(T.ISP_LAN2_V4, T.HOST2_PLEN_V4, T.ISP_LAN2_V6, T.HOST2_PLEN_V6, T.ISP_LAN2_IF),
                    f"link set {T.ISP_LAN2_IF} up",
                ],
            ),
        ]
    vpnsrv = [
        "link set lo up",
        *_addr_lines(T.VPNSRV_V4, T.VPNSRV_PLEN_V4, T.VPNSRV_V6, T.VPNSRV_PLEN_V6, T.VPNSRV_IF),
        f"link set {T.VPNSRV_IF} up",
        f"tuntap add dev {T.TUN_SRV_IF} mode tun",
        f"link set {T.TUN_SRV_IF} mtu {T.TUN_MTU} up",
        f"addr add {T.TUN_SRV_V4}/32 peer {T.TUN_HOST_V4}/32 dev {T.TUN_SRV_IF}",
        f"addr add {T.TUN_SRV_V6}/{T.TUN_PLEN_V6} dev {T.TUN_SRV_IF} nodad",
    ]
    inet = ["link set lo up"]
    inet += [f"addr add {addr}/{T.INET_PLEN_V4} dev {T.INET_IF}" for addr in (T.INET_V4, *T.SERVER_V4)]
    inet += [f"addr add {addr}/{T.INET_PLEN_V6} dev {T.INET_IF} nodad" for addr in (T.INET_V6, *T.SERVER_V6)]
    inet.append(f"link set {T.INET_IF} up")
    batches += [
        Batch("vpnsrv", vpnsrv),
        Batch("vpnsrv", [f"route add default via {T.ISP_VPNSRV_V4} dev {T.VPNSRV_IF}"], "-4"),
        Batch("vpnsrv", [f"route add default via {T.ISP_VPNSRV_V6} dev {T.VPNSRV_IF}"], "-6"),
        Batch("inet", inet),
        Batch("inet", [f"route add default via {T.ISP_INET_V4} dev {T.INET_IF}"], "-4"),
        Batch("inet", [f"route add default via {T.ISP_INET_V6} dev {T.INET_IF}"], "-6"),
    ]
    return batches


def vpn_server_nat() -> list[list[str]]:
    """Masquerade tunnel traffic out of the VPN server's public address (legacy iptables, run in vpnsrv)."""
    return [
        [tool, "-w", "-t", "nat", "-A", "POSTROUTING", "-s", net, "-o", T.VPNSRV_IF, "-j", "MASQUERADE"]
        for tool, net in (("iptables-legacy", T.TUN_NET_V4), ("ip6tables-legacy", T.TUN_NET_V6))
    ]


# --- routing styles ----------------------------------------------------------------------------------------


def tunnel_mark(style: str) -> int:
    """The mark the host's forwarder puts on its transport socket: wg-quick's fwmark, else none."""
    return T.WG_FWMARK if style == "wgquick" else 0


@dataclass
class StylePlan:
    """How the host routes in one style: what to add (in order) after both styles' routing was removed."""

    batches: list[Batch] = field(default_factory=list)
    nft: str = ""  # an `nft -f -` script, "" = none
    src_valid_mark: int = 0


def style(style: str, antispoof: bool = False, second_uplink: bool = False) -> StylePlan:
    """The host's routing in `style`: "replaced" (the VPN replaced the default route; a host route keeps the
    VPN server reachable, as OpenVPN does) or "wgquick" (main keeps the physical default; wg-quick's fwmark
    rules send everything else into table 51820). The physical default comes last, once the rules keep
    unmarked traffic off it: at no moment of a switch does VPN traffic meet a default route via an uplink."""
    plan = StylePlan()
    if style == "replaced":
        plan.batches += [
            Batch(
                "host",
                [
                    f"route add {T.VPNSRV_V4}/32 via {T.ISP_LAN_V4} dev {T.HOST_IF}",
                    f"route add default dev {T.TUN_HOST_IF}",
                ],
                "-4",
            ),
            Batch("host", [f"route add default dev {T.TUN_HOST_IF}"], "-6"),
        ]
    elif style == "wgquick":
        for fam, gw in (("-4", T.ISP_LAN_V4), ("-6", T.ISP_LAN_V6)):
            plan.batches.append(
                Batch(
                    "host",
                    [
                        f"route add default dev {T.TUN_HOST_IF} table {T.WG_TABLE}",
                        f"rule add not fwmark {T.WG_FWMARK} table {T.WG_TABLE} pref {T.WG_RULE_PREF_FWMARK}",
                        f"rule add table main suppress_prefixlength 0 pref {T.WG_RULE_PREF_SUPPRESS}",
                        f"route add default via {gw} dev {T.HOST_IF}",
                    ],
                    fam,
                )
            )
        plan.src_valid_mark = 1  # wg-quick sets it so rp_filter sees the connmark-restored transport mark
    else:
        raise ValueError(f"style must be one of {T.STYLES}, not {style!r}")
    if second_uplink:  # Wi-Fi beside Ethernet: a higher metric, as DHCP leaves it on a second adapter
        for fam, gw in (("-4", T.ISP_LAN2_V4), ("-6", T.ISP_LAN2_V6)):
            plan.batches.append(
                Batch("host", [f"route add default via {gw} dev {T.HOST2_IF} metric {T.SECOND_UPLINK_METRIC}"], fam)
            )
    plan.nft = nft_script(style, antispoof)
    return plan


#: What a style switch removes first (each `ip` command repeated until it fails: there may be several), in this
#: order: default routes through the uplinks first, so VPN traffic never meets one without wg-quick's rules.
def style_removals() -> list[list[str]]:
    out: list[list[str]] = []
    for fam in FAMILIES:
        out += [[fam, "route", "del", "default", "dev", dev] for dev in (T.HOST_IF, T.HOST2_IF)]
        out.append([fam, "route", "del", "default"])
        out += [[fam, "rule", "del", "pref", str(pref)] for pref in (T.WG_RULE_PREF_SUPPRESS, T.WG_RULE_PREF_FWMARK)]
    return out


#: Removed once each (a failure means: not there).
STYLE_FLUSHES: list[list[str]] = [
    *([fam, "route", "flush", "table", str(T.WG_TABLE)] for fam in FAMILIES),
    ["-4", "route", "del", f"{T.VPNSRV_V4}/32"],
]


def nft_script(style: str, antispoof: bool) -> str:
    """wg-quick's nft table: connmark save/restore of the transport mark, optional anti-spoofing."""
    if style != "wgquick" and not antispoof:
        return ""
    lines = []
    for fam, tun_addr in (("ip", T.TUN_HOST_V4), ("ip6", T.TUN_HOST_V6)):
        t = f"{fam} {T.WG_NFT_TABLE}"
        lines += [
            f"add table {t}",
            f"add chain {t} preraw {{ type filter hook prerouting priority -300; }}",
            f"add chain {t} premangle {{ type filter hook prerouting priority -150; }}",
            f"add chain {t} postmangle {{ type filter hook postrouting priority -150; }}",
        ]
        if antispoof:
            lines.append(
                f'add rule {t} preraw iifname != "{T.TUN_HOST_IF}" {fam} daddr {tun_addr} fib saddr type != local drop'
            )
        if style == "wgquick":
            lines.append(f"add rule {t} postmangle meta l4proto udp mark {T.WG_FWMARK} ct mark set mark")
            lines.append(f"add rule {t} premangle meta l4proto udp meta mark set ct mark")
    return "\n".join(lines) + "\n"


# --- the test client's forced ISP path -------------------------------------------------------------------

ISP_PATH_NFT_TABLE = "splittun-lab-isppath"
#: With strict rp_filter the forced ISP path needs its mark saved to and restored from conntrack (as wg-quick
#: does for its transport), or the replies' reverse-path check finds the VPN default and drops them.
ISP_PATH_NFT = f"""
add table inet {ISP_PATH_NFT_TABLE}
add chain inet {ISP_PATH_NFT_TABLE} out {{ type filter hook output priority mangle; }}
add chain inet {ISP_PATH_NFT_TABLE} pre {{ type filter hook prerouting priority mangle; }}
add rule inet {ISP_PATH_NFT_TABLE} out meta mark {T.ISP_PATH_MARK:#x} ct mark set meta mark
add rule inet {ISP_PATH_NFT_TABLE} pre ct mark {T.ISP_PATH_MARK:#x} meta mark set ct mark
"""


def isp_path() -> list[Batch]:
    """Route SO_MARK ISP_PATH_MARK out of eth0 via the ISP gateway (host only), for the lab's own probes."""
    return [
        Batch(
            "host",
            [
                f"route replace default via {gw} dev {T.HOST_IF} table {T.ISP_PATH_TABLE}",
                f"rule add fwmark {T.ISP_PATH_MARK:#x} lookup {T.ISP_PATH_TABLE} pref {T.ISP_PATH_RULE_PREF}",
            ],
            fam,
        )
        for fam, gw in (("-4", T.ISP_LAN_V4), ("-6", T.ISP_LAN_V6))
    ]
