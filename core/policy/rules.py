"""Rules: building and validating them, from CLI options or Portmaster endpoint-list strings.

A rule is a `messages.PolicyRule`: action (split or keep), app conditions (executable path or glob,
process name, uid, optionally the app's child processes), destination conditions (domain with
wildcards, IP or CIDR; protocol; port or range) and an optional interface. Every condition given must
hold; an empty one matches anything. Pure logic: no I/O, so it is tested with plain values.

Portmaster endpoint-list strings are accepted as they are written there:
    + .example.com tcp/443      split example.com and its subdomains, TCP port 443
    - 10.0.0.0/8                keep (in the VPN) everything to 10/8
    + * udp/3478-3479           split all UDP to ports 3478-3479
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from messages import PolicyRule
from messages.flows import IpProtocol

ACTIONS = ("split", "keep")
#: What a rule's protocol may be written as (name or number) → its name in the rule; "" = any.
PROTOCOLS = {
    **{text: p.name.lower() for p in (IpProtocol.TCP, IpProtocol.UDP) for text in (p.name.lower(), str(p.value))},
    "*": "",
    "": "",
}
_GLOB_CHARS = set("*?[")
#: What a preset may be called (core/presets: its file is NAME.json).
PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9_*?-]{1,63}(?<!-)$")


class RuleError(ValueError):
    """A rule is invalid. The message names the field (or the endpoint text) and the problem."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def has_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


# --- destinations -------------------------------------------------------------------------------------


def classify_dest(dest: str) -> str:
    """'' (any), 'ip', 'cidr' or 'domain'; raises RuleError for anything else."""
    if dest in ("", "*"):
        return ""
    if "/" in dest:
        try:
            ipaddress.ip_network(dest, strict=False)
        except ValueError:
            raise RuleError("dest", f"{dest!r} is not a valid CIDR") from None
        return "cidr"
    try:
        ipaddress.ip_address(dest)
        return "ip"
    except ValueError:
        pass
    if ":" in dest or re.fullmatch(r"[0-9.]+", dest):
        raise RuleError("dest", f"{dest!r} is not a valid IP address")
    name = normalize_domain(dest)
    labels = name.lstrip(".").split(".")
    if not name.lstrip(".") or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise RuleError("dest", f"{dest!r} is not a valid domain (letters, digits, '-', '.', wildcards * and ?)")
    return "domain"


def normalize_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


# --- whole rules --------------------------------------------------------------------------------------


def validate(rule: PolicyRule) -> PolicyRule:
    """Return the rule in canonical form, or raise RuleError naming the field."""
    if not rule.id:
        raise RuleError("id", "must not be empty")
    if rule.action not in ACTIONS:
        raise RuleError("action", f"must be split or keep, got {rule.action!r}")
    if rule.app_path and not (rule.app_path.startswith("/") or rule.app_path.startswith("*")):
        raise RuleError(
            "app_path",
            f"{rule.app_path!r} must be an absolute path or a glob like */curl "
            "(use the process name condition for a bare name)",
        )
    if rule.app_name and ("/" in rule.app_name or rule.app_name.strip() != rule.app_name):
        raise RuleError("app_name", f"{rule.app_name!r} must be a process name without '/' or spaces around")
    if rule.uid < -1:
        raise RuleError("uid", f"must be >= 0, got {rule.uid}")
    if rule.children and not (rule.app_path or rule.app_name):
        raise RuleError("children", "needs an app path or process name to find the parent app by")
    if rule.preset:
        if not PRESET_NAME.match(rule.preset):
            raise RuleError("preset", f"{rule.preset!r} is not a preset name (lowercase letters, digits, '-')")
        if rule.dest or rule.proto or rule.port_lo or rule.port_hi:
            raise RuleError("preset", "a preset brings its own destinations, protocols and ports")
    kind = classify_dest(rule.dest)
    dest = "" if rule.dest == "*" else rule.dest
    if kind == "domain":
        dest = normalize_domain(dest)
    elif kind == "cidr":
        dest = str(ipaddress.ip_network(dest, strict=False))
    elif kind == "ip":
        dest = str(ipaddress.ip_address(dest))
    proto = rule.proto.lower()
    if proto not in PROTOCOLS:
        raise RuleError("proto", f"must be tcp or udp, got {rule.proto!r}")
    proto = PROTOCOLS[proto]
    lo, hi = rule.port_lo, rule.port_hi or rule.port_lo  # a single port may be given as port_lo alone
    if (lo or hi) and not (1 <= lo <= hi <= 65535):
        raise RuleError("port", f"must be 1-65535 with low <= high, got {lo}-{hi}")
    return dataclasses.replace(rule, dest=dest, proto=proto, port_lo=lo, port_hi=hi)


