"""IVPN beside splittun in a lab: the project's fake IVPN daemon runs in the lab host (its port file where the
ivpn actor is told to look, SPLITTUN_IVPN_PORT_FILE passed on by supervisord).

- `splittun ivpn` follows what a user does in IVPN's UI: the daemon starting, connecting, disconnecting,
  restarting with a new port and secret, exiting; netenv's interface-derived location is off while IVPN
  holds its tunnel.
- IVPN's own processes are never split, whatever the user's rules say (the interceptor's IVPN verdict
  handler; SPLITTUN_IVPN_EXECUTABLES names a copy of curl as IVPN's daemon).
- With IVPN's kill switch on, split apps and splittun's own traffic keep working and the rest obeys it.
- wg-quick's anti-spoofing rule in its iptables form (no nft): every IVPN state change reconciles our
  exemption for the proxies' replies on lo; split UDP works through it.
- Bypass routes: `splittun/bypassHosts` leave via the physical gateway (table and rule 717) from the moment
  IVPN starts connecting until it disconnects.
- DNS delegation: while IVPN is connected with custom DNS, VPN apps' queries go to IVPN's DNS server with
  its encryption (the lab's geo DNS servers log each query and how it came).

One splittun serves the module."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from splittun.lab import topology as T
from splittun.lab.geodns import GEO_NAME, GeoDns
from splittun.lab.ivpn import IvpnDaemonProcess, kill_switch_off, kill_switch_on, physical_link_blocked
from tests.support.e2e import E2E, host_state, python_app, socat_udp
from tests.support.interceptor import chain_rules, wait_until
from tests.support.lab import LAB_STYLES, Leaks, own_lab, parse_style

CARRIER = f"{T.VPNSRV_V4}:{T.VPN_SERVER_PORT}"  # the lab's VPN server: what IVPN reports as its server
SPLIT_SERVER = T.SERVER_V4[1]


@pytest.fixture(scope="module")
def port_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="st-ivpn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def st(port_dir: Path) -> Iterator[E2E]:
    labs = own_lab("iv")
    harness = E2E(next(labs))
    geo = GeoDns(harness.lab)
    harness.geo = geo  # type: ignore[attr-defined]
    harness.env = {
        "SSL_CERT_FILE": str(geo.ca_file),  # the resolver trusts the lab's DNS-over-TLS servers
        "SPLITTUN_IVPN_PORT_FILE": str(port_dir / "port.txt"),
        "SPLITTUN_IVPN_EXECUTABLES": str(port_dir / "ivpn-service"),
        # No scheduled jump checks (5/15/45 s after start): only IVPN's own state changes move ours back.
        "SPLITTUN_JUMP_CHECKS": "",
    }
    try:
        with geo:
            harness.ensure("replaced")
            harness.reset()
            yield harness
    finally:
        try:
            harness.stop()
        finally:
            labs.close()


def ivpn(st: E2E, *args: str) -> dict[str, Any]:
    return json.loads(st.ok("ivpn", "--json", *args))


def location_off(st: E2E) -> bool:
    """netenv's location gate, as its last `netenv.changed` says (what location consumers read)."""
    assert st.inst is not None
    return bool(st.inst.ask("netenv", "snapshot")["location_disabled"])


