"""End to end: a user runs splittun in the lab host and drives it only through its CLI; real clients (curl,
socat, Python apps) talk to the lab internet's whoami servers, which answer with the source address they saw:
the ISP address (192.0.2.10 / 2001:db8:10::10) = split, the VPN server's (198.51.100.2 / 2001:db8:20::2) =
through the VPN.

One splittun instance is shared (restarted only to change the VPN's routing style); each test starts from
"enabled, no rules, interface auto", set through the CLI. Nothing here waits a fixed time: every change is
followed until the interceptor (or the proxies) use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splittun.lab import topology as T
from tests.support.e2e import (
    E2E,
    TCP,
    UDP,
    curl_details,
    host_state,
    lookup_fetch,
    our_conntrack,
    python_app,
    socat_udp,
    two_peers,
)
from tests.support.interceptor import BY_NAME, ISP, KEEP, SPLIT, VPN, ask, curl, hold, lab_dns, wait_until
from tests.support.lab import Leaks, own_lab

STYLES = ("replaced", "wgquick")
FAMILIES = (4, 6)
#: A CIDR holding both whoami servers (.80/.81, ::80/::81) but not inet's own address (OUTSIDE, also a whoami).
SERVERS_NET = {4: "203.0.113.64/26", 6: "2001:db8:30::80/124"}
OUTSIDE = {4: T.INET_V4, 6: T.INET_V6}
TUN = {4: T.TUN_HOST_V4, 6: T.TUN_HOST_V6}


DATA_PATHS = ("kernel", "proxy")


@pytest.fixture(scope="module", params=DATA_PATHS)
def e2e(request: pytest.FixtureRequest) -> Iterator[E2E]:
    """A private lab ("e2e") and the splittun instance in its host; both gone afterwards, also on failure.
    Every test runs once per data path of split TCP (`splittun/dataPath`: kernel, proxy)."""
    labs = own_lab("e2e")
    harness = E2E(next(labs), data_path=str(request.param))
    try:
        yield harness
    finally:
        try:
            harness.stop()
        finally:
            labs.close()  # the lab's own finally: Lab.down() (namespaces, every process in them)


@pytest.fixture(scope="module", params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    """The VPN's routing style (module-scoped, so pytest runs all tests of one style together)."""
    return str(request.param)


@pytest.fixture
def st(e2e: E2E) -> E2E:
    """splittun up with the VPN in "replaced" style (OpenVPN-like), enabled, no rules, interface auto."""
    e2e.ensure("replaced")
    e2e.reset()
    return e2e


@pytest.fixture
def st_style(e2e: E2E, style: str) -> E2E:
    """Like `st`, in each routing style."""
    e2e.ensure(style)
    e2e.reset()
    return e2e


@pytest.fixture(scope="module")
def dns(e2e: E2E) -> Iterator[None]:
    """A DNS server in inet answering every name under example.com with inet's own address."""
    with lab_dns(e2e.lab):
        yield


def closing(procs: list[subprocess.Popen[str]]) -> contextlib.ExitStack:
    """Kill the given clients on the way out, whatever happened."""
    stack = contextlib.ExitStack()

    def kill() -> None:
        for proc in procs:
            proc.kill()
            proc.wait()

    stack.callback(kill)
    return stack


# --- which connections are split ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_app_rule_splits_curl_and_socat_while_another_app_stays_in_the_vpn(
    st_style: E2E, leaks: Leaks, family: int
) -> None:
    lab, target = st_style.lab, KEEP[family]
    leaks.allow(target, "tcp", TCP)  # curl
    leaks.allow(target, "udp", UDP)  # socat
    # Before any rule: everything in the VPN, curl included.
    assert curl(lab, target) == VPN[family]
    st_style.apply("rules", "add", "--name", "curl")
    st_style.apply("rules", "add", "--name", "socat", "--proto", "udp")
    assert curl(lab, target) == ISP[family]
    assert socat_udp(lab, target) == ISP[family]
    assert python_app(lab, "tcp", target) == VPN[family]
    assert python_app(lab, "udp", target) == VPN[family]