def parse_ports(text: str) -> tuple[int, int]:
    """'443' → (443, 443); '8000-8080' → (8000, 8080); '' or '*' → (0, 0)."""
    text = text.strip()
    if text in ("", "*"):
        return 0, 0
    lo_text, _, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if hi_text else lo
    except ValueError:
        raise RuleError("port", f"{text!r} is not a port or a range like 8000-8080") from None
    if not 1 <= lo <= hi <= 65535:
        raise RuleError("port", f"{text!r} must be within 1-65535 with low <= high")
    return lo, hi


def parse_endpoint(text: str, rule_id: str) -> PolicyRule:
    """A Portmaster endpoint-list line → a validated rule (`+` = split, `-` = keep)."""
    parts = text.split()
    if len(parts) not in (2, 3) or parts[0] not in ("+", "-"):
        raise RuleError("endpoint", f"{text!r}: expected '+|- ENTITY [PROTOCOL/PORT]', e.g. '+ .example.com tcp/443'")
    sign, entity = parts[0], parts[1]
    if re.fullmatch(r"AS\d+", entity, re.IGNORECASE) or re.fullmatch(r"[A-Z]{2}", entity):
        raise RuleError("endpoint", f"{text!r}: ASN and country entities are not supported (use a domain, IP or CIDR)")
    proto, lo, hi = "", 0, 0
    if len(parts) == 3:
        proto_text, slash, port_text = parts[2].partition("/")
        if not slash:
            raise RuleError("endpoint", f"{text!r}: protocol/port must look like tcp/443, udp/53 or */80")
        if proto_text.lower() not in PROTOCOLS:
            raise RuleError("endpoint", f"{text!r}: unknown protocol {proto_text!r} (tcp, udp, 6, 17 or *)")
        proto = PROTOCOLS[proto_text.lower()]
        try:
            lo, hi = parse_ports(port_text)
        except RuleError as exc:
            raise RuleError("endpoint", f"{text!r}: {exc.problem}") from None
    rule = PolicyRule(
        id=rule_id,
        action="split" if sign == "+" else "keep",
        dest="" if entity == "*" else entity,
        proto=proto,
        port_lo=lo,
        port_hi=hi,
        source=text.strip(),
    )
    try:
        return validate(rule)
    except RuleError as exc:
        raise RuleError("endpoint", f"{text!r}: {exc.problem}") from None


def describe(rule: PolicyRule) -> str:
    """Short human text: 'split app=/usr/bin/curl dest=.example.com tcp/443 via eth0'."""
    parts = [rule.action]
    if rule.app_path:
        parts.append(f"app={rule.app_path}")
    if rule.app_name:
        parts.append(f"name={rule.app_name}")
    if rule.uid >= 0:
        parts.append(f"uid={rule.uid}")
    if rule.children:
        parts.append("+children")
    if rule.preset:
        parts.append(f"preset={rule.preset}")
    if rule.dest:
        parts.append(f"dest={rule.dest}")
    if rule.proto or rule.port_lo:
        parts.append(proto_ports(rule.proto, rule.port_lo, rule.port_hi))
    if rule.interface:
        parts.append(f"via {rule.interface}")
    return " ".join(parts)


def proto_ports(proto: str, lo: int, hi: int) -> str:
    """'tcp/443', 'udp/8801-8810', '*/80', 'tcp/*'."""
    ports = "" if not lo else (str(lo) if lo == hi else f"{lo}-{hi}")
    return f"{proto or '*'}/{ports or '*'}"