def until(st: E2E, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The status once `check(status)` holds (the last one seen otherwise, for the assertion message)."""
    seen: list[dict[str, Any]] = []

    def probe() -> bool:
        seen.append(ivpn(st))
        return bool(check(seen[-1]))

    assert wait_until(probe, timeout=timeout), f"ivpn status never matched: {seen[-1] if seen else None}"
    return seen[-1]


def test_status_follows_the_daemon_through_connect_restart_and_exit(st: E2E, port_dir: Path, leaks: Leaks) -> None:
    assert not (port_dir / "port.txt").exists()
    assert "daemon: not running" in st.ok("ivpn")
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        # `ping` looks at once instead of after the backoff (up to 10 s without a daemon).
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"] and s["state"] == "DISCONNECTED", timeout=3)
        fake.command("connect")
        up = until(st, lambda s: s["connected"])
        assert (up["server_ip"], up["server_port"], up["client_ip"], up["interface"]) == (
            T.VPNSRV_V4, T.VPN_SERVER_PORT, T.TUN_HOST_V4, T.TUN_HOST_IF)  # fmt: skip
        text = st.ok("ivpn")
        assert "vpn: connected" in text and f"to {CARRIER}/udp on {T.TUN_HOST_IF}" in text, text
        assert wait_until(lambda: location_off(st)), "netenv's interface-derived location stayed on"

        old_port = fake.port
        connects = st.inst.ask("ivpn", "counters")["connects"] if st.inst else 0
        fake.command("restart")  # a new port and a new secret in the port file
        assert fake.port != old_port
        assert wait_until(lambda: st.inst is not None and st.inst.ask("ivpn", "counters")["connects"] > connects)
        again = until(st, lambda s: s["daemon"] and s["connected"])
        assert again["server_ip"] == T.VPNSRV_V4

        fake.command("killswitch on")
        assert until(st, lambda s: s["kill_switch"])["kill_switch"]
        fake.command("disconnect")
        down = until(st, lambda s: s["state"] == "DISCONNECTED")
        assert not down["connected"] and down["server_ip"] == "", down
        assert wait_until(lambda: not location_off(st)), "netenv's interface-derived location stayed off"
    finally:
        fake.stop()
    gone = until(st, lambda s: not s["daemon"])
    assert gone["state"] == "DISCONNECTED"
    assert "daemon: not running" in st.ok("ivpn")


def fetch(st: E2E, program: str, address: str) -> str:
    """What the server at `address` saw `program` (curl, or a copy of it) come from."""
    done = st.lab.exec("host", [program, "-s", "-m", "5", f"http://{address}/"])
    assert done.returncode == 0, f"{program}: exit {done.returncode} {done.stderr}"
    return done.stdout.strip()


def test_ivpns_own_processes_are_never_split_and_carry_accept_final(st: E2E, port_dir: Path, leaks: Leaks) -> None:
    ivpn_service = port_dir / "ivpn-service"  # what the handler was told is IVPN's daemon
    shutil.copy2(shutil.which("curl") or "/usr/bin/curl", ivpn_service)
    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    st.apply("rules", "add", "--dest", SPLIT_SERVER)
    try:
        assert fetch(st, "curl", SPLIT_SERVER) == T.HOST_V4  # an app: split as the rule says
        assert fetch(st, str(ivpn_service), SPLIT_SERVER) == T.VPNSRV_V4  # IVPN: through the VPN

        def ivpn_conn() -> dict[str, Any] | None:
            return next((c for c in st.connections() if c["exe"] == str(ivpn_service)), None)

        conn = wait_until(ivpn_conn)
        assert conn is not None, "the IVPN process's connection never showed up"
        assert conn["rule"] == "external" and "IVPN's own process" in conn["reason"], conn
    finally:
        st.apply("config", "set", "splittun/rules", "[]")


def on_top(st: E2E, builtin: str) -> str:
    """The chain OUTPUT / INPUT of the host's filter table jumps to first (IPv4 and IPv6 alike, else "mixed")."""
    first = {chain_rules(st.lab, family, "filter", builtin)[0].split()[-1] for family in (4, 6)}
    return first.pop() if len(first) == 1 else "mixed"


def connected_notices(st: E2E) -> list[dict[str, Any]]:
    """The "IVPN connected" notices showing now, as `splittun notifications` lists them."""
    return [n for n in json.loads(st.ok("notifications", "list", "--json")) if n["id"] == "ivpn.connected"]


def counters(st: E2E) -> dict[str, int]:
    assert st.inst is not None
    return dict(st.inst.ask("ivpn", "counters"))


def reconnect(st: E2E, fake: IvpnDaemonProcess) -> None:
    fake.command("disconnect")
    until(st, lambda s: s["state"] == "DISCONNECTED")
    fake.command("connect")
    until(st, lambda s: s["connected"])


def test_the_connected_notice_shows_once_and_not_after_do_not_notify_me_anymore(
    st: E2E, port_dir: Path, leaks: Leaks
) -> None:
    st.ok("notifications", "reset")
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        fake.command("connect")
        until(st, lambda s: s["connected"])
        [note] = wait_until(lambda: connected_notices(st)) or [None]
        assert note is not None and note["title"] == "IVPN connected", note
        assert "suppress" in [a["id"] for a in note["actions"]]
        reconnect(st, fake)  # connected again while it shows: still one
        assert len(connected_notices(st)) == 1
        st.ok("notifications", "respond", "ivpn.connected", "suppress")  # "Do not notify me anymore"
        assert connected_notices(st) == []
        held = counters(st)["notices_held"]
        reconnect(st, fake)
        assert wait_until(lambda: counters(st)["notices_held"] > held), "the notice was not even asked for"
        assert connected_notices(st) == [], "shown again after 'Do not notify me anymore'"
        st.ok("notifications", "reset")  # "Reset Notifications State": the marker goes too
        reconnect(st, fake)
        assert wait_until(lambda: connected_notices(st)), "not shown again after the reset"
    finally:
        fake.stop()
        st.ok("notifications", "reset")


def vpn_app_lookup(st: E2E, name: str) -> list[str]:
    """A VPN app (no rule splits it) resolves `name` at the VPN's DNS server, as resolv.conf says."""
    argv = [sys.executable, "-m", "splittun.lab.dnsapp", "--comm", "vpnapp", "--server", T.TUN_SRV_V4,
            "--name", name, "--family", "4"]  # fmt: skip
    done = st.lab.exec("host", argv, timeout=30)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["addresses"])