def test_executable_path_and_glob_rules(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(KEEP[4], "tcp", TCP)  # curl
    leaks.allow(KEEP[6], "tcp", TCP)
    leaks.allow(KEEP[4], "udp", UDP)  # socat
    curl_exe = os.path.realpath(str(shutil.which("curl")))
    st.apply("rules", "add", "--app", "/opt/*/curl")  # a glob that does not name this curl
    assert curl(lab, KEEP[4]) == VPN[4]
    st.apply("rules", "add", "--app", curl_exe)
    st.apply("rules", "add", "--app", "*/soc?t", "--proto", "udp")
    assert curl(lab, KEEP[4]) == ISP[4]
    assert curl(lab, KEEP[6]) == ISP[6]
    assert socat_udp(lab, KEEP[4]) == ISP[4]
    assert python_app(lab, "tcp", KEEP[4]) == VPN[4]
    assert python_app(lab, "udp", KEEP[6]) == VPN[6]
    rows = st.ok("rules", "list")
    assert curl_exe in rows and "*/soc?t" in rows


def test_uid_rule_splits_one_users_apps(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(KEEP[4], "tcp", TCP)  # curl as nobody
    st.apply("rules", "add", "--uid", "65534")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = lab.exec("host", [*as_nobody, "curl", "-s", "-m", "5", f"http://{KEEP[4]}/"])
    assert (proc.returncode, proc.stdout.strip()) == (0, ISP[4])
    assert curl(lab, KEEP[4]) == VPN[4]  # the same app as root


def test_children_rule_splits_what_an_app_starts(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(KEEP[4], "tcp", TCP)  # curl started by the launcher
    launcher = [sys.executable, "-c", LAUNCHER, "curl", "-s", "-m", "5", f"http://{KEEP[4]}/"]
    st.apply("rules", "add", "--name", "e2e-launcher")  # the app itself, not what it starts
    assert lab.exec("host", launcher).stdout.strip() == VPN[4]
    st.apply("rules", "add", "--name", "e2e-launcher", "--children", "--position", "1")
    assert lab.exec("host", launcher).stdout.strip() == ISP[4]
    assert curl(lab, KEEP[4]) == VPN[4]  # curl on its own


#: An app called "e2e-launcher" (its /proc/PID/comm, what name rules match) that runs a command as its child.
LAUNCHER = (
    "import ctypes, subprocess, sys; ctypes.CDLL(None).prctl(15, b'e2e-launcher', 0, 0, 0); "
    "sys.exit(subprocess.run(sys.argv[1:]).returncode)"
)


@pytest.mark.parametrize("family", FAMILIES)
def test_domain_rule_splits_names_learned_from_dns(st: E2E, dns: None, leaks: Leaks, family: int) -> None:
    lab = st.lab
    leaks.allow(BY_NAME[family], "tcp", TCP)  # what the split names resolve to
    st.apply("rules", "add", "--dest", ".split.example.com")
    st.apply("rules", "add", "--endpoint", "+ api?.example.com tcp/80")
    t0 = time.time()
    assert lookup_fetch(lab, f"www{family}.split.example.com", family) == ISP[family]
    assert lookup_fetch(lab, f"api{family}.example.com", family) == ISP[family]
    # The same address under a name no rule covers stays in the VPN: it is the name that matched.
    assert lookup_fetch(lab, f"www{family}.other.example.com", family) == VPN[family]
    split = [r for r in st.connections("--verdict", "split") if r["started"] >= t0]
    assert sorted((r["domain"], r["rule"]) for r in split) == [
        (f"api{family}.example.com", "r2"),
        (f"www{family}.split.example.com", "r1"),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_cidr_rule_splits_the_network_and_nothing_else(st: E2E, leaks: Leaks, family: int) -> None:
    lab = st.lab
    leaks.allow(SERVERS_NET[family])  # the rule's network, any protocol; OUTSIDE is not in it
    st.apply("rules", "add", "--dest", SERVERS_NET[family])
    for server in (SPLIT[family], KEEP[family]):
        assert python_app(lab, "tcp", server) == ISP[family]
        assert python_app(lab, "udp", server) == ISP[family]
    assert python_app(lab, "tcp", OUTSIDE[family]) == VPN[family]
    assert python_app(lab, "udp", OUTSIDE[family]) == VPN[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_port_and_protocol_rules(st: E2E, leaks: Leaks, family: int) -> None:
    lab, target = st.lab, KEEP[family]
    leaks.allow(target, "udp", UDP)  # split by the port range, then
    leaks.allow(target, "tcp", TCP)  # by tcp/80
    st.apply("rules", "add", "--proto", "udp", "--port", f"{UDP - 300}-{UDP + 100}")
    assert python_app(lab, "udp", target) == ISP[family]
    assert python_app(lab, "tcp", target) == VPN[family]
    st.apply("rules", "remove", "r1")
    st.apply("rules", "add", "--endpoint", f"+ * tcp/{TCP}")
    assert python_app(lab, "tcp", target) == ISP[family]
    assert python_app(lab, "udp", target) == VPN[family]


def test_keep_rule_overrides_a_broader_split_rule_when_it_comes_first(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    for address in (SPLIT[4], KEEP[4]):  # each split (by the /24) while the exception does not apply to it
        leaks.allow(address, "tcp", TCP)
        leaks.allow(address, "udp", UDP)
    st.apply("rules", "add", "--dest", "203.0.113.0/24")
    st.apply("rules", "add", "--dest", SPLIT[4], "--keep")
    # First match wins: the broad split rule comes first, so the exception never gets a say.
    assert (curl(lab, SPLIT[4]), curl(lab, KEEP[4])) == (ISP[4], ISP[4])
    st.apply("rules", "move", "r2", "1")
    assert [r["id"] for r in st.rules()] == ["r2", "r1"]
    assert (curl(lab, SPLIT[4]), curl(lab, KEEP[4])) == (VPN[4], ISP[4])
    assert python_app(lab, "udp", SPLIT[4]) == VPN[4]
    assert python_app(lab, "udp", KEEP[4]) == ISP[4]
    st.apply("rules", "move", "r2", "2")
    assert curl(lab, SPLIT[4]) == ISP[4]
    # An exception can also be put first when it is added.
    st.apply("rules", "add", "--dest", SPLIT[4], "--proto", "tcp", "--keep", "--position", "1")
    assert [r["id"] for r in st.rules()] == ["r3", "r1", "r2"]
    assert curl(lab, SPLIT[4]) == VPN[4]
    assert python_app(lab, "udp", SPLIT[4]) == ISP[4]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_udp_socket_two_peers_one_split(st_style: E2E, leaks: Leaks, family: int) -> None:
    leaks.allow(SPLIT[family], "udp", UDP)  # the split peer only
    st_style.apply("rules", "add", "--dest", SPLIT[family], "--proto", "udp")
    answers = two_peers(st_style.lab, KEEP[family], SPLIT[family], rounds=3)
    assert len(answers) == 6
    # Every answer came back from the peer it was sent to, which really got it, over the right path.
    assert sorted((a["peer"], a["server"], a["seen"]) for a in answers) == sorted(
        [(KEEP[family], KEEP[family], VPN[family])] * 3 + [(SPLIT[family], SPLIT[family], ISP[family])] * 3
    )


# --- changes while connections run -------------------------------------------------------------------------


def test_disable_keeps_running_split_connections_and_new_ones_use_the_vpn(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(SPLIT[4], "tcp", TCP)  # the held connection and flow, split before `disable`
    leaks.allow(SPLIT[4], "udp", UDP)
    st.apply("rules", "add", "--dest", SPLIT[4])
    t0 = time.time()
    tcp = hold(lab, "tcp", SPLIT[4], TCP)
    udp = hold(lab, "udp", SPLIT[4], UDP)
    with closing([tcp, udp]):
        assert (ask(tcp), ask(udp)) == (ISP[4], ISP[4])
        st.apply("disable")
        assert ask(tcp) == ISP[4]  # the running split TCP connection keeps its path until it closes
        assert ask(tcp) == ISP[4]
        assert ask(udp) == VPN[4]  # a UDP flow has no end: its next datagram follows the new policy
        assert curl(lab, SPLIT[4]) == VPN[4]  # new connections: through the VPN
        assert python_app(lab, "tcp", SPLIT[4]) == VPN[4]

        def held() -> list[dict[str, object]]:
            return [
                r
                for r in st.connections("--verdict", "split", "--app", "client.py")
                if r["started"] >= t0 and r["protocol"] == "tcp"
            ]

        assert [r["state"] for r in held()] == ["open"]
        assert tcp.stdin is not None
        tcp.stdin.close()  # the app closes its connection
        assert tcp.wait(10) == 0
        assert wait_until(lambda: [r["state"] for r in held()] == ["closed"]), held()


def test_enable_leaves_running_vpn_connections_and_new_ones_are_split(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(SPLIT[4], "tcp", TCP)  # new connections after `enable`
    leaks.allow(SPLIT[4], "udp", UDP)
    st.apply("rules", "add", "--dest", SPLIT[4])
    st.apply("disable")
    tcp = hold(lab, "tcp", SPLIT[4], TCP)
    with closing([tcp]):
        assert ask(tcp) == VPN[4]
        st.apply("enable")
        assert ask(tcp) == VPN[4]  # a running stream cannot be handed to the proxy half-way
        assert curl(lab, SPLIT[4]) == ISP[4]
        assert python_app(lab, "udp", SPLIT[4]) == ISP[4]
        assert ask(tcp) == VPN[4]


# --- the interface ---------------------------------------------------------------------------------------


def test_interface_manual_then_auto_and_an_unknown_one_refused(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(SPLIT[4], "tcp", TCP, via=T.HOST_IF)  # curl, through eth0 however it is chosen
    leaks.allow(SPLIT[6], "tcp", TCP, via=T.HOST_IF)
    st.apply("rules", "add", "--name", "curl")
    mac = json.loads(lab.exec("host", ["ip", "-j", "link", "show", T.HOST_IF], check=True).stdout)[0]["address"]
    t0 = time.time()
    for choice in (T.HOST_IF, mac, T.HOST_V4):
        st.interface(choice, expect=T.HOST_IF)
        assert st.ok("config", "get", "splittun/interface").strip() == json.dumps(choice)
        assert st.ok("interface").splitlines()[0] == f"interface: {choice}"
        assert curl(lab, SPLIT[4]) == ISP[4]
        assert curl(lab, SPLIT[6]) == ISP[6]
    split = [r for r in st.connections("--verdict", "split", "--app", "curl") if r["started"] >= t0]
    assert len(split) == 6 and {r["split"]["interface"] for r in split} == {T.HOST_IF}

    # An interface this machine does not have: one line naming the key and the problem; nothing changes.
    message = st.refused("interface", "wlan9")
    assert "splittun/interface" in message and "unknown interface 'wlan9'" in message
    assert st.ok("config", "get", "splittun/interface").strip() == json.dumps(T.HOST_V4)
    assert curl(lab, SPLIT[4]) == ISP[4]

    st.interface("auto", expect=T.HOST_IF)
    assert st.ok("config", "get", "splittun/interface").strip() == '""'
    shown = json.loads(st.ok("interface", "--json"))
    assert shown == {"interface": "auto", "auto": {"ipv4": T.HOST_IF, "ipv6": T.HOST_IF}}
    assert curl(lab, SPLIT[4]) == ISP[4]
    assert curl(lab, SPLIT[6]) == ISP[6]


def test_a_manual_choice_is_what_split_connections_use(st: E2E) -> None:
    """Choosing the VPN's own interface by hand: curl still goes through the proxy, which now leaves through
    wgivpn, so the server sees the VPN's address — the choice is honoured, not just stored."""
    lab = st.lab
    st.apply("rules", "add", "--name", "curl")
    try:
        st.interface(T.TUN_HOST_IF, expect=T.TUN_HOST_IF)
        t0 = time.time()
        assert curl(lab, SPLIT[4]) == VPN[4]
        rows = [r for r in st.connections("--verdict", "split", "--app", "curl") if r["started"] >= t0]
        assert [(r["split"]["interface"], r["split"]["local_ip"]) for r in rows] == [(T.TUN_HOST_IF, TUN[4])]
    finally:
        back_to_auto(st)


def back_to_auto(st: E2E) -> None:
    """The next tests start from auto with eth0's routes in the split table."""
    st.interface("auto", expect=T.HOST_IF)

    def eth0_routes() -> bool:
        table = host_state(st.lab).split_table
        return T.TUN_HOST_IF not in table and table.count(f"dev {T.HOST_IF}") == 2

    assert wait_until(eth0_routes), host_state(st.lab).split_table


def test_switching_back_from_a_point_to_point_interface_restores_the_split_path(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(SPLIT[4], "tcp", TCP)  # curl, once back on auto (through wgivpn before: not on the link)
    leaks.allow(SPLIT[6], "tcp", TCP)
    st.apply("rules", "add", "--name", "curl")
    try:
        st.interface(T.TUN_HOST_IF, expect=T.TUN_HOST_IF)
        assert curl(lab, SPLIT[4]) == VPN[4]
        st.interface("auto", expect=T.HOST_IF)
        assert curl(lab, SPLIT[4]) == ISP[4]
        assert curl(lab, SPLIT[6]) == ISP[6]
        assert T.TUN_HOST_IF not in host_state(lab).split_table
    finally:
        back_to_auto(st)


# --- invalid config ----------------------------------------------------------------------------------------


def test_invalid_config_is_refused_and_the_running_one_stays(st: E2E, leaks: Leaks) -> None:
    lab = st.lab
    leaks.allow(SPLIT[4], "tcp", TCP)  # split by the running rule
    leaks.allow(KEEP[4], "tcp", TCP)  # split once the fixed file's /24 is applied
    st.apply("rules", "add", "--dest", SPLIT[4])
    rules = st.rules()
    version = st.policy_version()

    def still_as_before() -> None:
        assert st.policy_version() == version
        assert (curl(lab, SPLIT[4]), curl(lab, KEEP[4])) == (ISP[4], VPN[4])

    # Through the CLI: one line naming the key and the problem; the file and the policy unchanged.
    assert "dest" in (msg := st.refused("rules", "add", "--dest", "203.0.113.300/24")) and "valid CIDR" in msg
    msg = st.refused("config", "set", "splittun/rules", '[{"id": "x", "action": "split", "dest": "10.0.0.0/33"}]')
    assert "splittun/rules[0].dest" in msg
    msg = st.refused("config", "set", "splittun/enable", "maybe")
    assert msg.startswith("splittun: splittun/enable:")
    assert "splittun/nosuch: unknown key" in st.refused("config", "set", "splittun/nosuch", "1")
    # A flag's mistake names the flag the user typed, not the config key it would have become.
    assert st.refused("rules", "add", "--interface", "nosuch0") == "splittun: --interface: unknown interface 'nosuch0'"
    assert st.rules() == rules
    still_as_before()

    # Written to the file directly (an editor, a config management tool): the controller refuses it.
    config = st.home / "config.json"
    good = config.read_text()
    broader_and_invalid = [
        {"id": "r1", "action": "split", "dest": "203.0.113.0/24"},  # would split KEEP[4] too
        {"id": "r2", "action": "split", "dest": "300.1.1.1/8"},
    ]
    bad_files = {
        "not valid JSON": '{"splittun/enable": true, "splittun/rules": [',
        "'300.1.1.1/8' is not a valid CIDR": json.dumps(
            {"splittun/enable": True, "splittun/rules": broader_and_invalid}
        ),
    }
    fixed = False
    try:
        for problem, text in bad_files.items():
            seen = len(refused_lines(st))
            write_atomically(config, text)
            assert wait_until(lambda seen=seen: len(refused_lines(st)) > seen), "the controller did not notice"
            assert problem in refused_lines(st)[-1]
            still_as_before()
            # The CLI says what is wrong with the file instead of editing it.
            message = st.refused("rules", "list")
            assert "config file is invalid" in message and problem in message
        # The user fixes the file: a valid edit is applied as soon as it is saved, no command needed.
        write_atomically(config, json.dumps({"splittun/enable": True, "splittun/rules": broader_and_invalid[:1]}))
        fixed = True
        assert wait_until(lambda: st.policy_version() > version), "the fixed file was not applied"
        assert (curl(lab, SPLIT[4]), curl(lab, KEEP[4])) == (ISP[4], ISP[4])
        assert [r["dest"] for r in st.rules()] == ["203.0.113.0/24"]
    finally:
        if not fixed:
            write_atomically(config, good)  # the next tests' reset must be able to read it


def refused_lines(st: E2E) -> list[str]:
    return [line for line in st.log("controller").splitlines() if "config.refused" in line]


def write_atomically(path: Path, text: str) -> None:
    """As an editor saves: a new file renamed over the old one."""
    tmp = path.with_name(".e2e-edit.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- what a user sees ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_connections_show_the_split_tunnel_details(st: E2E, leaks: Leaks, family: int) -> None:
    lab = st.lab
    leaks.allow(SPLIT[family], "tcp", TCP)  # curl
    st.apply("rules", "add", "--name", "curl")
    t0 = time.time()
    fetched = curl_details(lab, SPLIT[family])
    assert fetched["seen"] == ISP[family]
    assert python_app(lab, "tcp", SPLIT[family]) == VPN[family]

    def split_row() -> dict[str, object] | None:
        rows = [
            r for r in st.connections("--app", "curl") if r["src_port"] == fetched["local_port"] and r["started"] >= t0
        ]
        done = rows and rows[0]["state"] == "closed" and rows[0]["split"] and rows[0]["split"]["bytes_down"]
        return rows[0] if done else None

    row = wait_until(split_row)
    assert row, "no closed split connection of curl in `splittun connections`"
    assert (row["verb"], row["rule"], row["dst_ip"], row["dst_port"]) == ("split tunneled", "r1", SPLIT[family], 80)
    split = row["split"]
    assert (split["interface"], split["local_ip"]) == (T.HOST_IF, ISP[family]) and split["local_port"] > 0
    assert split["data_path"] == st.split_tcp_path
    if st.split_tcp_path == "proxy":  # the proxy counts payload
        assert (split["bytes_up"], split["bytes_down"]) == (fetched["sent"], fetched["received"])
    else:  # conntrack counts IP packets: payload plus 40-80 bytes of IP and TCP headers per packet
        for way, payload in (("up", fetched["sent"]), ("down", fetched["received"])):
            packets, headers = split[f"packets_{way}"], split[f"bytes_{way}"] - payload
            assert packets >= 3 and 40 * packets <= headers <= 80 * packets, (way, split)
    other = [r for r in st.connections("--app", "splittun.lab.client") if r["started"] >= t0]
    assert [(r["verb"], r["split"]) for r in other] == [("accepted", None)]

    # The table a user reads, and `conn show`.
    table = st.ok("connections", "--verdict", "split", "--app", "curl")
    line = next(line for line in table.splitlines() if line.startswith(row["conn_id"] + " "))
    local = f"[{ISP[6]}]:{split['local_port']}" if family == 6 else f"{ISP[4]}:{split['local_port']}"
    # ID APP PROTO DESTINATION VERDICT ("split tunneled") RULE IFACE LOCAL UP DOWN STATE
    assert line.split()[7:11] == [T.HOST_IF, local, f"{split['bytes_up']}B", f"{split['bytes_down']}B"]
    shown = st.ok("conn", "show", row["conn_id"]).partition("split tunnel:")[2]
    assert f"interface: {T.HOST_IF}" in shown and f"local_ip: {ISP[family]}" in shown


# --- stopping -------------------------------------------------------------------------------------------------


def test_down_leaves_firewall_rules_routes_and_conntrack_as_before_up(e2e: E2E, leaks: Leaks, style: str) -> None:
    lab = e2e.lab
    leaks.allow(SPLIT[6], "tcp", TCP)  # curl (the app rule)
    leaks.allow(KEEP[4], "tcp", TCP)
    leaks.allow(SPLIT[4], "tcp", TCP)  # the held connection and flow (split by address)
    leaks.allow(SPLIT[4], "udp", UDP)
    e2e.ensure(style)
    assert e2e.stop() is not None
    before = host_state(lab)
    assert before == e2e.pristine[(style, False)], "an earlier `splittun down` left something behind"
    e2e.ensure(style)
    e2e.reset()
    e2e.apply("rules", "add", "--dest", SPLIT[4])
    e2e.apply("rules", "add", "--name", "curl")
    assert (curl(lab, SPLIT[6]), curl(lab, KEEP[4]), python_app(lab, "udp", KEEP[4])) == (ISP[6], ISP[4], VPN[4])
    tcp, udp = hold(lab, "tcp", SPLIT[4], TCP), hold(lab, "udp", SPLIT[4], UDP)
    with closing([tcp, udp]):
        assert (ask(tcp), ask(udp)) == (ISP[4], ISP[4])  # live split connections while splittun stops
        running = host_state(lab)
        assert running.conntrack and running.firewall != before.firewall and running.rules != before.rules
        down = e2e.stop()
        assert down is not None and down.returncode == 0, down.stdout + down.stderr
        after = host_state(lab)  # the apps that were split still run
    assert after.firewall == before.firewall
    assert after.rules == before.rules
    assert after.split_table == before.split_table == ""
    assert after.routes == before.routes
    assert after.sysctls == before.sysctls
    assert our_conntrack(lab) == list(before.conntrack) == []
    # And the user's traffic is back in the VPN, curl's included.
    assert (curl(lab, SPLIT[4]), python_app(lab, "udp", SPLIT[4])) == (VPN[4], VPN[4])


def test_down_after_a_point_to_point_choice_leaves_no_split_routing_behind(e2e: E2E) -> None:
    lab = e2e.lab
    e2e.ensure("replaced")
    e2e.reset()
    before = e2e.pristine[("replaced", False)]
    try:
        e2e.apply("rules", "add", "--name", "curl")
        e2e.interface(T.TUN_HOST_IF, expect=T.TUN_HOST_IF)
        assert curl(lab, SPLIT[4]) == VPN[4]
        down = e2e.stop()
        assert down is not None and down.returncode == 0, down.stdout + down.stderr
        after = host_state(lab)
        assert (after.rules, after.split_table) == (before.rules, before.split_table)
    finally:
        e2e.stop()
    assert host_state(lab) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_split_works_beside_wg_quick_anti_spoofing_rule(e2e: E2E, leaks: Leaks, family: int) -> None:
    """wg-quick's raw-table rule drops packets to the tunnel address arriving elsewhere from a non-local
    source: what a proxied reply looks like on lo. Split apps must still get their answers."""
    leaks.allow(SPLIT[family], "tcp", TCP)  # curl
    leaks.allow(SPLIT[family], "udp", UDP)  # socat
    e2e.ensure("wgquick", antispoof=True)
    e2e.reset()
    e2e.apply("rules", "add", "--name", "curl")
    e2e.apply("rules", "add", "--name", "socat")
    assert curl(e2e.lab, SPLIT[family]) == ISP[family]
    assert socat_udp(e2e.lab, SPLIT[family]) == ISP[family]
    assert python_app(e2e.lab, "tcp", SPLIT[family]) == VPN[family]
