"""The interceptor in the lab: `splittun up` in the host namespace, real clients, the real proxies.

What a user would notice: split destinations answer with the ISP address, everything else with the
VPN's; only a connection's first packet reaches user space; a name looked up a moment ago already
matches a domain rule; a rule another program puts above ours is pushed down again; a killed
interceptor means "through the VPN", never "out through the ISP", and it comes back.
The instance runs two interceptor workers (--queue-balance), so every test also exercises them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from messages import ConnEnd, ConnNew, ConnVerdict, PolicyRule, ProxySessionClose, ProxySessionOpen
from splittun.lab import Lab
from splittun.lab import topology as T
from tests.support.interceptor import (
    BY_NAME,
    DNS,
    ISP,
    KEEP,
    OUR_JUMPS,
    RULES,
    SPLIT,
    TOOLS,
    VPN,
    Instance,
    ask,
    chain_rules,
    client,
    curl,
    gone,
    hold,
    joined_subscriber,
    lab_dns,
    out_queued,
    push_ours_down,
    queue_counts,
    remove_foreign,
    start,
    stop,
    wait_until,
)
from tests.support.lab import Leaks, own_lab


@pytest.fixture(scope="module")
def ic_lab() -> Iterator[Lab]:
    yield from own_lab("ic")


@pytest.fixture(scope="module")
def inst(ic_lab: Lab) -> Iterator[Instance]:
    """splittun with two interceptor workers and the RULES policy; no scheduled jump checks, so a test that
    displaces our jumps decides when they are checked (a network change may still trigger one)."""
    instance = start(ic_lab, "--interceptor-workers", "2", env={"SPLITTUN_JUMP_CHECKS": ""})
    try:
        assert instance.workers() == ["interceptor", "interceptor_01"]
        assert instance.publish_policy(RULES)
        yield instance
    finally:
        stop(instance)


# --- the data path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_split_destination_leaves_through_the_isp_others_through_the_vpn(
    inst: Instance, leaks: Leaks, proto: str, family: int
) -> None:
    leaks.allow(SPLIT[family], proto, T.WHOAMI_TCP_PORT if proto == "tcp" else T.WHOAMI_UDP_PORT)
    assert inst.lab.whoami(proto=proto, family=family, target=SPLIT[family]) == ISP[family]
    assert inst.lab.whoami(proto=proto, family=family, target=KEEP[family]) == VPN[family]


def test_curl_split_and_unsplit(inst: Instance, leaks: Leaks) -> None:
    leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)
    leaks.allow(SPLIT[6], "tcp", T.WHOAMI_TCP_PORT)
    assert curl(inst.lab, SPLIT[4]) == ISP[4]
    assert curl(inst.lab, SPLIT[6]) == ISP[6]
    assert curl(inst.lab, KEEP[4]) == VPN[4]


@pytest.mark.parametrize("target", [SPLIT[4], KEEP[6]])
def test_only_the_first_packet_of_a_tcp_connection_is_queued(inst: Instance, leaks: Leaks, target: str) -> None:
    if target == SPLIT[4]:  # KEEP[6] stays in the VPN
        leaks.allow(target, "tcp", T.WHOAMI_TCP_PORT)
    before = out_queued(inst.lab)
    answers = client(inst.lab, "keepalive", target, "25")  # 25 requests on one connection: dozens of packets
    assert len(answers) == 25
    assert out_queued(inst.lab) - before == 1


def test_only_the_first_datagram_of_a_udp_flow_is_queued(inst: Instance, leaks: Leaks) -> None:
    leaks.allow(SPLIT[6], "udp", T.WHOAMI_UDP_PORT)
    before = out_queued(inst.lab)
    answers = client(inst.lab, "datagrams", SPLIT[6], str(T.WHOAMI_UDP_PORT), "20")
    assert answers == [ISP[6]] * 20
    assert out_queued(inst.lab) - before == 1


def test_split_connection_events_join_the_proxy_session(inst: Instance, leaks: Leaks) -> None:
    leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)
    ctx = zmq.Context()
    sub = joined_subscriber(
        ctx, inst.run_dir, ["conn.", "proxy.session."], {"interceptor", "interceptor_01", "proxy_tcp_00"}
    )
    seen: dict[str, list[Any]] = {}
    try:
        assert curl(inst.lab, SPLIT[4]) == ISP[4]

        def collect() -> bool:
            while (msg := sub.recv(timeout=0.05)) is not None:
                if isinstance(msg, ProxySessionClose) and msg.opened is not None:
                    msg = msg.opened  # a short session: its open came inside its close
                seen.setdefault(type(msg).__name__, []).append(msg)
            return bool(seen.get("ConnNew")) and bool(seen.get("ProxySessionOpen"))

        assert wait_until(collect)
    finally:
        sub.close()
        ctx.term()
    new = next(m for m in seen["ConnNew"] if isinstance(m, ConnNew) and m.dst_ip == SPLIT[4])
    verdict = new  # one event per decided connection: conn.new carries its verdict (schema version 2)
    assert not [m for m in seen.get("ConnVerdict", []) if isinstance(m, ConnVerdict) and m.conn_id == new.conn_id]
    session = next(m for m in seen["ProxySessionOpen"] if isinstance(m, ProxySessionOpen))
    assert new.process is not None and new.process.exe == shutil.which("curl")
    assert new.process.cmdline[0] == "curl" and new.process.ancestors
    assert (new.src_ip, new.dst_port, new.protocol) == (T.TUN_HOST_V4, 80, 6)
    assert (verdict.verdict, verdict.verb, verdict.rule) == (8, "split tunneled", "by-address-4")
    assert verdict.split_key == session.split_key  # what the controller joins on


def test_conn_end_when_conntrack_forgets_the_connection(inst: Instance, leaks: Leaks) -> None:
    leaks.allow(SPLIT[4], "udp", T.WHOAMI_UDP_PORT)
    ctx = zmq.Context()
    sub = joined_subscriber(ctx, inst.run_dir, ["conn."], {"interceptor", "interceptor_01"})
    seen: list[Any] = []
    app = hold(inst.lab, "udp", SPLIT[4], T.WHOAMI_UDP_PORT)  # its socket stays open meanwhile
    try:
        assert [ask(app), ask(app)] == [ISP[4]] * 2

        def the_flow() -> Any:
            while (msg := sub.recv(timeout=0.05)) is not None:
                seen.append(msg)
            return next((m for m in seen if isinstance(m, ConnNew) and m.dst_ip == SPLIT[4] and m.protocol == 17), None)

        new = wait_until(the_flow)
        assert new is not None
        # The flow ends (here: deleted, as a timeout would): conntrack's destroy event becomes conn.end.
        spec = ["-p", "udp", "-s", T.TUN_HOST_V4, "-d", SPLIT[4], "--dport", str(T.WHOAMI_UDP_PORT)]
        inst.lab.exec("host", ["conntrack", "-D", *spec], check=True)

        def ended() -> Any:
            the_flow()
            return next((m for m in seen if isinstance(m, ConnEnd) and m.conn_id == new.conn_id), None)

        end = wait_until(ended)
        assert end is not None and end.reason == "closed"
    finally:
        app.kill()
        app.wait()
        sub.close()


def test_a_udp_flow_ends_with_its_socket_and_its_entry_goes_too(inst: Instance, leaks: Leaks) -> None:
    """A UDP conntrack entry outlives its socket; another socket on the same port would follow its path. So the
    entry of a closed socket is deleted at once (and the connection ends), not after conntrack's timeout."""
    leaks.allow(SPLIT[4], "udp", T.WHOAMI_UDP_PORT)
    ctx = zmq.Context()
    sub = joined_subscriber(ctx, inst.run_dir, ["conn."], {"interceptor", "interceptor_01"})
    seen: list[Any] = []
    try:
        assert client(inst.lab, "datagrams", SPLIT[4], str(T.WHOAMI_UDP_PORT), "2") == [ISP[4]] * 2

        def ended() -> Any:
            while (msg := sub.recv(timeout=0.05)) is not None:
                seen.append(msg)
            new = next((m for m in seen if isinstance(m, ConnNew) and m.dst_ip == SPLIT[4] and m.protocol == 17), None)
            return new and next((m for m in seen if isinstance(m, ConnEnd) and m.conn_id == new.conn_id), None)

        end = wait_until(ended)
        assert end is not None and end.reason == "closed: its socket was closed"
        spec = ["-p", "udp", "-s", T.TUN_HOST_V4, "-d", SPLIT[4], "--dport", str(T.WHOAMI_UDP_PORT)]
        assert "udp" not in inst.lab.exec("host", ["conntrack", "-L", *spec]).stdout
    finally:
        sub.close()
        ctx.term()