@pytest.mark.parametrize("shape", ["servers", "old"])
def test_ivpns_custom_dns_serves_vpn_apps_with_its_encryption_while_connected(
    st: E2E, port_dir: Path, leaks: Leaks, shape: str
) -> None:
    geo: GeoDns = st.geo  # type: ignore[attr-defined]
    assert wait_until(lambda: json.loads(st.ok("dns", "--json"))["rerouting"], timeout=15)
    extra = ["--old-dns-shape"] if shape == "old" else []
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--dns", f"{T.TUN_SRV_V4}/1", *extra)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        before = f"t{uuid.uuid4().hex[:10]}.{GEO_NAME}"
        assert vpn_app_lookup(st, before) == [GeoDns.address("vpn", 4)]
        assert [q["transport"] for q in geo.queries("vpn", before)] == ["udp"]  # as the app sent it
        fake.command("connect")
        until(st, lambda s: s["connected"] and s["dns"] and s["dns_delegated"])  # interception runs: delegated
        assert wait_until(lambda: json.loads(st.ok("dns", "--json"))["vpn_dns_source"], timeout=5)
        during = f"t{uuid.uuid4().hex[:10]}.{GEO_NAME}"
        assert vpn_app_lookup(st, during) == [GeoDns.address("vpn", 4)]
        assert [q["transport"] for q in geo.queries("vpn", during)] == ["tls"]  # IVPN's DNS, over TLS
        assert not geo.queries("isp", during)
        assert f"tls://{T.TUN_SRV_V4}" in st.ok("dns")
        fake.command("disconnect")
        assert wait_until(lambda: not json.loads(st.ok("dns", "--json"))["vpn_dns_source"], timeout=5)
        after = f"t{uuid.uuid4().hex[:10]}.{GEO_NAME}"
        assert vpn_app_lookup(st, after) == [GeoDns.address("vpn", 4)]
        assert [q["transport"] for q in geo.queries("vpn", after)] == ["udp"]
    finally:
        fake.stop()


WG_RAW = ["PREROUTING", "-d", f"{T.TUN_HOST_V4}/32", "!", "-i", T.TUN_HOST_IF, "-m", "addrtype", "!",
          "--src-type", "LOCAL", "-j", "DROP"]  # fmt: skip


