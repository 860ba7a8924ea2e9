"""Rules and policy evaluation: pure logic with plain values."""

from __future__ import annotations

import pytest

from core.policy import AppFacts, CompiledPolicy, RuleError, parse_endpoint, validate
from core.policy.rules import describe, parse_ports
from messages import PolicyRule, PolicySnapshot, ProcessInfo
from messages.flows import FiveTuple

CURL = ProcessInfo(pid=10, exe="/usr/bin/curl", name="curl", uid=1000, ancestors=["/usr/bin/bash"],
                   ancestor_names=["bash"])  # fmt: skip
CHILD_OF_FIREFOX = ProcessInfo(
    pid=11,
    exe="/usr/lib/firefox/firefox-bin",
    name="Web Content",
    uid=1000,
    ancestors=["/usr/lib/firefox/firefox", "/usr/bin/bash"],
    ancestor_names=["firefox", "bash"],
)


def policy(*rules: PolicyRule, enabled: bool = True) -> CompiledPolicy:
    return CompiledPolicy(PolicySnapshot(version=1, ts=0.0, enabled=enabled, rules=[validate(r) for r in rules]))


def conn(
    dst: str = "203.0.113.80", port: int = 443, proto: int = 6, domain: str = "", app: ProcessInfo = CURL
) -> tuple[FiveTuple, str, ProcessInfo]:
    """What `CompiledPolicy.match` is asked with: the 5-tuple, the destination's name, the process."""
    src = "fd00:5717::2" if ":" in dst else "192.0.2.66"
    return FiveTuple(proto, src, 40000, dst, port), domain, app


def rule(rule_id: str = "r1", action: str = "split", **kw: object) -> PolicyRule:
    return PolicyRule(id=rule_id, action=action, **kw)  # type: ignore[arg-type]


def test_default_is_keep_and_disabled_policy_never_splits() -> None:
    assert policy().match(*conn()).split is False
    assert policy().match(*conn()).rule_id == ""
    assert policy(rule(), enabled=False).match(*conn()).split is False
    assert policy(rule()).match(*conn()).split is True  # a rule without conditions matches all


def test_first_match_wins_and_keep_overrides_a_broader_split() -> None:
    p = policy(
        rule("keep-one", "keep", dest="203.0.113.81"),
        rule("split-net", "split", dest="203.0.113.0/24"),
    )
    assert p.match(*conn("203.0.113.81")).rule_id == "keep-one"
    assert p.match(*conn("203.0.113.81")).split is False
    assert p.match(*conn("203.0.113.80")).split is True
    assert p.match(*conn("198.51.100.9")).rule_id == ""