@pytest.fixture
def dns_server(inst: Instance) -> Iterator[None]:
    with lab_dns(inst.lab):
        yield


@pytest.mark.parametrize("family", [4, 6])
def test_first_connection_after_a_lookup_matches_the_domain_rule(
    inst: Instance, dns_server: None, leaks: Leaks, family: int
) -> None:
    leaks.allow(BY_NAME[family], "tcp", T.WHOAMI_TCP_PORT)  # www*.split.example.com
    # Before any lookup the address has no name, so no rule matches it.
    assert inst.lab.whoami(proto="tcp", family=family, target=BY_NAME[family]) == VPN[family]
    # Resolve and connect at once, in one process: the answer was learned before the SYN left. With two
    # workers the answer and the connection are often queued to different workers (shared name table).
    fetched = client(inst.lab, "lookup-fetch", DNS[family], f"www{family}.split.example.com", str(family))
    assert fetched == [ISP[family]]
    # Another name for the same address is not split: it is the name that matched, not the address.
    other = client(inst.lab, "lookup-fetch", DNS[family], f"www{family}.other.example.com", str(family))
    assert other == [VPN[family]]


def test_policy_change_moves_udp_flows_and_running_tcp_keeps_its_path(inst: Instance, leaks: Leaks) -> None:
    """Enable/disable while connections run: new connections follow the new policy; a running UDP flow
    moves at its next datagram; a running TCP stream keeps its path (split or not) until it closes."""
    lab = inst.lab
    for address in (SPLIT[4], KEEP[4]):  # .81 split by RULES, .80 by the new policy
        leaks.allow(address, "tcp", T.WHOAMI_TCP_PORT)
        leaks.allow(address, "udp", T.WHOAMI_UDP_PORT)
    procs = {
        "udp .80": hold(lab, "udp", KEEP[4], T.WHOAMI_UDP_PORT),
        "udp .81": hold(lab, "udp", SPLIT[4], T.WHOAMI_UDP_PORT),
        "tcp .81": hold(lab, "tcp", SPLIT[4], T.WHOAMI_TCP_PORT),
        "tcp .80": hold(lab, "tcp", KEEP[4], T.WHOAMI_TCP_PORT),
    }
    try:
        assert {k: ask(p) for k, p in procs.items()} == {
            "udp .80": VPN[4],
            "udp .81": ISP[4],
            "tcp .81": ISP[4],
            "tcp .80": VPN[4],
        }
        # Split .80, stop splitting .81:
        assert inst.publish_policy([PolicyRule(id="now-80", action="split", dest=KEEP[4])])
        assert {k: ask(p) for k, p in procs.items()} == {
            "udp .80": ISP[4],  # moved to the proxy
            "udp .81": VPN[4],  # moved back into the VPN
            "tcp .81": ISP[4],  # a split stream keeps its proxy until it closes
            "tcp .80": VPN[4],  # a running stream cannot be handed to the proxy mid-way
        }
        assert (curl(lab, KEEP[4]), curl(lab, SPLIT[4])) == (ISP[4], VPN[4])  # new connections: new policy
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        assert inst.publish_policy(RULES)