def raw_prerouting(st: E2E) -> list[str]:
    return chain_rules(st.lab, 4, "raw", "PREROUTING")


def test_wgquicks_iptables_antispoof_rule_gets_our_exemption_on_every_ivpn_state_change(
    st: E2E, port_dir: Path, leaks: Leaks
) -> None:
    leaks.allow(SPLIT_SERVER, "udp", T.WHOAMI_UDP_PORT, via=T.HOST_IF)
    st.apply("rules", "add", "--dest", SPLIT_SERVER)
    before = raw_prerouting(st)
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        # IVPN connects with wg-quick on a host without nft: its anti-spoofing rule in the raw table.
        st.lab.exec("host", ["iptables-legacy", "-w", "-t", "raw", "-I", *WG_RAW], check=True)
        fake.command("connect")

        def exempted() -> bool:
            rules = raw_prerouting(st)
            drop = next((i for i, r in enumerate(rules) if r.endswith("-j DROP")), -1)
            return drop > 0 and "-i lo" in rules[drop - 1] and "splittun" in rules[drop - 1]

        assert wait_until(exempted, timeout=5), raw_prerouting(st)
        # split UDP: the UDP proxy's replies reach the app on lo, addressed to the tunnel address
        assert socat_udp(st.lab, SPLIT_SERVER) == T.HOST_V4
        fake.command("killswitch on")  # another change: nothing added twice
        assert wait_until(lambda: counters(st)["lines"] > 0)
        assert sum("splittun" in r for r in raw_prerouting(st)) == 1
        # wg-quick down removes its rule; the next IVPN state change takes ours away too
        st.lab.exec("host", ["iptables-legacy", "-w", "-t", "raw", "-D", *WG_RAW], check=True)
        fake.command("disconnect")
        assert wait_until(lambda: raw_prerouting(st) == before, timeout=5), raw_prerouting(st)
    finally:
        st.lab.exec("host", ["iptables-legacy", "-w", "-t", "raw", "-D", *WG_RAW])
        fake.stop()
        st.apply("config", "set", "splittun/rules", "[]")


def test_the_vpn_carrier_is_never_split_even_by_a_rule_for_its_server(st: E2E, port_dir: Path, leaks: Leaks) -> None:
    """A rule that would split the VPN server's address; the carrier's conntrack entry is dropped, so its next
    packet (either way: the forwarder's, or the server's answer coming in) is decided afresh, with IVPN's status
    naming the carrier. It must stay accept-final and the tunnel must keep working."""
    st.apply("rules", "add", "--dest", T.VPNSRV_V4)
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        fake.command("connect")
        until(st, lambda s: s["connected"])
        st.lab.exec("host", ["conntrack", "-D", "-p", "udp", "--orig-port-dst", str(T.VPN_SERVER_PORT)])
        assert python_app(st.lab, "tcp", T.WHOAMI_V4) == T.VPNSRV_V4  # the tunnel carries on

        def carrier() -> dict[str, Any] | None:
            def is_carrier(c: dict[str, Any]) -> bool:
                ends = {(c["dst_ip"], c["dst_port"]), (c["src_ip"], c["src_port"])}
                return c["protocol"] == "udp" and (T.VPNSRV_V4, T.VPN_SERVER_PORT) in ends

            return next((c for c in st.connections() if is_carrier(c)), None)

        conn = wait_until(carrier)
        assert conn is not None, "the carrier was never decided afresh"
        assert conn["rule"] == "external" and "carrier" in conn["reason"] and conn["verb"] != "split tunneled", conn
    finally:
        fake.stop()
        st.apply("config", "set", "splittun/rules", "[]")


