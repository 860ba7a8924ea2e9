"""The Linux firewall rules of the interceptor: install, remove, keep our jumps on top, clean up.

This kernel queues packets to user space only through the xt NFQUEUE target, so the rules are
iptables-legacy / ip6tables-legacy. The full layout, and why each rule is there, is in README.md.
In short, per IP version:

- mangle `SPLITTUN-INGEST-OUTPUT` (from OUTPUT): leave packets marked by their socket alone (our
  proxies' SPLIT_EGRESS, other VPN software); skip loopback; a connmark holding our permanent verdict
  goes (`-g`) to `SPLITTUN-RESTORE-OUTPUT`, which restores it; queue only the first packet (ctstate NEW)
  of a connection nobody decided yet.
- mangle `SPLITTUN-INGEST-INPUT` (from INPUT): the same through `SPLITTUN-RESTORE-INPUT`; queue DNS
  answers (learn names).
- filter `SPLITTUN-FILTER` (from OUTPUT and INPUT): act on the mark and save permanent ones to the
  connmark. Every packet walks these chains, so the verdicts long connections carry are tested first.
  Mark 0 (undecided: queue bypassed because no interceptor runs) simply RETURNs — unlike Portmaster
  we never drop it, so failure means "unsplit, through the VPN", never "no network".
- nat `SPLITTUN-REDIRECT` (from nat OUTPUT): mark 1719 → DNAT to the split proxies, mark 1799 → DNAT to
  the resolver (TCP only on SYN; with the kernel data path split TCP is not DNAT-ed: it is re-routed by its
  mark, kernel/routing.py).
- nat `SPLITTUN-SNAT` (from nat POSTROUTING): a split TCP connection leaving the host (the kernel path)
  gets the source address of the interface it leaves through.

Every change is one `iptables-legacy-restore --noflush` per table: libiptc applies all lines to a copy
of the table and the kernel swaps the whole table at once, so there is never a moment without our
rules (when moving a displaced jump: delete the old one and insert the new one in the same commit).
Install is idempotent (it first deletes whatever of ours is there, in the same commit) and `remove`
needs no state: it finds our chains by their SPLITTUN- prefix, so it also works after a crash.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from messages.marks import (
    MAX_INTERCEPTOR_WORKERS,
    NAMESERVER_PORT,
    PROXY_IPV4,
    PROXY_IPV6,
    SPLIT_PROXY_PORT,
    VERDICT_MASK,
    Mark,
    Queue,
)

from .vpn_interop import RAW_CHAIN, NftInterop, plan_raw_exemptions, plan_raw_removal

PREFIX = "SPLITTUN-"
INGEST_OUT = "SPLITTUN-INGEST-OUTPUT"
INGEST_IN = "SPLITTUN-INGEST-INPUT"
FILTER = "SPLITTUN-FILTER"
REDIRECT = "SPLITTUN-REDIRECT"
EGRESS_REPLIES = "SPLITTUN-EGRESS-REPLIES"
SNAT = "SPLITTUN-SNAT"
#: Where a decided connection's packets go (`-g`) once their connmark holds our verdict: restore it, and
#: the few tests that still apply to them.
RESTORE_OUT = "SPLITTUN-RESTORE-OUTPUT"
RESTORE_IN = "SPLITTUN-RESTORE-INPUT"
DATA_PATHS = ("proxy", "kernel")

#: (table, built-in chain, our chain): the jump rules we keep at position 1.
JUMPS: tuple[tuple[str, str, str], ...] = (
    ("mangle", "OUTPUT", INGEST_OUT),
    ("mangle", "INPUT", INGEST_IN),
    ("mangle", "PREROUTING", EGRESS_REPLIES),
    ("filter", "OUTPUT", FILTER),
    ("filter", "INPUT", FILTER),
    ("nat", "OUTPUT", REDIRECT),
    ("nat", "POSTROUTING", SNAT),
)
TABLES = ("mangle", "filter", "nat")
#: Install order: what acts on marks first, the queueing last; removal the other way round.
INSTALL_ORDER = ("nat", "filter", "mangle")
REMOVE_ORDER = ("mangle", "filter", "nat")

#: Connmark values we restore and save: every permanent verdict mark we set.
RESTORED_MARKS = (
    Mark.ACCEPT_FINAL,
    Mark.ACCEPT_ALWAYS,
    Mark.BLOCK_ALWAYS,
    Mark.DROP_ALWAYS,
    Mark.REROUTE_TO_TUNNEL,
    Mark.REROUTE_TO_SPLIT_TUN,
    Mark.REROUTE_TO_NAMESERVER,
)
#: The same marks in the order our chains test them: the verdicts that long connections carry first (split,
#: tunnel, accept-always), the rare last. The tests are disjoint, so the order changes no verdict.
BY_FREQUENCY = (
    Mark.REROUTE_TO_SPLIT_TUN,
    Mark.REROUTE_TO_TUNNEL,
    Mark.ACCEPT_ALWAYS,
    Mark.ACCEPT_FINAL,
    Mark.REROUTE_TO_NAMESERVER,
    Mark.BLOCK_ALWAYS,
    Mark.DROP_ALWAYS,
)
#: The marks SPLITTUN-FILTER acts on, in the order it tests them (the proxies' upstream 1720 carries every
#: packet of a proxied connection; 1700-1702 only single queued packets).
FILTER_ORDER = (
    Mark.REROUTE_TO_SPLIT_TUN,
    Mark.SPLIT_EGRESS,
    Mark.REROUTE_TO_TUNNEL,
    Mark.ACCEPT_ALWAYS,
    Mark.ACCEPT_FINAL,
    Mark.REROUTE_TO_NAMESERVER,
    Mark.ACCEPT,
    Mark.BLOCK_ALWAYS,
    Mark.DROP_ALWAYS,
    Mark.BLOCK,
    Mark.DROP,
)
#: Marks that carry more than the verdict above VERDICT_MASK (an interface index, a DNS path): matched
#: under the mask and restored whole from the connmark.
MASKED_MARKS = frozenset({Mark.REROUTE_TO_SPLIT_TUN, Mark.REROUTE_TO_NAMESERVER})
#: Conntrack entries carrying these marks (under VERDICT_MASK: a split mark also holds an interface index)
#: are ours: cleanup deletes them.
CONNTRACK_MARKS = frozenset(int(m) for m in (*RESTORED_MARKS, Mark.SPLIT_EGRESS))
#: The split mark, as the rules match it: 1719 with any interface index above the verdict bits.
SPLIT_MATCH = f"{int(Mark.REROUTE_TO_SPLIT_TUN)}/{VERDICT_MASK:#x}"
NAMESERVER_MATCH = f"{int(Mark.REROUTE_TO_NAMESERVER)}/{VERDICT_MASK:#x}"


def _match(mark: Mark) -> str:
    return f"{int(mark)}/{VERDICT_MASK:#x}" if mark in MASKED_MARKS else str(int(mark))


MAX_WORKERS = MAX_INTERCEPTOR_WORKERS

FAMILIES = (4, 6)


class FirewallError(RuntimeError):
    """A rule change failed; the message carries the tool's own error line."""


