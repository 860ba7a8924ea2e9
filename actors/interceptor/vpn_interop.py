"""Living next to wg-quick's anti-spoofing rule (nftables).

wg-quick adds, in its own table, `iifname != <wg> ip daddr <tunnel address> fib saddr type != local drop`
(raw prerouting). A split connection's replies come back from the local proxy on `lo`, and once
conntrack has undone the DNAT they are addressed to the tunnel address from the original (non-local)
peer: that rule drops them, and every split connection of an app that sent from the tunnel address
hangs. The fix IVPN's notes describe: an exemption `iifname "lo" <daddr> accept` right before each such
drop rule, in the same chain. Only local processes can send on `lo`, so nothing spoofed gets through.

Exemptions carry our comment, are re-checked whenever the interceptor checks for other software's
changes (wg-quick recreates its table on every reconnect; every IVPN state change runs that check) and are
removed with our rules. Planning is pure (nft's JSON in, nft commands out); `NftInterop` runs them.

Where nft is missing wg-quick adds the same rule with iptables instead: raw PREROUTING
`! -i <wg> -d <tunnel address> -m addrtype ! --src-type LOCAL -j DROP`. `plan_raw_exemptions` plans our
`-i lo -d <address> -j ACCEPT` right before each such rule, and drops exemptions whose drop rule is gone
(wg-quick down), from `iptables-save -t raw` lines; the firewall applies them with iptables-restore.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COMMENT = "splittun: proxied split replies on lo"

Runner = Callable[..., subprocess.CompletedProcess[str]]


@dataclass(frozen=True, slots=True)
class AntiSpoof:
    """A drop rule like wg-quick's, and whether our exemption already sits before it."""

    family: str  # nft family: ip | ip6 | inet
    table: str
    chain: str
    handle: int
    daddr_family: str  # ip | ip6 (payload protocol of the daddr match)
    daddr: str
    exempted: bool


def _rules_by_chain(ruleset: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    chains: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict):
            chains.setdefault((rule.get("family", ""), rule.get("table", ""), rule.get("chain", "")), []).append(rule)
    return chains


def _antispoof_daddr(rule: dict[str, Any]) -> tuple[str, str] | None:
    """(payload protocol, address) when the rule drops packets to one address not arriving on some iface."""
    exprs = rule.get("expr") or []
    drops = any(isinstance(e, dict) and "drop" in e for e in exprs)
    daddr = iif_not = None
    for e in exprs:
        match = e.get("match") if isinstance(e, dict) else None
        if not isinstance(match, dict):
            continue
        left, op, right = match.get("left") or {}, match.get("op"), match.get("right")
        payload = left.get("payload") if isinstance(left, dict) else None
        if isinstance(payload, dict) and payload.get("field") == "daddr" and op == "==" and isinstance(right, str):
            daddr = (payload.get("protocol", ""), right)
        meta = left.get("meta") if isinstance(left, dict) else None
        if isinstance(meta, dict) and meta.get("key") == "iifname" and op == "!=":
            iif_not = right
    return daddr if drops and daddr and iif_not and iif_not != "lo" else None


def find_antispoof(ruleset: dict[str, Any]) -> list[AntiSpoof]:
    """Every wg-quick-like anti-spoofing drop rule, in chain order, with its exemption state."""
    found = []
    for (family, table, chain), rules in _rules_by_chain(ruleset).items():
        exempted: set[str] = set()
        for rule in rules:
            if rule.get("comment") == COMMENT:
                hit = _exemption_daddr(rule)
                if hit:
                    exempted.add(hit)
                continue
            target = _antispoof_daddr(rule)
            if target is not None:
                proto, address = target
                found.append(
                    AntiSpoof(family, table, chain, int(rule.get("handle", 0)), proto, address, address in exempted)
                )
    return found


