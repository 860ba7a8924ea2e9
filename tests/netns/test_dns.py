"""DNS follows the split: in the lab, two apps ask the VPN's (tunnel-internal) DNS server for the same geo name;
the split app gets the ISP server's answer, the VPN app the VPN server's, and each connects where its answer
points. The lab's two DNS servers (splittun.lab.geodns) log every query they get: a VPN app's query never
reaches the ISP's server (and the leak monitor on the physical link sees no DNS to the VPN's server), a
split app's never reaches the VPN's; a capture at the tunnel's far end sees the VPN app's query and never
the split app's. splittun is driven only through its CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splittun.lab import topology as T
from splittun.lab.geodns import BIG_NAME, EDGE_NAME, GEO_NAME, SHOP_NAME, TLS_NAMES, GeoDns
from splittun.lab.instance import poll
from tests.support import FIXTURES_DIR
from tests.support.e2e import E2E, host_state
from tests.support.interceptor import ISP, VPN
from tests.support.lab import Leaks, own_lab

STYLES = ("replaced", "wgquick")
FAMILIES = (4, 6)
VPN_DNS = {4: T.TUN_SRV_V4, 6: T.TUN_SRV_V6}  # what the VPN put in resolv.conf: reachable only through the tunnel
ISP_DNS = {4: T.ISP_LAN_V4, 6: T.ISP_LAN_V6}  # the home router's resolver: splittun/splitDNS
SPLIT_APP, VPN_APP = "splitapp", "vpnapp"


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    """A private lab ("dns") with both DNS servers, and the splittun instance in its host; all gone afterwards."""
    labs = own_lab("dns")
    harness = E2E(next(labs))
    try:
        with GeoDns(harness.lab) as geo:
            harness.geo = geo  # type: ignore[attr-defined]
            harness.env = {"SSL_CERT_FILE": str(geo.ca_file)}  # the resolver trusts the lab's DNS-over-TLS servers
            yield harness
    finally:
        try:
            harness.stop()
        finally:
            labs.close()


@pytest.fixture(scope="module", params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def st(e2e: E2E, style: str) -> E2E:
    """splittun up in `style`, the split app split by an app rule, the ISP's resolver as split DNS server."""
    e2e.ensure(style)
    config = e2e.config_file()
    if config.get("splittun/splitDNS") != list(ISP_DNS.values()):
        e2e.reset()
        e2e.apply("config", "set", "splittun/splitDNS", ",".join(ISP_DNS.values()))
        e2e.apply("rules", "add", "--name", SPLIT_APP)
    assert poll(lambda: resolver_ready(e2e), 15), "the resolver did not get ready"
    return e2e


def resolver_ready(st: E2E) -> bool:
    dns = json.loads(st.ok("dns", "--json"))
    return bool(dns["rerouting"])


def geo(st: E2E) -> GeoDns:
    return st.geo  # type: ignore[attr-defined,no-any-return]


def app(st: E2E, comm: str, name: str, family: int, *, tcp: bool = False, fetch: bool = True) -> dict[str, Any]:
    """The lab app `comm` resolves `name` at the VPN's DNS server (as resolv.conf says), then fetches it."""
    argv = [sys.executable, "-m", "splittun.lab.dnsapp", "--comm", comm, "--server", VPN_DNS[family],
            "--name", name, "--family", str(family)]  # fmt: skip
    argv += (["--tcp"] if tcp else []) + (["--fetch"] if fetch else [])
    proc = st.lab.exec("host", argv, timeout=30)
    assert proc.returncode == 0, f"{comm} {name}: {proc.stderr.strip()}"
    return dict(json.loads(proc.stdout))


def unique(base: str = GEO_NAME) -> str:
    return f"t{uuid.uuid4().hex[:10]}.{base}"


