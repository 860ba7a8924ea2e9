"""A lab app that looks a name up and then connects to the address it got, as a browser does.

It names itself (``--comm``: the process name app rules match, as /proc/PID/comm shows it) before its
first packet, asks ``--server`` for ``--name`` over UDP (or ``--tcp``), follows a truncated UDP answer
over TCP like a stub resolver, and with ``--fetch`` fetches http://ADDRESS/ from the lab's whoami server
at once: the address the server saw says which path the connection took. Prints one JSON object:
``{"addresses": [...], "seen": "...", "transport": "udp"|"tcp"}``; exit 1 and ``error: …`` on failure.

    python -m splittun.lab.dnsapp --comm splitapp --server 192.0.2.65 --name geo.example.net --family 4 --fetch
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdatatype

from splittun.lab.client import ProbeError, probe

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    """Rename this process (/proc/self/comm, at most 15 bytes): what `rules add --name` matches."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def lookup(server: str, name: str, family: int, tcp: bool, timeout: float = 5.0) -> tuple[list[str], str]:
    """The addresses `server` gives for `name` (A for family 4, AAAA for 6), and the transport that got them."""
    query = dns.message.make_query(name, "AAAA" if family == 6 else "A")
    transport = "tcp" if tcp else "udp"
    if tcp:
        answer = dns.query.tcp(query, server, timeout=timeout)
    else:
        answer = dns.query.udp(query, server, timeout=timeout)
        if answer.flags & dns.flags.TC:
            answer, transport = dns.query.tcp(query, server, timeout=timeout), "tcp"
    wanted = dns.rdatatype.AAAA if family == 6 else dns.rdatatype.A
    return [rd.address for rrset in answer.answer if rrset.rdtype == wanted for rd in rrset], transport


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splittun.lab.dnsapp", description=__doc__)
    ap.add_argument("--comm", default="", help="process name to take before the first packet")
    ap.add_argument("--server", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--tcp", action="store_true", help="ask over TCP from the start")
    ap.add_argument("--fetch", action="store_true", help="then fetch http://ADDRESS/ (whoami) and print what it saw")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        if args.comm:
            set_comm(args.comm)
        addresses, transport = lookup(args.server, args.name, args.family, args.tcp, args.timeout)
        seen = ""
        if args.fetch:
            if not addresses:
                raise ProbeError(f"no address for {args.name}")
            seen = probe(proto="tcp", family=args.family, target=addresses[0], timeout=args.timeout)
    except (dns.exception.DNSException, OSError, ProbeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"addresses": addresses, "seen": seen, "transport": transport}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
