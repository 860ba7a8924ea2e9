"""Matching a policy snapshot against one connection: first matching rule wins, default keep.

The interceptor compiles each `policy.snapshot` it receives once (`CompiledPolicy(snapshot)`) and then
calls `match(flow, domain, process)` on its verdict path, so matching is precomputed sets, networks and
compiled patterns — no parsing per packet. The answer is a `RuleMatch`: split or keep, the rule that said
so, the rule's interface. The process is the one `ProcessInfo` every part of splittun uses; the facts app
rules look at (`AppFacts`) are derived from it here, in one place.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from messages import PolicyRule, PolicySnapshot, ProcessInfo
from messages.flows import FiveTuple, IpProtocol

from .rules import classify_dest, has_glob, normalize_domain


@dataclass(frozen=True, slots=True)
class AppFacts:
    """What app rules look at, derived from a `ProcessInfo` (`from_process`). `ancestors` are (exe, name)
    pairs from the parent upward; exe is "" where it was unreadable."""

    pid: int = -1
    exe: str = ""
    name: str = ""
    uid: int = -1
    ancestors: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_process(cls, process: ProcessInfo | None) -> AppFacts:
        """The one place a process becomes app facts (no process: facts no app rule matches)."""
        if process is None:
            return NO_APP
        names = process.ancestor_names
        ancestors = []
        for i, entry in enumerate(process.ancestors):
            name = names[i] if i < len(names) else ""
            ancestors.append((entry if entry != name else "", name))  # entry == name: the exe was unreadable
        return cls(pid=process.pid, exe=process.exe, name=process.name, uid=process.uid, ancestors=tuple(ancestors))


NO_APP = AppFacts()


@dataclass(frozen=True, slots=True)
class _Facts:
    """One connection as the compiled checks see it."""

    flow: FiveTuple
    names: tuple[str, ...]  # the domain's names: the one looked up, then its CNAME targets; () when unknown
    app: AppFacts


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """The policy's answer for one connection: split it or keep it (in the VPN), and which rule said so."""

    split: bool
    rule_id: str = ""  # "" = no rule matched (the default: keep)
    interface: str = ""  # the rule's own interface; "" = the global choice


KEEP_BY_DEFAULT = RuleMatch(split=False)

_Check = Callable[[_Facts], bool]


def _domain_check(pattern: str) -> _Check:
    pattern = normalize_domain(pattern)
    if pattern.startswith("."):  # Portmaster: .example.com = the domain and all its subdomains
        base = pattern[1:]
        suffix = pattern
        return lambda f: any(name == base or name.endswith(suffix) for name in f.names)
    if has_glob(pattern):
        regex = re.compile(fnmatch.translate(pattern))
        return lambda f: any(regex.match(name) is not None for name in f.names)
    return lambda f: pattern in f.names


def _ip_check(dest: str, kind: str) -> _Check:
    network = ipaddress.ip_network(dest, strict=False)

    def check(f: _Facts) -> bool:
        try:
            ip = ipaddress.ip_address(f.flow.dst_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == network.version and ip in network

    return check


def _app_matches(path_pattern: str, name: str, exe: str, comm: str) -> bool:
    if path_pattern:
        if not exe:
            return False
        if has_glob(path_pattern):
            if not fnmatch.fnmatchcase(exe, path_pattern):
                return False
        elif exe != path_pattern:
            return False
    if name:
        base = exe.rsplit("/", 1)[-1] if exe else ""
        # /proc/PID/comm is cut at 15 characters; the executable's basename is not.
        if name not in (comm, base) and name[:15] != comm:
            return False
    return True


def compile_rule(rule: PolicyRule) -> tuple[_Check, ...]:
    if rule.preset:  # never expanded (core/presets.expand): it must not match everything
        return (lambda f: False,)
    checks: list[_Check] = []
    if rule.proto:
        number = IpProtocol[rule.proto.upper()]  # validated: tcp or udp
        checks.append(lambda f: f.flow.protocol == number)
    if rule.port_lo:
        lo, hi = rule.port_lo, rule.port_hi
        checks.append(lambda f: lo <= f.flow.dst_port <= hi)
    kind = classify_dest(rule.dest)
    if kind == "domain":
        checks.append(_domain_check(rule.dest))
    elif kind in ("ip", "cidr"):
        checks.append(_ip_check(rule.dest, kind))
    if rule.uid >= 0:
        uid = rule.uid
        checks.append(lambda f: f.app.uid == uid)
    if rule.app_path or rule.app_name:
        path, name, children = rule.app_path, rule.app_name, rule.children

        def app_check(f: _Facts) -> bool:
            if _app_matches(path, name, f.app.exe, f.app.name):
                return True
            return children and any(_app_matches(path, name, exe, comm) for exe, comm in f.app.ancestors)

        checks.append(app_check)
    return tuple(checks)


class CompiledPolicy:
    """A policy snapshot ready for the verdict path."""

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self.version = snapshot.version
        self.enabled = snapshot.enabled
        self._rules = [(rule, compile_rule(rule)) for rule in snapshot.rules]
        self.uses_domains = any(classify_dest(rule.dest) == "domain" for rule in snapshot.rules)
        self.uses_apps = any(rule.app_path or rule.app_name or rule.uid >= 0 for rule in snapshot.rules)
        self._last_app: tuple[ProcessInfo | None, AppFacts] = (None, NO_APP)

    def _app(self, process: ProcessInfo | None) -> AppFacts:
        """The process's app facts; the last ones are kept (an app's next connections have the same process)."""
        if process is None or not self.uses_apps:
            return NO_APP
        last, facts = self._last_app
        if last is not process:
            facts = AppFacts.from_process(process)
            self._last_app = (process, facts)
        return facts

    def match(self, flow: FiveTuple, domain: str = "", process: ProcessInfo | None = None) -> RuleMatch:
        """The first rule matching the connection (its 5-tuple, the name its destination was looked up by,
        its process when known), or the default: keep. A domain learned through a CNAME chain is the asked
        name followed by the chain's targets, space-separated: a domain rule matches any of them."""
        if not self.enabled:
            return KEEP_BY_DEFAULT
        facts = _Facts(flow, tuple(domain.split()), self._app(process))
        for rule, checks in self._rules:
            if all(check(facts) for check in checks):
                return RuleMatch(split=rule.action == "split", rule_id=rule.id, interface=rule.interface)
        return KEEP_BY_DEFAULT


EMPTY_POLICY = CompiledPolicy(PolicySnapshot(version=0, ts=0.0, enabled=False))