def bypass_table(st: E2E) -> tuple[str, str]:
    """`ip route show table 717` and the rules at priority 717, as a user would list them."""
    routes = st.lab.exec("host", ["ip", "route", "show", "table", "717"]).stdout.strip()
    rules = [r for r in st.lab.exec("host", ["ip", "rule"], check=True).stdout.splitlines() if r.startswith("717:")]
    return routes, "\n".join(rules)


def test_bypass_hosts_leave_outside_the_vpn_while_ivpn_connects_and_go_back_on_disconnect(
    st: E2E, port_dir: Path, leaks: Leaks
) -> None:
    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)  # the bypass host, on purpose
    st.apply("config", "set", "splittun/bypassHosts", SPLIT_SERVER)
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        assert python_app(st.lab, "tcp", SPLIT_SERVER) == T.VPNSRV_V4  # IVPN not connecting: through the VPN
        assert bypass_table(st) == ("", "")
        fake.command("state CONNECTING")  # the pre-connect hooks run: the bypass routes go in
        status = until(st, lambda s: s["bypass"])
        assert status["bypass"] == f"{SPLIT_SERVER}/32 via {T.ISP_LAN_V4} dev {T.HOST_IF}", status
        routes, rules = bypass_table(st)
        assert routes.startswith(f"{SPLIT_SERVER} via {T.ISP_LAN_V4} dev {T.HOST_IF}") and "lookup 717" in rules
        assert python_app(st.lab, "tcp", SPLIT_SERVER) == T.HOST_V4  # outside the VPN, via the ISP
        assert python_app(st.lab, "tcp", T.WHOAMI_V4) == T.VPNSRV_V4  # everything else stays in
        for line in ("connect", "state RECONNECTING", "connect"):  # kept through reconnects
            fake.command(line)
            assert bypass_table(st)[0], line
        fake.command("disconnect")
        until(st, lambda s: not s["bypass"])
        assert wait_until(lambda: bypass_table(st) == ("", "")), bypass_table(st)
        assert python_app(st.lab, "tcp", SPLIT_SERVER) == T.VPNSRV_V4
    finally:
        fake.stop()
        st.apply("config", "set", "splittun/bypassHosts", "")


def test_ivpn_connecting_after_splittun_started_with_wgquick_antispoof_and_kill_switch(
    st: E2E, port_dir: Path, leaks: Leaks
) -> None:
    """The realistic order: splittun runs first, then IVPN connects and does to the host what it does —
    wg-quick's routes and rules with the anti-spoofing rule (nft), then its kill switch — and disconnects
    again. Split TCP and UDP and VPN apps work throughout; the physical link is blocked for the rest."""
    leaks.allow(SPLIT_SERVER, via=T.HOST_IF)
    st.apply("rules", "add", "--dest", SPLIT_SERVER)
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        fake.command("state CONNECTING")
        st.lab.set_style("wgquick", antispoof=True)  # wg-quick up: table 51820, fwmark rules, nft preraw
        fake.command("connect")
        kill_switch_on(st.lab, T.VPNSRV_V4, T.VPN_SERVER_PORT, T.TUN_HOST_IF)
        fake.command("killswitch on")
        assert wait_until(lambda: on_top(st, "OUTPUT") == on_top(st, "INPUT") == "SPLITTUN-FILTER", timeout=5)

        def wg_table() -> str:
            return st.lab.exec("host", ["nft", "list", "table", "ip", T.WG_NFT_TABLE]).stdout

        assert wait_until(lambda: "splittun" in wg_table(), timeout=5), wg_table()  # our exemption, before its drop
        assert fetch(st, "curl", SPLIT_SERVER) == T.HOST_V4
        assert socat_udp(st.lab, SPLIT_SERVER) == T.HOST_V4  # the proxy's replies pass the anti-spoofing rule
        assert fetch(st, "curl", T.WHOAMI_V4) == T.VPNSRV_V4
        blocked, said = physical_link_blocked(st.lab)
        assert blocked, said
        fake.command("disconnect")  # IVPN off: kill switch and wg-quick go
        kill_switch_off(st.lab)
        fake.command("killswitch off")
        st.lab.set_style("replaced", antispoof=False)
        assert fetch(st, "curl", SPLIT_SERVER) == T.HOST_V4
        assert fetch(st, "curl", T.WHOAMI_V4) == T.VPNSRV_V4
    finally:
        kill_switch_off(st.lab)
        st.lab.set_style("replaced", antispoof=False)  # what the module's splittun was started in
        fake.stop()
        st.apply("config", "set", "splittun/rules", "[]")


