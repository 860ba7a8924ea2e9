"""The lab's two DNS servers, answering the same names differently (geo-DNS, as CDNs do).

- the ISP's: on the home router (isp, ``ISP_DNS``: 192.0.2.1 / 2001:db8:10::1), reached through the
  physical link, as DHCP hands it out; it answers ``GEO_NAME`` with the first whoami server;
- the VPN's: tunnel-internal on the VPN server (vpnsrv, ``VPN_DNS``: 192.0.2.65 / fd00:5717::1), reached
  only through the tunnel, as IVPN and Mullvad put it in resolv.conf; it answers with the second one.
Any name under ``GEO_NAME`` answers like it (a test asks a name of its own, then finds it in the logs).
Both serve a CNAME (``ALIAS_NAME`` → ``GEO_NAME``), a name reached through a CNAME chain into another
domain (``SHOP_NAME`` → ``EDGE_NAME``) and a name whose answer does not fit 512 bytes (``BIG_NAME``: UDP
answers are truncated, so resolvers ask again over TCP). Both also answer DNS over TLS on port 853 with a
self-signed certificate for ``TLS_NAMES`` (``GeoDns.ca_file`` is what to trust). Every query is logged,
one JSON object a line (name, type, transport, who asked), so a test sees which server a query reached.

    python -m splittun.lab.geodns --listen 192.0.2.1 --listen 2001:db8:10::1 --index 0 --log PATH
    with GeoDns(lab) as geo: geo.queries("vpn")  # both servers, stopped on the way out

Runs only inside lab namespaces; dnspython does the wire format.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from splittun.lab import topology as T

if TYPE_CHECKING:
    from splittun.lab.lab import Lab

GEO_NAME = "geo.example.net"
ALIAS_NAME = "alias.example.net"
SHOP_NAME = "www.shop.example.net"
EDGE_NAME = "edge.cdn.example.org"
BIG_NAME = "big.example.net"
TTL = 60
#: Which whoami server each DNS server answers with (index into SERVER_V4 / SERVER_V6).
ANSWER_INDEX = {"isp": 0, "vpn": 1}
SERVERS = {"isp": ("isp", T.ISP_LAN_V4, T.ISP_LAN_V6), "vpn": ("vpnsrv", T.TUN_SRV_V4, T.TUN_SRV_V6)}
#: The names the servers' DNS-over-TLS certificates are for (GeoDns.ca_file holds both certificates).
TLS_NAMES = {"isp": "dns.isp.test", "vpn": "dns.vpn.test"}


def zone(index: int) -> dict[str, list[tuple[str, str]]]:
    """name → [(type, data)] one server answers: every name's addresses are whoami server `index`."""
    v4, v6 = T.SERVER_V4[index], T.SERVER_V6[index]
    return {
        GEO_NAME: [("A", v4), ("AAAA", v6)],
        ALIAS_NAME: [("CNAME", GEO_NAME + ".")],
        SHOP_NAME: [("CNAME", EDGE_NAME + ".")],
        EDGE_NAME: [("A", v4), ("AAAA", v6)],
        BIG_NAME: [("A", f"198.51.100.{i}") for i in range(100, 140)]
        + [("AAAA", f"2001:db8:99::{i:x}") for i in range(40)],
    }