@pytest.mark.parametrize(
    ("pattern", "domain", "expected"),
    [
        ("www.example.com", "www.example.com", True),
        ("www.example.com", "example.com", False),
        (".example.com", "example.com", True),
        (".example.com", "a.b.example.com", True),
        (".example.com", "badexample.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "example.com", False),
        ("api-?.example.com", "api-1.example.com", True),
        ("WWW.Example.COM.", "www.example.com", True),
        ("www.example.com", "", False),
    ],
)
def test_domain_matching(pattern: str, domain: str, expected: bool) -> None:
    assert policy(rule(dest=pattern)).match(*conn(domain=domain)).split is expected


def test_ip_cidr_and_families() -> None:
    p = policy(rule("v4", dest="203.0.113.0/24"), rule("v6", dest="2001:db8:30::/64"), rule("one", dest="2001:db8::1"))
    assert p.match(*conn("203.0.113.7")).rule_id == "v4"
    assert p.match(*conn("::ffff:203.0.113.7")).rule_id == "v4"  # mapped address from a dual-stack socket
    assert p.match(*conn("2001:db8:30::80")).rule_id == "v6"
    assert p.match(*conn("2001:0db8::0001")).rule_id == "one"
    assert p.match(*conn("198.51.100.1")).rule_id == ""


def test_protocol_and_ports() -> None:
    p = policy(rule("udp-range", proto="udp", port_lo=3478, port_hi=3479), rule("tcp443", proto="tcp", port_lo=443))
    assert p.match(*conn(port=3479, proto=17)).rule_id == "udp-range"
    assert p.match(*conn(port=3479, proto=6)).rule_id == ""
    assert p.match(*conn(port=443, proto=6)).rule_id == "tcp443"
    assert p.match(*conn(port=444, proto=6)).rule_id == ""


def test_app_path_glob_name_uid_and_children() -> None:
    p = policy(
        rule("path", app_path="/usr/bin/curl", dest="203.0.113.80"),
        rule("glob", app_path="*/firefox*", children=True, dest="203.0.113.81"),
        rule("uid", uid=0, dest="203.0.113.82"),
        rule("name", app_name="curl", dest="203.0.113.83"),
    )
    assert p.match(*conn("203.0.113.80")).rule_id == "path"
    assert p.match(*conn("203.0.113.80", app=CHILD_OF_FIREFOX)).rule_id == ""
    assert p.match(*conn("203.0.113.81", app=CHILD_OF_FIREFOX)).rule_id == "glob"  # exe itself matches the glob
    content = ProcessInfo(
        pid=12,
        exe="/usr/lib/firefox/plugin-container",
        name="plugin",
        uid=1000,
        ancestors=["/usr/lib/firefox/firefox"],
        ancestor_names=["firefox"],
    )
    assert p.match(*conn("203.0.113.81", app=content)).rule_id == "glob"  # via its parent: children=True
    assert p.match(*conn("203.0.113.82")).rule_id == ""  # curl runs as uid 1000
    assert p.match(*conn("203.0.113.83")).rule_id == "name"
    long_name = ProcessInfo(exe="/opt/x/very-long-process-name", name="very-long-proce")  # comm is cut at 15
    assert policy(rule(app_name="very-long-process-name")).match(*conn(app=long_name)).split


def test_children_off_does_not_match_through_parents() -> None:
    content = ProcessInfo(
        exe="/usr/lib/firefox/plugin-container",
        name="plugin",
        ancestors=["/usr/lib/firefox/firefox"],
        ancestor_names=["firefox"],
    )
    assert not policy(rule(app_name="firefox")).match(*conn(app=content)).split
    assert policy(rule(app_name="firefox", children=True)).match(*conn(app=content)).split


def test_rule_interface_travels_with_the_rule_match() -> None:
    assert policy(rule(interface="wlan0")).match(*conn()).interface == "wlan0"


def test_app_facts_come_from_the_process_in_one_place() -> None:
    """An ancestor whose executable was unreadable is listed by its name: it is a name, never a path."""
    process = ProcessInfo(pid=7, exe="/usr/bin/curl", name="curl", uid=1000, ancestors=["sh", "/usr/bin/tmux"],
                          ancestor_names=["sh", "tmux: server"])  # fmt: skip
    app = AppFacts.from_process(process)
    assert (app.pid, app.exe, app.name, app.uid) == (7, "/usr/bin/curl", "curl", 1000)
    assert app.ancestors == (("", "sh"), ("/usr/bin/tmux", "tmux: server"))
    assert AppFacts.from_process(None) == AppFacts()
    p = policy(rule("by-path", app_path="/usr/bin/*sh", children=True), rule("by-name", app_name="sh", children=True))
    child = ProcessInfo(exe="/usr/bin/curl", name="curl", ancestors=["sh"], ancestor_names=["sh"])
    assert p.match(*conn(app=child)).rule_id == "by-name"  # "sh" is its name, not an executable path


@pytest.mark.parametrize(
    ("text", "action", "dest", "proto", "ports"),
    [
        ("+ .example.com tcp/443", "split", ".example.com", "tcp", (443, 443)),
        ("- 10.0.0.0/8", "keep", "10.0.0.0/8", "", (0, 0)),
        ("+ * udp/3478-3479", "split", "", "udp", (3478, 3479)),
        ("+ 2001:db8::/32 */53", "split", "2001:db8::/32", "", (53, 53)),
        ("+ 203.0.113.80 6/80", "split", "203.0.113.80", "tcp", (80, 80)),
    ],
)
def test_portmaster_endpoint_strings(text: str, action: str, dest: str, proto: str, ports: tuple[int, int]) -> None:
    r = parse_endpoint(text, "e1")
    assert (r.action, r.dest, r.proto, (r.port_lo, r.port_hi), r.source) == (action, dest, proto, ports, text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("example.com", "expected '+|- ENTITY"),
        ("+ AS15169", "ASN and country"),
        ("+ DE", "ASN and country"),
        ("+ 10.0.0.0/33", "not a valid CIDR"),
        ("+ x.com tcp443", "protocol/port must look like"),
        ("+ x.com icmp/1", "unknown protocol"),
        ("+ x.com tcp/70000", "within 1-65535"),
        ("* x.com", "expected '+|- ENTITY"),
    ],
)
def test_bad_endpoint_strings(text: str, problem: str) -> None:
    with pytest.raises(RuleError, match="endpoint") as caught:
        parse_endpoint(text, "e1")
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"action": "maybe"}, "action"),
        ({"app_path": "curl"}, "app_path"),
        ({"app_name": "/usr/bin/curl"}, "app_name"),
        ({"children": True}, "children"),
        ({"dest": "300.1.1.1"}, "dest"),
        ({"dest": "exa mple.com"}, "dest"),
        ({"proto": "icmp"}, "proto"),
        ({"port_lo": 10, "port_hi": 5}, "port"),
        ({"uid": -5}, "uid"),
    ],
)
def test_validation_names_the_field(fields: dict, field_name: str) -> None:
    with pytest.raises(RuleError) as caught:
        validate(rule(**fields))
    assert caught.value.field == field_name and str(caught.value).startswith(f"{field_name}: ")


def test_validate_canonicalizes() -> None:
    r = validate(rule(dest="WWW.Example.com.", proto="TCP"))
    assert (r.dest, r.proto) == ("www.example.com", "tcp")
    assert validate(rule(dest="203.0.113.9/24")).dest == "203.0.113.0/24"
    assert validate(rule(dest="2001:0db8::0001")).dest == "2001:db8::1"


def test_parse_ports_and_describe() -> None:
    assert parse_ports("443") == (443, 443) and parse_ports("1-2") == (1, 2) and parse_ports("*") == (0, 0)
    with pytest.raises(RuleError):
        parse_ports("a-b")
    text = describe(
        validate(rule(app_name="curl", dest=".example.com", proto="tcp", port_lo=443, port_hi=443, interface="eth0"))
    )
    assert text == "split name=curl dest=.example.com tcp/443 via eth0"