def test_wgquick_routing_style(inst: Instance, leaks: Leaks) -> None:
    lab = inst.lab
    leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)
    leaks.allow(SPLIT[6], "udp", T.WHOAMI_UDP_PORT)
    try:
        lab.set_style("wgquick")
        assert lab.whoami(proto="tcp", target=SPLIT[4]) == ISP[4]
        assert lab.whoami(proto="udp", family=6, target=SPLIT[6]) == ISP[6]
        assert lab.whoami(proto="tcp", family=6, target=KEEP[6]) == VPN[6]
    finally:
        lab.set_style("replaced")


# --- rules and workers ------------------------------------------------------------------------------------


def test_displaced_jumps_are_put_back_on_top_on_request(inst: Instance, leaks: Leaks) -> None:
    lab = inst.lab
    leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)
    everywhere = sorted(f"ip{f} {t} OUTPUT" for f in (4, 6) for t in OUR_JUMPS)
    moved: list[str] = []
    try:
        for _attempt in range(3):
            push_ours_down(lab)
            if chain_rules(lab, 4, "mangle", "OUTPUT")[0] != "-A OUTPUT -j SPLITTUN-INGEST-OUTPUT":
                moved = sorted(inst.ask("interceptor", "check_rules")["moved"])
                if moved == everywhere:
                    break
            # else a background check (periodic, or a network change) beat us to some: again
            remove_foreign(lab)
        assert moved == everywhere
        for family in (4, 6):
            for table, ours in OUR_JUMPS.items():
                rules = chain_rules(lab, family, table, "OUTPUT")
                assert rules[0] == f"-A OUTPUT -j {ours}" and rules.count(rules[0]) == 1
                assert "--dport 9" in rules[1]  # theirs is kept, right below ours
        assert inst.ask("interceptor", "check_rules")["moved"] == []
        assert lab.whoami(proto="tcp", target=SPLIT[4]) == ISP[4]
    finally:
        remove_foreign(lab)