def respond(query: dns.message.Message, records: dict[str, list[tuple[str, str]]]) -> dns.message.Message:
    """The answer from `records`, following CNAMEs within them; NXDOMAIN for names it does not have."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    if name not in records and not name.endswith("." + GEO_NAME):
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    for _ in range(8):
        entries = records.get(name) or records[GEO_NAME]  # any name under GEO_NAME answers like it
        cname = [data for rtype, data in entries if rtype == "CNAME"]
        if cname:
            response.answer.append(dns.rrset.from_text(name + ".", TTL, "IN", "CNAME", cname[0]))
            name = cname[0].rstrip(".")
            continue
        wanted = dns.rdatatype.to_text(question.rdtype)
        datas = [data for rtype, data in entries if rtype == wanted]
        if datas:
            response.answer.append(dns.rrset.from_text_list(name + ".", TTL, "IN", wanted, datas))
        break
    return response


def serve(listen: list[str], records: dict[str, list[tuple[str, str]]], log: Path, tls: ssl.SSLContext | None) -> None:
    """UDP and TCP on port 53 of each address (with `tls`, DNS over TLS on 853 too), until killed; one log line
    per query."""
    sel = selectors.DefaultSelector()
    out = log.open("a", buffering=1)
    lock = threading.Lock()

    def note(query: dns.message.Message, transport: str, peer: Any) -> None:
        q = query.question[0]
        line = {"name": q.name.to_text(omit_final_dot=True).lower(), "type": dns.rdatatype.to_text(q.rdtype),
                "transport": transport, "from": peer[0], "ts": time.time()}  # fmt: skip
        with lock:
            out.write(json.dumps(line) + "\n")

    def answer(wire: bytes, transport: str, peer: Any) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        note(query, transport, peer)
        response = respond(query, records)
        limit = 65535 if transport == "tcp" else max(512, query.payload if query.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            short = dns.message.make_response(query)
            short.flags |= dns.flags.TC | dns.flags.AA
            return short.to_wire()

    def recv_exactly(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n and (chunk := conn.recv(n - len(data))):
            data += chunk
        return data

    def tcp_client(conn: socket.socket, peer: Any, transport: str) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if tls is not None and transport == "tls":
                    conn = tls.wrap_socket(conn, server_side=True)
                while len(head := recv_exactly(conn, 2)) == 2:
                    wire = recv_exactly(conn, struct.unpack("!H", head)[0])
                    reply = answer(wire, transport, peer)
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return

    services = [(socket.SOCK_DGRAM, 53, "udp"), (socket.SOCK_STREAM, 53, "tcp")]
    services += [(socket.SOCK_STREAM, 853, "tls")] if tls is not None else []
    for address in listen:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for kind, port, transport in services:
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(64)
            sel.register(sock, selectors.EVENT_READ, transport)
    print("geodns ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "udp":
                wire, peer = sock.recvfrom(65535)
                reply = answer(wire, "udp", peer)
                if reply is not None:
                    sock.sendto(reply, peer)
            else:
                conn, peer = sock.accept()
                threading.Thread(target=tcp_client, args=(conn, peer, key.data), daemon=True).start()


class GeoDns:
    """Both servers in a lab, as a context manager; `queries(server)` reads what each one was asked."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen[str]] = []
        self.logs = {server: lab.state_dir / f"geodns-{server}.jsonl" for server in SERVERS}
        #: The servers' self-signed certificates, one file: what a resolver must trust for DNS over TLS.
        self.ca_file = lab.state_dir / "geodns-ca.pem"

    def _certificate(self, server: str, v4: str, v6: str) -> list[str]:
        """A self-signed certificate for TLS_NAMES[server] and both addresses; the server's --tls options."""
        cert, key = (self.lab.state_dir / f"geodns-{server}.{ext}" for ext in ("pem", "key"))
        san = f"subjectAltName=DNS:{TLS_NAMES[server]},IP:{v4},IP:{v6}"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", f"/CN={TLS_NAMES[server]}", "-addext", san,
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
        with self.ca_file.open("a") as ca:
            ca.write(cert.read_text())
        return ["--tls-cert", str(cert), "--tls-key", str(key)]

    def __enter__(self) -> GeoDns:
        try:
            self.ca_file.write_text("")
            for server, (role, v4, v6) in SERVERS.items():
                self.logs[server].write_text("")
                argv = [sys.executable, "-m", "splittun.lab.geodns", "--listen", v4, "--listen", v6,
                        "--index", str(ANSWER_INDEX[server]), "--log", str(self.logs[server]),
                        *self._certificate(server, v4, v6)]  # fmt: skip
                proc = self.lab.popen(role, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                self.procs.append(proc)
                assert proc.stdout is not None
                ready = proc.stdout.readline().strip()
                if ready != "geodns ready":
                    raise RuntimeError(f"the {server} DNS server did not start: {ready}{proc.stdout.read()[:500]}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def queries(self, server: str, name: str | None = None) -> list[dict[str, Any]]:
        """What `server` ("isp" or "vpn") was asked so far (for `name` only, when given)."""
        path = self.logs[server]
        lines = path.read_text().splitlines() if path.exists() else []
        found = [json.loads(line) for line in lines if line.strip()]
        return [q for q in found if name is None or q["name"] == name]

    @staticmethod
    def address(server: str, family: int) -> str:
        """The address `server` answers GEO_NAME with, for IPv4 or IPv6."""
        return (T.SERVER_V4 if family == 4 else T.SERVER_V6)[ANSWER_INDEX[server]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splittun.lab.geodns", description=__doc__)
    ap.add_argument("--listen", action="append", required=True, help="address to answer on (port 53, UDP and TCP)")
    ap.add_argument("--index", type=int, default=0, help="which whoami server the names resolve to (0 or 1)")
    ap.add_argument("--log", type=Path, required=True, help="where every query is logged (JSON lines)")
    ap.add_argument("--tls-cert", type=Path, help="also DNS over TLS on port 853 with this certificate")
    ap.add_argument("--tls-key", type=Path)
    args = ap.parse_args(argv)
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    serve(args.listen, zone(args.index), args.log, tls)


if __name__ == "__main__":
    main()