@contextlib.contextmanager
def tunnel_capture(st: E2E) -> Iterator[Callable[[str], bool]]:
    """Every packet crossing the tunnel, captured at its far end (the VPN server's TUN device, where tunnelled
    traffic arrives decrypted); yields `crossed(name)`: did a DNS message for `name` pass through the tunnel?"""
    path = Path(tempfile.mkdtemp(prefix="st-tuncap-")) / "tunnel.bin"
    argv = [sys.executable, str(FIXTURES_DIR / "tunnel_capture.py"), T.TUN_SRV_IF, str(path)]
    proc = st.lab.popen("vpnsrv", argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "tunnel capture did not start"

        def crossed(name: str) -> bool:
            label = name.split(".", 1)[0].encode()  # unique per test; a DNS message carries it verbatim
            return path.exists() and label in path.read_bytes()

        yield crossed
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(path.parent, ignore_errors=True)


def allow_split_dns(leaks: Leaks) -> None:
    """The split app's queries leave through the physical link to the ISP's resolver, on purpose."""
    for address in ISP_DNS.values():
        for proto in ("udp", "tcp"):
            leaks.allow(address, proto, 53, via=T.HOST_IF)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_split_app_gets_the_isp_answer_and_a_vpn_app_the_vpn_answer_for_the_same_name(
    st: E2E, leaks: Leaks, family: int
) -> None:
    allow_split_dns(leaks)
    leaks.allow(GeoDns.address("isp", family), "tcp", T.WHOAMI_TCP_PORT)  # the split app's connection
    split_name, vpn_name = unique(), unique()
    with tunnel_capture(st) as crossed:
        split = app(st, SPLIT_APP, split_name, family)
        vpn = app(st, VPN_APP, vpn_name, family)
        # On the tunnel: the VPN app's query (which shows the capture sees DNS), never the split app's. (The
        # leak monitor, on the physical link, fails the test on any DNS of the VPN app there.)
        assert poll(lambda: crossed(vpn_name), 5), "the VPN app's query never crossed the tunnel"
        assert not crossed(split_name), "the split app's DNS query went through the tunnel"
    assert split == {"addresses": [GeoDns.address("isp", family)], "seen": ISP[family], "transport": "udp"}
    assert vpn == {"addresses": [GeoDns.address("vpn", family)], "seen": VPN[family], "transport": "udp"}
    # Where each query went: the split app's only to the ISP's server, the VPN app's only to the VPN's.
    assert geo(st).queries("isp", split_name) and not geo(st).queries("vpn", split_name)
    assert geo(st).queries("vpn", vpn_name) and not geo(st).queries("isp", vpn_name)
    events = [e for e in json.loads(st.ok("dns", "--json"))["recent"] if e["name"] in (split_name, vpn_name)]
    assert {(e["name"], e["path"], e["upstream"]) for e in events} == {
        (split_name, "split", ISP_DNS[4]),  # the first split server answers, whichever family was asked
        (vpn_name, "vpn", VPN_DNS[family]),
    }

    def resolved_via() -> set[str]:  # the split app's connection, as `splittun connections` shows it
        rows = st.connections("--app", SPLIT_APP)
        return {r["resolved_via"] for r in rows if r["dst_ip"] == GeoDns.address("isp", family) and r["dst_port"] == 80}

    assert poll(lambda: f"split {ISP_DNS[4]} via {T.HOST_IF}" in resolved_via(), 5), resolved_via()


def test_a_cached_answer_is_served_on_its_own_path_only(st: E2E, leaks: Leaks) -> None:
    allow_split_dns(leaks)
    name = unique()
    first = app(st, VPN_APP, name, 4, fetch=False)
    again = app(st, VPN_APP, name, 4, fetch=False)
    split = app(st, SPLIT_APP, name, 4, fetch=False)
    assert first["addresses"] == again["addresses"] == [GeoDns.address("vpn", 4)]
    assert split["addresses"] == [GeoDns.address("isp", 4)]  # the VPN path's cached answer is not the split app's
    assert len(geo(st).queries("vpn", name)) == 1  # the second VPN lookup came from the cache
    assert st.ok("dns", "flush").startswith("flushed ")
    app(st, VPN_APP, name, 4, fetch=False)
    assert len(geo(st).queries("vpn", name)) == 2  # after `splittun dns flush`: asked again


def test_an_answer_too_big_for_udp_is_fetched_over_tcp_and_handed_on_truncated(st: E2E) -> None:
    result = app(st, VPN_APP, BIG_NAME, 4, fetch=False)
    assert len(result["addresses"]) == 40 and result["transport"] == "tcp"  # the app got TC, asked again over TCP
    asked = [q["transport"] for q in geo(st).queries("vpn", BIG_NAME)]
    assert asked[-2:] == ["udp", "tcp"]  # the resolver got TC from the server and asked it again over TCP


def test_malformed_queries_are_counted_and_the_resolver_keeps_serving(st: E2E) -> None:
    before = json.loads(st.ok("dns", "--json"))["counters"]["malformed"]
    garbage = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)\n"
    garbage += f"s.sendto(bytes.fromhex('12340100000100000000000003'), ('{VPN_DNS[4]}', 53))\n"
    garbage += "print(s.recv(512).hex())"  # a header and a question that runs past the end: FORMERR
    proc = st.lab.exec("host", [sys.executable, "-c", garbage], timeout=10)
    assert proc.stdout.strip() == "123480010000000000000000"  # same id, QR, rcode FORMERR
    assert app(st, VPN_APP, unique(), 4, fetch=False)["addresses"] == [GeoDns.address("vpn", 4)]
    assert json.loads(st.ok("dns", "--json"))["counters"]["malformed"] == before + 1