@pytest.mark.parametrize("style", LAB_STYLES)
def test_with_ivpns_kill_switch_on_split_and_own_traffic_work_and_the_rest_is_blocked(
    st: E2E, port_dir: Path, leaks: Leaks, style: str
) -> None:
    """In each routing style, and with wg-quick's anti-spoofing rule (nft): the last tests of the module, since
    they restart splittun in another style (the VPN's routing comes before splittun, as on a real machine)."""
    st.ensure(*parse_style(style))
    st.reset()
    leaks.allow(SPLIT_SERVER, via=T.HOST_IF)  # split TCP (kernel path) and split UDP (splittun's own proxy)
    st.apply("rules", "add", "--dest", SPLIT_SERVER)
    fake = IvpnDaemonProcess(st.lab, port_dir / "port.txt", "--server", CARRIER, "--client-ip", T.TUN_HOST_V4)
    try:
        ivpn(st, "ping")
        until(st, lambda s: s["daemon"], timeout=3)
        fake.command("connect")
        until(st, lambda s: s["connected"])
        # IVPN turns its kill switch on: its chains go on top of OUTPUT and INPUT, above splittun's jumps.
        kill_switch_on(st.lab, T.VPNSRV_V4, T.VPN_SERVER_PORT, T.TUN_HOST_IF)
        fake.command("killswitch on")  # …and the daemon says so: splittun puts its jumps back on top at once
        for builtin in ("OUTPUT", "INPUT"):
            assert wait_until(lambda b=builtin: on_top(st, b) == "SPLITTUN-FILTER", timeout=5), on_top(st, builtin)
        for phase in ("kill switch on", "reconnected", "daemon restarted"):
            assert fetch(st, "curl", SPLIT_SERVER) == T.HOST_V4, phase  # split TCP leaves through eth0
            assert socat_udp(st.lab, SPLIT_SERVER) == T.HOST_V4, phase  # split UDP: splittun's own upstream
            assert fetch(st, "curl", T.WHOAMI_V4) == T.VPNSRV_V4, phase  # a VPN app: through the tunnel
            # Anything else that tries the physical link obeys the kill switch (and the leak check vouches).
            blocked, said = physical_link_blocked(st.lab)
            assert blocked, f"{phase}: {said}"
            if phase == "kill switch on":
                fake.command("state RECONNECTING")
                fake.command("connect")
                until(st, lambda s: s["connected"])
            elif phase == "reconnected":
                fake.command("restart")
                until(st, lambda s: s["daemon"] and s["connected"] and s["daemon_port"] == fake.port)
            assert on_top(st, "OUTPUT") == "SPLITTUN-FILTER"
        fake.command("disconnect")  # IVPN off: its kill switch goes too; both kinds of app still work
        kill_switch_off(st.lab)
        fake.command("killswitch off")
        assert fetch(st, "curl", SPLIT_SERVER) == T.HOST_V4
        assert fetch(st, "curl", T.WHOAMI_V4) == T.VPNSRV_V4
    finally:
        kill_switch_off(st.lab)
        fake.stop()
        st.apply("config", "set", "splittun/rules", "[]")


def test_down_leaves_firewall_routes_and_rules_exactly_as_before(st: E2E) -> None:
    """After all of the above (IVPN's chains came and went, exemptions, delegation): `splittun down` leaves the
    host as it was before splittun first ran in this style."""
    assert st.style is not None and st.inst is not None
    style = st.style
    done = st.stop()
    assert done is not None and done.returncode == 0, done
    assert host_state(st.lab) == st.pristine[style]