def isp_forwarded(lab: Lab, action: str = "count") -> int:
    """Packets the ISP router forwarded from the host's ISP address to the split servers."""
    total = 0
    for tool, src, dst in ((TOOLS[0], T.HOST_V4, SPLIT[4]), (TOOLS[1], T.HOST_V6, SPLIT[6])):
        spec = ["FORWARD", "-i", T.ISP_LAN_IF, "-s", src, "-d", dst]
        if action in ("add", "remove"):
            lab.exec("isp", [tool, "-w", "-I" if action == "add" else "-D", *spec], check=action == "add")
            continue
        out = lab.exec("isp", [tool, "-w", "-L", "FORWARD", "-v", "-x", "-n"], check=True).stdout
        total += sum(int(line.split()[0]) for line in out.splitlines() if src in line and dst in line)
    return total


def test_killed_interceptor_fails_open_to_the_vpn_and_comes_back(inst: Instance, leaks: Leaks) -> None:
    lab = inst.lab
    leaks.allow(SPLIT[4], "tcp", T.WHOAMI_TCP_PORT)  # once the workers are back (before: not one packet)
    sup = inst.supervisord_pid()
    old = {w: inst.pid(w) for w in ("interceptor", "interceptor_01")}  # a live worker would still split its flows
    isp_forwarded(lab, "add")
    try:
        os.kill(sup, signal.SIGSTOP)  # hold supervisord: the window without an interceptor stays open
        try:
            for pid in old.values():
                os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: all(gone(pid) for pid in old.values()))
            before = isp_forwarded(lab)
            for proto in ("tcp", "udp"):
                for family in (4, 6):
                    assert lab.whoami(proto=proto, family=family, target=SPLIT[family]) == VPN[family]
            assert isp_forwarded(lab) == before  # not one packet to them left through the ISP
        finally:
            os.kill(sup, signal.SIGCONT)
        assert wait_until(lambda: all(inst.active(w) and inst.pid(w) != pid for w, pid in old.items())), (
            "supervisord did not bring the workers back"
        )
        assert inst.publish_policy(RULES)  # the new process asked the controller for its policy: give it ours again
        assert lab.whoami(proto="tcp", target=SPLIT[4]) == ISP[4]
        assert isp_forwarded(lab) > before
        for family in (4, 6):  # installed over its own leftovers: still exactly one jump per chain
            assert chain_rules(lab, family, "mangle", "OUTPUT").count("-A OUTPUT -j SPLITTUN-INGEST-OUTPUT") == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup, signal.SIGCONT)
        isp_forwarded(lab, "remove")


def test_workers_share_the_queues_with_queue_balance(inst: Instance) -> None:
    rules = "\n".join(chain_rules(inst.lab, 4, "mangle", "SPLITTUN-INGEST-OUTPUT"))
    assert "--queue-balance 17040:17041 --queue-bypass" in rules
    assert {17040, 17041, 17060, 17061, 17140, 17141, 17160, 17161} <= set(queue_counts(inst.lab))
    statuses = [inst.ask(w, "status") for w in ("interceptor", "interceptor_01")]
    assert [(s["worker"], s["owns_rules"], s["active"]) for s in statuses] == [(0, True, True), (1, False, True)]