def test_a_domain_rule_matches_the_first_connection_after_a_lookup_over_tcp(st: E2E, leaks: Leaks) -> None:
    target = GeoDns.address("vpn", 4)
    leaks.allow(target, "tcp", T.WHOAMI_TCP_PORT)
    name = unique(f"tcp{os.getpid()}.{GEO_NAME}")
    st.apply("rules", "add", "--dest", name)
    try:
        result = app(st, VPN_APP, name, 4, tcp=True)
    finally:
        st.apply("rules", "remove", st.rules()[-1]["id"])
    assert result == {"addresses": [target], "seen": ISP[4], "transport": "tcp"}
    assert geo(st).queries("vpn", name)[0]["transport"] == "udp"  # the resolver asked upstream over UDP


def test_a_domain_rule_matches_the_first_connection_to_a_name_reached_through_a_cname(st: E2E, leaks: Leaks) -> None:
    target = GeoDns.address("vpn", 6)
    leaks.allow(target, "tcp", T.WHOAMI_TCP_PORT)
    st.apply("rules", "add", "--dest", "." + EDGE_NAME.split(".", 1)[1])  # .cdn.example.org: only the CNAME's target
    try:
        result = app(st, VPN_APP, SHOP_NAME, 6)
    finally:
        st.apply("rules", "remove", st.rules()[-1]["id"])
    assert result["addresses"] == [target] and result["seen"] == ISP[6]


def test_killing_the_resolver_leaks_nothing_and_dns_is_back_after_its_restart(st: E2E, leaks: Leaks) -> None:
    allow_split_dns(leaks)
    leaks.allow(GeoDns.address("isp", 4), "tcp", T.WHOAMI_TCP_PORT)
    assert st.inst is not None
    old = st.inst.pid("resolver")
    os.kill(old, signal.SIGKILL)
    # At once: a query goes where the app sent it, through the VPN (the split app's too: never outside it), until
    # the restarted resolver is ready again. No query is lost meanwhile.
    vpn_name, split_name = unique(), unique()
    assert app(st, VPN_APP, vpn_name, 4, fetch=False)["addresses"] == [GeoDns.address("vpn", 4)]
    split = app(st, SPLIT_APP, split_name, 4, fetch=False)["addresses"]
    assert split == [GeoDns.address("vpn" if geo(st).queries("vpn", split_name) else "isp", 4)]
    assert 'resolver.followed rerouting=False why="listener closed"' in st.log("interceptor")
    assert poll(lambda: st.inst is not None and st.inst.pid("resolver") != old and resolver_ready(st), 20)
    assert app(st, SPLIT_APP, unique(), 4) == {
        "addresses": [GeoDns.address("isp", 4)],
        "seen": ISP[4],
        "transport": "udp",
    }


def test_split_dns_over_tls_reaches_the_isp_server_encrypted_and_a_bad_certificate_is_refused(
    st: E2E, leaks: Leaks
) -> None:
    allow_split_dns(leaks)
    leaks.allow(ISP_DNS[4], "tcp", 853, via=T.HOST_IF)
    try:
        st.apply("config", "set", "splittun/splitDNS", f"tls://{ISP_DNS[4]}#{TLS_NAMES['isp']}")
        name = unique()
        assert app(st, SPLIT_APP, name, 4, fetch=False)["addresses"] == [GeoDns.address("isp", 4)]
        assert [q["transport"] for q in geo(st).queries("isp", name)] == ["tls"]
        st.apply("config", "set", "splittun/splitDNS", f"tls://{ISP_DNS[4]}#{TLS_NAMES['vpn']}")  # the wrong name
        name = unique()
        proc = st.lab.exec("host", [sys.executable, "-m", "splittun.lab.dnsapp", "--comm", SPLIT_APP, "--server",
                                    VPN_DNS[4], "--name", name])  # fmt: skip
        assert json.loads(proc.stdout)["addresses"] == []  # SERVFAIL: never an unchecked answer, nor the VPN's
        assert not geo(st).queries("isp", name) and not geo(st).queries("vpn", name)
        events = [e for e in json.loads(st.ok("dns", "--json"))["recent"] if e["name"] == name]
        assert events and all("CERTIFICATE_VERIFY_FAILED" in e["rcode"] for e in events), events
    finally:
        st.apply("config", "set", "splittun/splitDNS", ",".join(ISP_DNS.values()))


def test_down_leaves_firewall_routes_and_rules_as_before(st: E2E, style: str) -> None:
    st.stop()
    assert host_state(st.lab) == st.pristine[(style, False)]