def _exemption_daddr(rule: dict[str, Any]) -> str:
    for e in rule.get("expr") or []:
        match = e.get("match") if isinstance(e, dict) else None
        payload = (match or {}).get("left", {}).get("payload") if isinstance(match, dict) else None
        if isinstance(payload, dict) and payload.get("field") == "daddr":
            return str(match.get("right"))
    return ""


def our_exemptions(ruleset: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """(family, table, chain, handle) of every rule carrying our comment."""
    return [
        (family, table, chain, int(rule.get("handle", 0)))
        for (family, table, chain), rules in _rules_by_chain(ruleset).items()
        for rule in rules
        if rule.get("comment") == COMMENT
    ]


def plan_exemptions(ruleset: dict[str, Any]) -> list[str]:
    """nft commands adding the missing exemptions, each right before its drop rule."""
    return [
        f'insert rule {a.family} {a.table} {a.chain} position {a.handle} iifname "lo" '
        f'{a.daddr_family} daddr {a.daddr} accept comment "{COMMENT}"'
        for a in find_antispoof(ruleset)
        if not a.exempted
    ]


def plan_removal(ruleset: dict[str, Any]) -> list[str]:
    return [f"delete rule {f} {t} {c} handle {h}" for f, t, c, h in our_exemptions(ruleset)]


class NftInterop:
    """Applies the plans with the nft tool; a machine without nft has no such rules to live with."""

    def __init__(self, run: Runner = subprocess.run) -> None:
        self.run = run
        self.available = shutil.which("nft") is not None or run is not subprocess.run

    def ruleset(self) -> dict[str, Any]:
        done = self.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            return {}
        try:
            return json.loads(done.stdout or "{}")
        except json.JSONDecodeError:
            return {}

    def _apply(self, commands: list[str]) -> list[str]:
        if commands:
            script = "\n".join(commands) + "\n"
            done = self.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                raise RuntimeError(f"nft: {(done.stderr or done.stdout).strip()[:300]}")
        return commands

    def ensure(self) -> list[str]:
        """Add missing exemptions; returns the commands run ([] = nothing to do)."""
        return self._apply(plan_exemptions(self.ruleset())) if self.available else []

    def remove(self) -> list[str]:
        return self._apply(plan_removal(self.ruleset())) if self.available else []


# --- the iptables fallback (raw PREROUTING) ---------------------------------------------------------------

RAW_CHAIN = "PREROUTING"
_RAW_DROP = re.compile(r"^-A PREROUTING (?=.*\s! -i (?!lo\s)\S+)(?=.*\s-m addrtype ! --src-type LOCAL)(?=.*\s-j DROP$)")
_DADDR = re.compile(r"\s-d (\S+)")


def _raw_exemption(address: str) -> str:
    return f'-d {address} -i lo -m comment --comment "{COMMENT}" -j ACCEPT'


def plan_raw_exemptions(prerouting: list[str]) -> list[str]:
    """iptables-restore lines for the raw table, given its `-A PREROUTING …` rules in order: an exemption right
    before every wg-quick-style drop rule that lacks one, and away with ours whose drop rule is gone."""
    lines, inserted, exempted, drops = [], 0, set(), set()
    for position, rule in enumerate(prerouting, start=1):
        daddr = _DADDR.search(rule)
        if COMMENT in rule:
            if daddr:
                exempted.add(daddr.group(1))
            continue
        if daddr and _RAW_DROP.match(rule):
            drops.add(daddr.group(1))
            if daddr.group(1) not in exempted:
                lines.append(f"-I {RAW_CHAIN} {position + inserted} {_raw_exemption(daddr.group(1))}")
                exempted.add(daddr.group(1))
                inserted += 1
    for rule in prerouting:
        daddr = _DADDR.search(rule)
        if COMMENT in rule and (not daddr or daddr.group(1) not in drops):
            lines.append("-D" + rule[2:])
    return lines


def plan_raw_removal(prerouting: list[str]) -> list[str]:
    """iptables-restore lines removing every exemption of ours from raw PREROUTING."""
    return ["-D" + rule[2:] for rule in prerouting if COMMENT in rule]