def queue_spec(base: int, workers: int) -> str:
    """NFQUEUE target options: one queue per worker, flows spread by the kernel's hash."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"interceptor workers must be 1-{MAX_WORKERS}, got {workers}")
    queue = f"--queue-num {base}" if workers == 1 else f"--queue-balance {base}:{base + workers - 1}"
    return f"{queue} --queue-bypass"


def worker_queues(index: int) -> dict[str, int]:
    """The queues worker `index` binds: its slot in each of the four queue groups."""
    return {
        "v4out": Queue.IPV4_OUT + index,
        "v4in": Queue.IPV4_IN + index,
        "v6out": Queue.IPV6_OUT + index,
        "v6in": Queue.IPV6_IN + index,
    }


VALID_MARK_NOTE = "splittun: src_valid_mark was "
ACCT_NOTE = "splittun: nf_conntrack_acct was "


def render(
    family: int,
    workers: int = 1,
    valid_mark_was: int | None = None,
    data_path: str = "proxy",
    acct_was: int | None = None,
) -> dict[str, list[str]]:
    """Our chains' rules per table, in iptables-restore syntax (`-A CHAIN …`).

    `valid_mark_was` / `acct_was`: we set net.ipv4.conf.all.src_valid_mark / net.netfilter.
    nf_conntrack_acct and this was the value before; it is kept as a comment rule, so whoever removes our
    rules (also after a crash, in the right namespace) puts it back.
    `data_path`: "proxy" DNATs split TCP to the TCP proxy; "kernel" lets it leave by its mark (re-routed
    by KernelPathRouting, source-NATed here) and accepts it for good, so a kill switch's OUTPUT rules
    added later cannot drop it. Split UDP goes to the UDP proxy either way (it checks every datagram's
    socket: a kernel-routed UDP flow could carry another app's datagrams after a port is reused)."""
    if data_path not in DATA_PATHS:
        raise ValueError(f"data path must be one of {', '.join(DATA_PATHS)}, got {data_path!r}")
    kernel = data_path == "kernel"
    out_queue = queue_spec(Queue.IPV4_OUT if family == 4 else Queue.IPV6_OUT, workers)
    in_queue = queue_spec(Queue.IPV4_IN if family == 4 else Queue.IPV6_IN, workers)
    reject = "icmp-admin-prohibited" if family == 4 else "icmp6-adm-prohibited"
    proxy = f"{PROXY_IPV4}:{SPLIT_PROXY_PORT}" if family == 4 else f"[{PROXY_IPV6}]:{SPLIT_PROXY_PORT}"
    resolver = f"{PROXY_IPV4}:{NAMESERVER_PORT}" if family == 4 else f"[{PROXY_IPV6}]:{NAMESERVER_PORT}"
    in_queue_tail = [
        f"-p udp -m conntrack --ctdir REPLY --ctorigdstport 53 -j NFQUEUE {in_queue}",  # DNS answers: their names
        # A UDP flow starting from outside: a real inbound flow (accepted for good), or a late answer to a flow
        # whose entry was just deleted, which would turn that flow around (dropped).
        f"-p udp -m conntrack --ctstate NEW -j NFQUEUE {in_queue}",
    ]
    in_queue_rules = [f"-A {INGEST_IN} {r}" for r in in_queue_tail]  # no verdict of ours in the connmark
    in_queue_rules_restored = [f"-A {RESTORE_IN} {r}" for r in in_queue_tail]
    # Per packet, every packet of every connection walks these chains: a decided connection's packets find
    # their verdict with one connmark test (most common verdicts first) and leave through a short shared
    # chain (`-g`: its end returns from the calling chain too), instead of seven restore rules in a row.
    ours = [f"-m connmark --mark {_match(m)}" for m in BY_FREQUENCY]
    mangle = [
        f"-A {INGEST_OUT} -m mark ! --mark 0 -j RETURN",  # socket marks (SPLIT_EGRESS, VPN software): not ours to touch
        f"-A {INGEST_OUT} -o lo -j RETURN",  # localhost is never split
        *(f"-A {INGEST_OUT} {m} -g {RESTORE_OUT}" for m in ours),  # our verdict, from the connmark
        f"-A {INGEST_OUT} -m connmark ! --mark 0 -j RETURN",  # another program's connmark: its connection
        f"-A {INGEST_OUT} -m conntrack --ctstate NEW -j NFQUEUE {out_queue}",
        # The whole connmark back as the mark (a split mark's interface index, a DNS path included).
        f"-A {RESTORE_OUT} -j CONNMARK --restore-mark",
        # A SYN on an entry that already holds our verdict: a retransmission, or a new connection reopening
        # an old entry (conntrack reuses one in CLOSE state, mark and NAT binding included). The interceptor
        # tells them apart by the socket; a verdict never passes to another connection unseen. Anything else
        # was decided earlier: never queued again.
        f"-A {RESTORE_OUT} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE {out_queue}",
        f"-A {INGEST_IN} -m mark ! --mark 0 -j RETURN",
        *(f"-A {INGEST_IN} {m} -g {RESTORE_IN}" for m in ours),
        *in_queue_rules,
        f"-A {RESTORE_IN} -j CONNMARK --restore-mark",
        f"-A {RESTORE_IN} ! -p udp -j RETURN",  # only UDP is queued inbound
        # DNS answers the resolver already learned from: to its own upstream sockets (accept-final) and the ones
        # it relays to apps (nameserver mark). Only the others are queued for their names.
        f"-A {RESTORE_IN} -m connmark --mark {int(Mark.ACCEPT_FINAL)} -j RETURN",
        f"-A {RESTORE_IN} -m connmark --mark {NAMESERVER_MATCH} -j RETURN",
        *in_queue_rules_restored,
        # Replies to the proxies' upstream get their mark back before routing: with strict rp_filter (and
        # src_valid_mark) the reverse-path check then finds the split route, not the VPN default.
        f"-A {EGRESS_REPLIES} -m connmark --mark {int(Mark.SPLIT_EGRESS)} -j MARK --set-mark {int(Mark.SPLIT_EGRESS)}",
        # The same for replies to kernel-path split connections (their mark holds the interface index).
        f"-A {EGRESS_REPLIES} -p tcp -m connmark --mark {SPLIT_MATCH} -j CONNMARK --restore-mark",
    ]
    if family == 4 and valid_mark_was is not None:
        mangle.append(f'-A {EGRESS_REPLIES} -m comment --comment "{VALID_MARK_NOTE}{valid_mark_was}" -j RETURN')
    if family == 4 and acct_was is not None:
        mangle.append(f'-A {EGRESS_REPLIES} -m comment --comment "{ACCT_NOTE}{acct_was}" -j RETURN')
    final = {
        Mark.ACCEPT_FINAL: "ACCEPT",
        Mark.ACCEPT_ALWAYS: "RETURN",
        Mark.BLOCK_ALWAYS: f"REJECT --reject-with {reject}",
        Mark.DROP_ALWAYS: "DROP",
        Mark.REROUTE_TO_TUNNEL: "RETURN",
        Mark.REROUTE_TO_SPLIT_TUN: "ACCEPT" if kernel else "RETURN",
        Mark.REROUTE_TO_NAMESERVER: "RETURN",
        Mark.SPLIT_EGRESS: "ACCEPT",  # proxies' upstream: accept-final; saved so its replies can be marked
    }
    once = {Mark.ACCEPT: "RETURN", Mark.BLOCK: f"REJECT --reject-with {reject}", Mark.DROP: "DROP"}  # not saved
    # Each mark is tested only by its own rules, so their order changes no verdict: the marks every packet of a
    # long connection carries come first, the per-packet verdicts of queued packets last. The save is a no-op
    # write in the kernel when the connmark already holds the mark.
    filt = [f"-A {FILTER} -m mark --mark 0 -j RETURN"]  # undecided: continue unsplit (through the VPN), never drop
    for mark in FILTER_ORDER:
        if mark in once:
            filt.append(f"-A {FILTER} -m mark --mark {int(mark)} -j {once[mark]}")
        else:
            filt.append(f"-A {FILTER} -m mark --mark {_match(mark)} -j CONNMARK --save-mark")
            filt.append(f"-A {FILTER} -m mark --mark {_match(mark)} -j {final[mark]}")
    tcp_to_proxy = f"-A {REDIRECT} -p tcp -m mark --mark {SPLIT_MATCH} -m tcp --syn -j DNAT --to-destination {proxy}"
    nat = [
        *([] if kernel else [tcp_to_proxy]),
        f"-A {REDIRECT} -p udp -m mark --mark {SPLIT_MATCH} -j DNAT --to-destination {proxy}",
        f"-A {REDIRECT} -p tcp -m mark --mark {NAMESERVER_MATCH} -m tcp --syn -j DNAT --to-destination {resolver}",
        f"-A {REDIRECT} -p udp -m mark --mark {NAMESERVER_MATCH} -j DNAT --to-destination {resolver}",
        # Only packets that leave the host: a split connection DNAT-ed to a proxy goes out lo.
        f"-A {SNAT} -p tcp -m mark --mark {SPLIT_MATCH} ! -o lo -j MASQUERADE",
    ]
    return {"mangle": mangle, "filter": filt, "nat": nat}


# --- reading and planning (pure) ----------------------------------------------------------------------


@dataclass
class SavedTable:
    """One table as `iptables-legacy-save -t TABLE` prints it."""

    name: str
    chains: list[str] = field(default_factory=list)  # every chain, built-ins first
    rules: list[str] = field(default_factory=list)  # `-A CHAIN …` lines, in order

    def chain_rules(self, chain: str) -> list[str]:
        head = f"-A {chain} "
        return [r for r in self.rules if r.startswith(head)]


def parse_save(text: str, table: str) -> SavedTable:
    saved = SavedTable(table)
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            current = line[1:]
        elif current != table or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            saved.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            saved.rules.append(line)
    return saved


def _target(rule: str) -> str:
    parts = rule.split()
    for i, part in enumerate(parts[:-1]):
        if part in ("-j", "-g"):
            return parts[i + 1]
    return ""


def _our_chains(saved: SavedTable) -> list[str]:
    return [c for c in saved.chains if c.startswith(PREFIX)]


def _references(saved: SavedTable) -> list[str]:
    """Rules in chains that are not ours which jump to one of ours."""
    return [r for r in saved.rules if _target(r).startswith(PREFIX) and not r.split()[1].startswith(PREFIX)]


def plan_remove(saved: SavedTable) -> list[str]:
    """Restore lines removing every trace of us from one table ([] = nothing of ours there)."""
    lines = ["-D " + r[3:] for r in _references(saved)]
    ours = _our_chains(saved)
    lines += [f"-F {c}" for c in ours]
    lines += [f"-X {c}" for c in ours]
    return lines


def valid_mark_note(saved: SavedTable, note: str = VALID_MARK_NOTE) -> int | None:
    """The sysctl value our rules say to restore (None: we did not change it); src_valid_mark by default,
    nf_conntrack_acct with `note=ACCT_NOTE`."""
    for rule in saved.chain_rules(EGRESS_REPLIES):
        found = re.search(re.escape(note) + r"(\d+)", rule)
        if found:
            return int(found.group(1))
    return None


def installed_data_path(saved: SavedTable) -> str | None:
    """The data path our nat rules in `saved` implement (None: none of ours there)."""
    if REDIRECT not in saved.chains:
        return None
    split = (
        f"--mark {int(Mark.REROUTE_TO_SPLIT_TUN)}/",
        f"--mark {int(Mark.REROUTE_TO_SPLIT_TUN):#x}/",
    )  # ours, -save's
    tcp_to_proxy = [r for r in saved.chain_rules(REDIRECT) if " -p tcp " in r and any(m in r for m in split)]
    return "proxy" if tcp_to_proxy else "kernel"


def plan_install(
    saved: SavedTable,
    family: int,
    workers: int,
    valid_mark_was: int | None = None,
    data_path: str = "proxy",
    acct_was: int | None = None,
) -> list[str]:
    """Restore lines that leave exactly our current rules in one table, whatever was there before.
    A sysctl note already there wins: it holds the value from before we first changed it."""
    kept = valid_mark_note(saved)
    kept_acct = valid_mark_note(saved, ACCT_NOTE)
    wanted = render(
        family,
        workers,
        kept if kept is not None else valid_mark_was,
        data_path,
        kept_acct if kept_acct is not None else acct_was,
    )[saved.name]
    chains = sorted({r.split()[1] for r in wanted})
    stale = [c for c in _our_chains(saved) if c not in chains]
    lines = [f":{c} - [0:0]" for c in chains]  # with --noflush: created, or flushed when present
    lines += ["-D " + r[3:] for r in _references(saved)]
    lines += [f"-F {c}" for c in stale] + [f"-X {c}" for c in stale]
    lines += wanted
    for table, builtin, chain in reversed(JUMPS):
        if table == saved.name:
            lines.append(f"-I {builtin} 1 -j {chain}")
    return lines


def jump_problems(saved: SavedTable) -> list[tuple[str, str]]:
    """(built-in chain, our chain) pairs whose jump is not exactly once, at position 1."""
    problems = []
    for table, builtin, chain in JUMPS:
        if table != saved.name:
            continue
        rules = saved.chain_rules(builtin)
        ours = [i for i, r in enumerate(rules) if r == f"-A {builtin} -j {chain}"]
        if ours != [0]:
            problems.append((builtin, chain))
    return problems


def plan_jump_fix(saved: SavedTable, problems: Sequence[tuple[str, str]]) -> list[str]:
    """Move displaced jumps back to the top. Deletes and inserts go in one commit: no unfiltered moment."""
    lines = []
    for builtin, chain in problems:
        jump = f"-A {builtin} -j {chain}"
        lines += [f"-D {builtin} -j {chain}"] * saved.chain_rules(builtin).count(jump)
        lines.append(f"-I {builtin} 1 -j {chain}")
    return lines


def restore_script(table: str, lines: Sequence[str]) -> str:
    return f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


# --- running the tools --------------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess[str]]


class Xtables:
    """iptables-legacy or ip6tables-legacy in the current network namespace."""

    def __init__(self, family: int, run: Runner = subprocess.run, proc_net: str = "/proc/net") -> None:
        self.family = family
        base = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        self.save_cmd = f"{base}-save"
        self.restore_cmd = f"{base}-restore"
        self.names_file = f"{proc_net}/{'ip' if family == 4 else 'ip6'}_tables_names"
        self.run = run

    def tables(self) -> set[str]:
        """Tables that exist in this namespace (saving one that does not would create it)."""
        try:
            with open(self.names_file) as f:
                return {line.strip() for line in f if line.strip()}
        except OSError:
            return set()

    def save(self, table: str) -> SavedTable:
        proc = self.run([self.save_cmd, "-t", table], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise FirewallError(f"{self.save_cmd} -t {table}: {(proc.stderr or proc.stdout).strip()[:300]}")
        return parse_save(proc.stdout, table)

    def restore(self, table: str, lines: Sequence[str]) -> None:
        script = restore_script(table, lines)
        proc = self.run(
            [self.restore_cmd, "-w", "5", "--noflush"], input=script, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise FirewallError(f"{self.restore_cmd} ({table}): {(proc.stderr or proc.stdout).strip()[:300]}")


def tools_missing() -> list[str]:
    return [t for t in ("iptables-legacy-restore", "ip6tables-legacy-restore") if shutil.which(t) is None]


class LinuxFirewall:
    """The interceptor's rules in this network namespace, both IP versions."""

    def __init__(
        self,
        workers: int = 1,
        xtables: dict[int, Xtables] | None = None,
        sysctl_root: str = "/proc/sys",
        interop: NftInterop | None = None,
    ) -> None:
        queue_spec(Queue.IPV4_OUT, workers)  # validates the worker count
        self.workers = workers
        self.xt = xtables or {family: Xtables(family) for family in FAMILIES}
        # wg-quick's anti-spoofing rule lives in nftables (vpn_interop.py); tests injecting fake xtables
        # get no real nft either.
        self.interop = interop if interop is not None else (NftInterop() if xtables is None else None)
        self.ipv4_conf = Path(sysctl_root) / "net/ipv4/conf"
        self.acct = Path(sysctl_root) / "net/netfilter/nf_conntrack_acct"
        self.valid_mark_was: int | None = None
        self.acct_was: int | None = None
        self.data_path = "proxy"  # until the policy says otherwise (set_data_path)

    # --- src_valid_mark: strict rp_filter must see the split egress mark on replies -----------------

    def _strict_rp_filter(self) -> bool:
        for path in self.ipv4_conf.glob("*/rp_filter"):
            with contextlib.suppress(OSError, ValueError):
                if int(path.read_text()) == 1:
                    return True
        return False

    def _valid_mark(self, value: int | None = None) -> int:
        path = self.ipv4_conf / "all/src_valid_mark"
        if value is not None:
            path.write_text(f"{value}\n")
        return int(path.read_text())

    def _prepare_valid_mark(self) -> None:
        """With strict rp_filter, replies to marked egress pass only when the check uses the mark.
        After a crash it is already 1 and the note from before stays in our rules (plan_install)."""
        try:
            if self._strict_rp_filter() and self._valid_mark() != 1:
                self.valid_mark_was = self._valid_mark()
                self._valid_mark(1)
        except OSError:
            pass  # no /proc/sys here: nothing to adapt

    def _sysctl(self, path: Path, value: int | None = None) -> int:
        if value is not None:
            path.write_text(f"{value}\n")
        return int(path.read_text())

    def _prepare_accounting(self) -> None:
        """Conntrack counts bytes and packets per connection while we run: the kernel path's split
        connections get their counters from their destroy event (no proxy counts them)."""
        try:
            if self._sysctl(self.acct) != 1:
                self.acct_was = self._sysctl(self.acct)
                self._sysctl(self.acct, 1)
        except (OSError, ValueError):
            pass  # no conntrack sysctls here: split connections on the kernel path show no counters

    def _apply(self, family: int, table: str, planner: Callable[[SavedTable], list[str]]) -> bool:
        """Plan from a fresh listing and apply; one retry when another program changed it meanwhile."""
        xt = self.xt[family]
        for attempt in range(2):
            lines = planner(xt.save(table))
            if not lines:
                return False
            try:
                xt.restore(table, lines)
                return True
            except FirewallError:
                if attempt:
                    raise
        return False

    def install(self) -> None:
        """Our rules, exactly once, jumps on top (replaces whatever of ours was there: crash leftovers). After
        a crash the data path the rules had is kept, so live and new split TCP keep their path meanwhile."""
        if "nat" in self.xt[4].tables():
            self.data_path = installed_data_path(self.xt[4].save("nat")) or self.data_path
        self._prepare_valid_mark()
        self._prepare_accounting()
        for family in FAMILIES:
            for table in INSTALL_ORDER:
                self._apply(family, table, lambda saved, f=family: self._plan_install(saved, f))
        self._ensure_interop()

    def set_data_path(self, data_path: str) -> None:
        """Switch split TCP between the proxy and the kernel path: each table is rewritten in one commit.
        Live connections keep their path (conntrack holds their NAT binding, the kernel tables stay)."""
        render(4, self.workers, data_path=data_path)  # validates before anything changes
        self.data_path = data_path
        for family in FAMILIES:
            for table in INSTALL_ORDER:
                self._apply(family, table, lambda saved, f=family: self._plan_install(saved, f))

    def _ensure_interop(self) -> list[str]:
        """Exemptions for other VPN software's rules that would drop split replies ([] = none needed): in
        nftables, and in the raw table where wg-quick used iptables (no nft)."""
        done = self._raw_interop(plan_raw_exemptions)
        if self.interop is None:
            return done
        try:
            return done + [f"nft {c.split(' comment ')[0]}" for c in self.interop.ensure()]
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            return [*done, f"nft exemption failed: {exc}"]

    def _raw_interop(self, planner: Callable[[list[str]], list[str]]) -> list[str]:
        """Apply a raw PREROUTING plan (vpn_interop.py) per IP version; "ip4 raw -I …" for what changed."""
        done = []
        for family in FAMILIES:
            xt = self.xt[family]
            if "raw" not in xt.tables():
                continue
            try:
                lines = planner(xt.save("raw").chain_rules(RAW_CHAIN))
                if lines:
                    xt.restore("raw", lines)
            except FirewallError as exc:
                done.append(f"ip{family} raw exemption failed: {exc}")
                continue
            done += [f"ip{family} raw {line.split(' -m comment ')[0]}" for line in lines]
        return done

    def _plan_install(self, saved: SavedTable, family: int) -> list[str]:
        return plan_install(saved, family, self.workers, self.valid_mark_was, self.data_path, self.acct_was)

    def remove(self) -> list[str]:
        """Remove every chain and jump of ours; returns "ip4 mangle"-style names of tables changed.
        A src_valid_mark we changed (the note in our rules says from what) is put back."""
        changed = []
        notes: list[int | None] = []
        acct_notes: list[int | None] = []

        def planner(saved: SavedTable) -> list[str]:  # the note comes from the listing the removal uses
            if saved.name == "mangle":
                notes.append(valid_mark_note(saved))
                acct_notes.append(valid_mark_note(saved, ACCT_NOTE))
            return plan_remove(saved)

        for family in FAMILIES:
            existing = self.xt[family].tables()
            for table in REMOVE_ORDER:
                if table in existing and self._apply(family, table, planner if family == 4 else plan_remove):
                    changed.append(f"ip{family} {table}")
        changed += self._raw_interop(plan_raw_removal)
        if self.interop is not None:
            with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
                changed += [f"nft {c}" for c in self.interop.remove()]
        restore_valid_mark = notes[-1] if notes else None
        if restore_valid_mark is not None:
            with contextlib.suppress(OSError):
                self._valid_mark(restore_valid_mark)
            changed.append(f"src_valid_mark={restore_valid_mark}")
        restore_acct = acct_notes[-1] if acct_notes else None
        if restore_acct is not None:
            with contextlib.suppress(OSError):
                self._sysctl(self.acct, restore_acct)
            changed.append(f"nf_conntrack_acct={restore_acct}")
        return changed

    def check_jump_order(self) -> list[str]:
        """Put displaced jumps back on top; returns what was moved ("ip4 mangle OUTPUT", …).

        A missing chain (another program flushed our table) is repaired by reinstalling that table.
        Other VPN software's rules that would drop split replies get their exemption back too (wg-quick
        recreates its table on every reconnect).
        """
        moved = []
        for family in FAMILIES:
            xt = self.xt[family]
            for table in TABLES:
                saved = xt.save(table)
                problems = jump_problems(saved)
                if not problems:
                    continue
                wanted = {r.split()[1] for r in render(family, self.workers)[table]}
                if not wanted <= set(saved.chains):
                    xt.restore(table, self._plan_install(saved, family))
                else:
                    xt.restore(table, plan_jump_fix(saved, problems))
                moved += [f"ip{family} {table} {builtin}" for builtin, _chain in problems]
        return moved + self._ensure_interop()
