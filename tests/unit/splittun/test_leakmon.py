"""The leak monitor's pure parts (splittun.lab.leakmon), no root: parsing and classifying hand-built frames, the
flow log's de-duplication, the capture filter, allowances and reports. Its calibration in the lab is in
tests/netns/test_leakmon.py."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from splittun.lab import topology as T
from splittun.lab.leakmon import (
    PACKET_OUTGOING,
    SKF_AD_IFINDEX,
    SKF_AD_OFF,
    SKF_AD_PKTTYPE,
    SNAPLEN,
    SYNC_MAC,
    Allowance,
    LeakMonitor,
    LeakMonitorError,
    Monitor,
    Position,
    bpf_program,
    classify,
    parse_frame,
    sync_frame,
)

HOST_MAC = bytes.fromhex("02aabbccdd01")
ISP_MAC = bytes.fromhex("02aabbccdd02")
ISP = {4: T.HOST_V4, 6: T.HOST_V6}
VPN = {4: T.VPNSRV_V4, 6: T.VPNSRV_V6}
TARGET = {4: T.SERVER_V4[1], 6: T.SERVER_V6[1]}
PORT = {"tcp": T.WHOAMI_TCP_PORT, "udp": T.WHOAMI_UDP_PORT}


# --- hand-built frames -------------------------------------------------------------------------------------


def ether(etype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return ISP_MAC + HOST_MAC + tag + struct.pack("!H", etype) + payload


def ipv4(src: str, dst: str, proto: int, l4: bytes, ttl: int = 64, ident: int = 1, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, frag, ttl, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return ether(0x0800, header + l4)


def ipv6(src: str, dst: str, proto: int, l4: bytes, hops: int = 64, ext: bytes = b"") -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(l4), proto, hops,
                         socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))  # fmt: skip
    return ether(0x86DD, header + ext + l4)


def tcp(sport: int, dport: int, flags: int = 0x02, seq: int = 1000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(kind: int, code: int, body: bytes = b"\0\0\0\0") -> bytes:
    return struct.pack("!BBH", kind, code, 0) + body


def quoted_v4(src: str, dst: str, l4: bytes) -> bytes:
    return ipv4(src, dst, 17, l4)[14:]  # the IP packet without its Ethernet header


SYN = ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(40000, 80))


# --- parsing and classes -------------------------------------------------------------------------------------


def test_a_tcp_syn_is_parsed_and_is_a_candidate() -> None:
    pkt = parse_frame(SYN)
    assert (pkt.family, pkt.proto, pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.ttl) == (
        4, "tcp", T.HOST_V4, 40000, T.SERVER_V4[0], 80, 64)  # fmt: skip
    assert (pkt.flags, pkt.isn) == ("S", 1000)
    assert classify(pkt) == "candidate"
    ack = parse_frame(ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(40000, 80, flags=0x12)))
    assert (ack.flags, ack.isn) == ("SA", None)  # not a new connection


def test_ipv6_behind_extension_headers_and_a_vlan_tag() -> None:
    hop_by_hop = bytes([17, 0]) + b"\x05\x02\x00\x00\x01\x00"  # next: UDP, router alert
    frame = ipv6(T.HOST_V6, T.SERVER_V6[0], 0, udp(5000, 5300), ext=hop_by_hop)
    pkt = parse_frame(frame)
    assert (pkt.family, pkt.proto, pkt.sport, pkt.dport, pkt.ttl) == (6, "udp", 5000, 5300, 64)
    tagged = parse_frame(ether(0x0800, SYN[14:], vlan=7))
    assert (tagged.proto, tagged.dst, tagged.dport) == ("tcp", T.SERVER_V4[0], 80)


def test_the_vpn_carrier_and_icmp_errors_about_it() -> None:
    carrier = ipv4(T.HOST_V4, T.VPNSRV_V4, 17, udp(T.VPN_CLIENT_PORT, T.VPN_SERVER_PORT))
    assert classify(parse_frame(carrier)) == "carrier"
    other_port = ipv4(T.HOST_V4, T.VPNSRV_V4, 17, udp(T.VPN_CLIENT_PORT, 53))
    assert classify(parse_frame(other_port)) == "candidate"  # the server's address alone is not the transport
    tcp_to_server = ipv4(T.HOST_V4, T.VPNSRV_V4, 6, tcp(40000, T.VPN_SERVER_PORT))
    assert classify(parse_frame(tcp_to_server)) == "candidate"
    late = quoted_v4(T.VPNSRV_V4, T.HOST_V4, udp(T.VPN_SERVER_PORT, T.VPN_CLIENT_PORT))
    unreachable = parse_frame(ipv4(T.HOST_V4, T.VPNSRV_V4, 1, icmp(3, 3) + late))
    assert unreachable.inner == ("udp", T.VPNSRV_V4, T.VPN_SERVER_PORT, T.HOST_V4, T.VPN_CLIENT_PORT)
    assert classify(unreachable) == "carrier"
    about_other = quoted_v4(T.VPNSRV_V4, T.HOST_V4, udp(53, 40000))
    assert classify(parse_frame(ipv4(T.HOST_V4, T.VPNSRV_V4, 1, icmp(3, 3) + about_other))) == "candidate"


def test_link_housekeeping() -> None:
    arp = ether(0x0806, struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + HOST_MAC + socket.inet_aton(T.HOST_V4)
                + bytes(6) + socket.inet_aton(T.ISP_LAN_V4))  # fmt: skip
    pkt = parse_frame(arp)
    assert (pkt.family, pkt.proto, pkt.src, pkt.dst) == (0, "arp", T.HOST_V4, T.ISP_LAN_V4)
    assert classify(pkt) == "housekeeping"
    for kind in (133, 135, 136, 143):  # router and neighbour solicitation, advertisement, MLDv2 report
        solicit = ipv6(T.HOST_V6, "ff02::1:ff00:1", 58, icmp(kind, 0), hops=255)
        assert classify(parse_frame(solicit)) == "housekeeping", kind
    to_unicast = parse_frame(ipv6(T.HOST_V6, T.ISP_LAN_V6, 58, icmp(135, 0), hops=255))
    assert classify(to_unicast) == "housekeeping"  # neighbour discovery, whoever it goes to
    mdns = ipv6("fe80::1", "ff02::fb", 17, udp(5353, 5353), hops=255)
    assert classify(parse_frame(mdns)) == "housekeeping"
    assert classify(parse_frame(ipv4(T.HOST_V4, "224.0.0.251", 17, udp(5353, 5353)))) == "housekeeping"
    echo = ipv6(T.HOST_V6, T.ISP_LAN_V6, 58, icmp(128, 0))
    assert classify(parse_frame(echo)) == "candidate"  # a ping is no housekeeping
    lldp = parse_frame(ether(0x88CC, b"\0" * 20))
    assert (lldp.family, lldp.proto, classify(lldp)) == (0, "ether-0x88cc", "other")
    broken = parse_frame(ether(0x0800, b"\x45\0"))
    assert (broken.family, classify(broken)) == (4, "candidate")  # an IP frame we cannot read is no excuse


def test_the_probe_ttl_marks_a_probe_in_both_families() -> None:
    assert classify(parse_frame(ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(1, 80), ttl=T.PROBE_TTL))) == "probe"
    assert classify(parse_frame(ipv6(T.HOST_V6, T.SERVER_V6[0], 17, udp(1, 53), hops=T.PROBE_TTL))) == "probe"
    assert classify(parse_frame(ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(1, 80), ttl=T.PROBE_TTL + 1))) == "candidate"


def test_sync_frames_and_their_nonce() -> None:
    frame = sync_frame(HOST_MAC, T.HOST_IF, "0123abcd")
    assert frame[:6] == SYNC_MAC and frame[6:12] == HOST_MAC
    pkt = parse_frame(frame)
    assert (pkt.proto, pkt.ttl, pkt.dport, classify(pkt)) == ("udp", T.PROBE_TTL, T.LEAKMON_SYNC_PORT, "sync")
    header = frame[14:34]
    assert sum(struct.unpack("!10H", header)) % 0xFFFF == 0  # a valid IPv4 header checksum
    record = Monitor().handle(frame, T.ISP_LAN_IF, 1.0)
    assert record is not None and (record["event"], record["nonce"], record["counts"]) == (
        "sync",
        "0123abcd",
        {"sync": 1},
    )
    # Without the probe TTL it is just another datagram.
    forged = ipv4(
        T.HOST_V4, T.ISP_LAN_V4, 17, udp(T.LEAKMON_SYNC_PORT, T.LEAKMON_SYNC_PORT, b"splittun-leakmon-sync x")
    )
    assert classify(parse_frame(forged)) == "candidate"


# --- the flow log ---------------------------------------------------------------------------------------------


def test_one_record_per_flow_and_per_connection() -> None:
    mon = Monitor()
    first = mon.handle(SYN, "lan0", 1.0)
    assert first is not None and (first["class"], first["flags"], first["ttl"], first["iface"]) == (
        "candidate",
        "S",
        64,
        "lan0",
    )
    assert mon.handle(SYN, "lan0", 1.1) is None  # a retransmitted SYN
    assert mon.handle(ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(40000, 80, flags=0x10)), "lan0", 1.2) is None
    reused = mon.handle(ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(40000, 80, seq=77)), "lan0", 1.3)
    assert reused is not None  # the same port again, a new connection: a record of its own
    datagram = ipv4(T.HOST_V4, T.SERVER_V4[0], 17, udp(40000, 5300))
    assert mon.handle(datagram, "lan0", 1.4) is not None and mon.handle(datagram, "lan0", 1.5) is None
    mon.handle(sync_frame(HOST_MAC, T.HOST_IF, "n1"), "lan0", 1.6)
    assert mon.handle(datagram, "lan0", 1.7) is not None  # every window lists its datagram flows again
    assert mon.handle(ipv4(T.HOST_V4, T.SERVER_V4[0], 6, tcp(40000, 80, flags=0x11)), "lan0", 1.8) is None
    assert mon.counts == {"candidate": 8, "sync": 1}


def test_the_flow_table_is_bounded() -> None:
    mon = Monitor(max_flows=2)
    frames = [ipv4(T.HOST_V4, T.SERVER_V4[0], 17, udp(port, 5300)) for port in (1, 2, 3)]
    assert all(mon.handle(f, "lan0", 1.0) is not None for f in frames)
    assert mon.handle(frames[0], "lan0", 2.0) is not None  # the oldest was forgotten: logged again
    assert mon.handle(frames[2], "lan0", 2.0) is None


def test_fragments_take_the_first_fragments_ports() -> None:
    mon = Monitor()
    carrier = udp(T.VPN_CLIENT_PORT, T.VPN_SERVER_PORT, b"x" * 16)
    first = ipv4(T.HOST_V4, T.VPNSRV_V4, 17, carrier, ident=9, frag=0x2000)
    later = ipv4(T.HOST_V4, T.VPNSRV_V4, 17, b"y" * 16, ident=9, frag=3)
    assert mon.handle(first, "lan0", 1.0)["class"] == "carrier"  # type: ignore[index]
    assert mon.handle(later, "lan0", 1.1) is None  # same flow, same class
    assert mon.counts == {"carrier": 2}
    orphan = mon.handle(ipv4(T.HOST_V4, T.VPNSRV_V4, 17, b"z" * 16, ident=10, frag=3), "lan0", 1.2)
    assert orphan is not None and (orphan["class"], orphan["dport"], orphan["fragment"]) == ("candidate", None, True)
    frag_ext = bytes([17, 0]) + struct.pack("!HI", 8 | 0, 5)  # IPv6 fragment header: a later fragment
    pkt = parse_frame(ipv6(T.HOST_V6, T.SERVER_V6[0], 44, b"w" * 8, ext=frag_ext))
    assert (pkt.proto, pkt.frag, pkt.sport) == ("udp", (5, 8, False), None)


def run_bpf(prog: list[tuple[int, int, int, int]], pkttype: int, ifindex: int) -> int:
    """Just enough of classic BPF to run bpf_program(): ancillary loads, jeq, ret."""
    ancillary = {
        (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF: pkttype,
        (SKF_AD_OFF + SKF_AD_IFINDEX) & 0xFFFFFFFF: ifindex,
    }
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc, pc = ancillary[k], pc + 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        else:
            assert code == 0x06
            return k


def test_the_capture_filter_keeps_what_the_watched_links_receive() -> None:
    prog = bpf_program([11, 13])
    assert run_bpf(prog, 0, 11) == SNAPLEN and run_bpf(prog, 0, 13) == SNAPLEN
    assert run_bpf(prog, 3, 11) == SNAPLEN  # another host's MAC (a sync frame): still kept
    assert run_bpf(prog, PACKET_OUTGOING, 11) == 0  # what isp sends the host
    assert run_bpf(prog, 0, 20) == 0  # isp's other links


# --- allowances and reports ------------------------------------------------------------------------------------


def flow(dst: str, proto: str = "tcp", dport: int | None = 80, iface: str = "lan0", **extra: Any) -> dict[str, Any]:
    return {"class": "candidate", "iface": iface, "proto": proto, "src": T.HOST_V4, "sport": 40000, "dst": dst,
            "dport": dport, "ttl": 64, "ts": 1.0, **extra}  # fmt: skip


def test_allowances() -> None:
    one = Allowance.of(T.SERVER_V4[1], "tcp", 80)
    assert one.covers(flow(T.SERVER_V4[1])) and str(one) == f"{T.SERVER_V4[1]} tcp/80"
    assert not one.covers(flow(T.SERVER_V4[1], dport=81))
    assert not one.covers(flow(T.SERVER_V4[1], "udp"))
    assert not one.covers(flow(T.SERVER_V4[0]))
    net = Allowance.of("203.0.113.64/26")
    assert net.covers(flow(T.SERVER_V4[0], "udp", 5300)) and not net.covers(flow(T.INET_V4))
    assert not Allowance.of("::/0").covers(flow(T.SERVER_V4[0]))  # families never mix
    via = Allowance.of(T.SERVER_V4[1], via=T.HOST2_IF)
    assert via.covers(flow(T.SERVER_V4[1], iface=T.ISP_LAN2_IF)) and not via.covers(flow(T.SERVER_V4[1]))
    inner = {"proto": "tcp", "src": T.SERVER_V4[1], "sport": 80, "dst": T.HOST_V4, "dport": 40000}
    error = flow(T.SERVER_V4[1], "icmp", None, icmp=[3, 3], inner=inner)
    assert one.covers(error)  # an ICMP error about an allowed flow belongs to it
    for bad in (("x",), (T.SERVER_V4[1], "sctp"), (T.SERVER_V4[1], None, 80), (T.SERVER_V4[1], "tcp", 0)):
        with pytest.raises(ValueError):
            Allowance.of(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Allowance.of(T.SERVER_V4[1], via="wgivpn")


def fake_monitor(tmp_path: Path, lines: list[dict[str, Any]]) -> LeakMonitor:
    """A LeakMonitor on a hand-written log whose sync() stops at the last line (no lab needed)."""
    log = tmp_path / T.LEAKMON_LOG
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monitor = LeakMonitor(SimpleNamespace(name="fake", state_dir=tmp_path))  # type: ignore[arg-type]
    last = lines[-1]
    monitor.sync = lambda timeout=5.0: Position(log.stat().st_ino, log.stat().st_size, last["ts"],  # type: ignore[method-assign]
                                                last["counts"], last["drops"])  # fmt: skip
    return monitor


def test_a_report_judges_the_window_since_the_mark(tmp_path: Path) -> None:
    lines = [
        {"ts": 0.5, "event": "ready", "ifaces": ["lan0"]},
        flow(T.SERVER_V4[0], ts=0.6),  # before the mark: not this report's business
        {"ts": 0.7, "event": "sync", "nonce": "a", "iface": "lan0", "counts": {"candidate": 1, "sync": 1}, "drops": 0},
        flow(T.SERVER_V4[1], ts=1.0),
        flow(T.SERVER_V4[0], "udp", 5300, ts=1.5),
        {"ts": 1.6, "class": "carrier", "iface": "lan0", "proto": "udp", "src": T.HOST_V4, "sport": 1,
         "dst": T.VPNSRV_V4, "dport": T.VPN_SERVER_PORT, "ttl": 64},
        {"ts": 2.0, "event": "sync", "nonce": "b", "iface": "lan0", "drops": 0,
         "counts": {"candidate": 9, "carrier": 40, "probe": 3, "housekeeping": 2, "sync": 2}},
    ]  # fmt: skip
    monitor = fake_monitor(tmp_path, lines)
    first_sync_end = len("".join(json.dumps(line) + "\n" for line in lines[:3]))
    monitor.start = Position(monitor.sync().inode, first_sync_end, 0.7, {"candidate": 1, "sync": 1}, 0)
    monitor.allow(T.SERVER_V4[1], "tcp", 80)
    report = monitor.report()
    assert [r["dst"] for r in report.leaks] == [T.SERVER_V4[0]] and [r["dst"] for r in report.allowed] == [
        T.SERVER_V4[1]
    ]
    assert (report.carrier, report.probes, report.housekeeping, report.packets["candidate"]) == (40, 3, 2, 8)
    assert report.flows == {"candidate": 2, "carrier": 1}
    with pytest.raises(AssertionError) as failed:
        report.assert_no_leaks()
    text = str(failed.value)
    assert f"LEAK udp {T.HOST_V4}:40000 -> {T.SERVER_V4[0]}:5300 (ttl 64, on lan0, at +0.800s)" in text
    assert "1 flow outside the VPN (40 carrier, 3 probe, 2 housekeeping packets; 1 split flow allowed)" in text
    assert f"allowed as split: {T.SERVER_V4[1]} tcp/80" in text
    assert monitor.report(allow=[Allowance.of("203.0.113.0/24", "udp")]).leaks == []
    # A report from a replaced log (the lab was rebuilt) starts at its beginning.
    monitor.start = Position(inode=-1, offset=10**6)
    again = monitor.report()
    assert again.restarted and [r["dst"] for r in again.leaks] == [T.SERVER_V4[0], T.SERVER_V4[0]]


def test_a_capture_that_lost_packets_cannot_vouch(tmp_path: Path) -> None:
    lines = [{"ts": 1.0, "event": "sync", "nonce": "a", "iface": "lan0", "counts": {"carrier": 5}, "drops": 3}]
    with pytest.raises(LeakMonitorError, match="lost packets"):
        fake_monitor(tmp_path, lines).report().assert_no_leaks()


def test_twenty_leaks_are_listed_and_the_rest_counted(tmp_path: Path) -> None:
    lines = [flow(T.SERVER_V4[0], sport=port) for port in range(25)]
    lines.append({"ts": 2.0, "event": "sync", "nonce": "a", "iface": "lan0", "counts": {"candidate": 25}, "drops": 0})
    text = fake_monitor(tmp_path, lines).report().describe()
    assert text.count("LEAK ") == 20 and "… and 5 more" in text and "25 flows outside the VPN" in text


# --- calibration in the lab ----------------------------------------------------------------------------------
