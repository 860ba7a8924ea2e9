"""Presets and their updates, end to end: a user applies a preset in the lab host, publishes newer preset versions
in a local directory and on an https server (a certificate made at test time), applies them with `splittun update
apply`, and sees the next connection follow the preset in force — through the ISP (split) or the VPN — while the
user's rule list stays one untouched entry. Rollback restores the old destinations; every bad input is one line,
and the presets in force and the data directory stay exactly as they were.

One splittun instance in a private lab is shared by the module; the tests run in order (versions only go up).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.updates.store import pack
from tests.support.e2e import E2E, TCP, private_e2e
from tests.support.interceptor import ISP, KEEP, SPLIT, VPN, curl
from tests.support.lab import Leaks
from tests.support.updates import https_server, make_cert, publish, snapshot

NOW = datetime.now(UTC)
PRESET = "lab-service"


@pytest.fixture(scope="module")
def st() -> Iterator[E2E]:
    yield from private_e2e("presets", [])


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preset-versions")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("cert"))


def version(versions: Path, number: str, targets: dict[int, str], age: timedelta, **kw: object) -> Path:
    """Preset version `number` in its own directory: lab-service = the given whoami servers (IPv4 and IPv6)."""
    entries = [{"dest": targets[4], "proto": "tcp"}, {"dest": targets[6], "proto": "tcp"}]
    return publish(versions / number, number, {PRESET: entries, "other": [{"dest": ".other.example"}]}, NOW - age, **kw)


def paths_of(st: E2E) -> dict[str, str]:
    """Which path the next connection to each lab server takes: "isp" (split) or "vpn"."""
    seen = {}
    for label, targets in (("keep", KEEP), ("split", SPLIT)):
        for family in (4, 6):
            answer = curl(st.lab, targets[family])
            seen[f"{label}{family}"] = "isp" if answer == ISP[family] else "vpn" if answer == VPN[family] else answer
    return seen


FOLLOWS_KEEP = {"keep4": "isp", "keep6": "isp", "split4": "vpn", "split6": "vpn"}
FOLLOWS_SPLIT = {"keep4": "vpn", "keep6": "vpn", "split4": "isp", "split6": "isp"}


def allow_both(leaks: Leaks) -> None:
    for targets in (KEEP, SPLIT):
        for family in (4, 6):
            leaks.allow(targets[family], "tcp", TCP)


def test_builtin_presets_and_the_stale_line(st: E2E) -> None:
    st.reset()
    listed = json.loads(st.ok("presets", "list", "--json"))
    assert listed["version"]["label"] == "builtin"
    assert {"zoom", "steam", "netflix", "local-network"} <= {p["name"] for p in listed["presets"]}
    st.ok("config", "set", "splittun/updateStaleAfterDays", "3650")
    assert json.loads(st.ok("status", "--json"))["presets"]["stale"] is False
    assert "is stale" not in st.ok("status")
    st.ok("config", "set", "splittun/updateStaleAfterDays", "1")  # the built-in set is older than a day
    status = st.ok("status")
    assert "presets: splittun-presets 1.0.0 (2026-12-01 00:00 UTC) is stale, published" in status, status
    assert "presets.stale" in st.log("controller")  # the hook notifications will use
    st.ok("config", "set", "splittun/updateStaleAfterDays", "30")


def test_a_preset_follows_its_updates_from_a_directory_and_rolls_back(st: E2E, leaks: Leaks, versions: Path) -> None:
    allow_both(leaks)
    st.reset()
    assert paths_of(st) == {"keep4": "vpn", "keep6": "vpn", "split4": "vpn", "split6": "vpn"}
    v11 = version(versions, "1.1.0", KEEP, timedelta(hours=5))
    st.ok("config", "set", "splittun/updateSource", str(v11))
    assert "upgrade: 1.0.0 → 1.1.0" in st.ok("update", "check")
    st.apply("update", "apply")
    out = st.apply("presets", "apply", PRESET)
    assert f"preset {PRESET} applied as r1 (split)" in out
    rules = st.rules()
    assert rules == [{"id": "r1", "action": "split", "preset": PRESET}]
    assert paths_of(st) == FOLLOWS_KEEP
    # A newer version moves the preset to the other server: the next connections follow, the rule list does not change.
    v12 = version(versions, "1.2.0", SPLIT, timedelta(hours=4))
    st.ok("config", "set", "splittun/updateSource", str(v12))
    out = st.apply("update", "apply")
    assert "presets upgrade: splittun-presets 1.1.0" in out and "→ splittun-presets 1.2.0" in out
    assert st.rules() == rules
    assert paths_of(st) == FOLLOWS_SPLIT
    st.apply("update", "rollback")
    assert paths_of(st) == FOLLOWS_KEEP
    assert json.loads(st.ok("presets", "list", "--json"))["version"]["version"] == "1.1.0"


def test_an_update_from_an_https_server_with_a_test_certificate(
    st: E2E, leaks: Leaks, versions: Path, cert: tuple[Path, Path]
) -> None:
    allow_both(leaks)
    st.reset()
    st.apply("presets", "apply", PRESET)
    assert paths_of(st) == FOLLOWS_KEEP  # 1.1.0 in force since the rollback
    v13 = version(versions, "1.3.0", SPLIT, timedelta(hours=3))
    with https_server(v13, *cert, prefix=["ip", "netns", "exec", st.lab.ns_host]) as url:
        st.ok("config", "set", "splittun/updateSource", url)
        st.ok("config", "set", "splittun/updateCAFile", "")
        refused = st.refused("update", "apply")  # the system's CAs do not know the test certificate
        assert refused == f"splittun: source {url}: unreachable (certificate verify failed: self-signed certificate)"
        assert paths_of(st) == FOLLOWS_KEEP
        st.ok("config", "set", "splittun/updateCAFile", str(cert[0]))
        assert "presets upgrade: splittun-presets 1.1.0" in st.apply("update", "apply")
    assert paths_of(st) == FOLLOWS_SPLIT


def _corrupt(d: Path) -> None:
    (d / "index.json").write_text("{not an index")


def _wrong_hash(d: Path) -> None:
    text = (d / f"{PRESET}.json").read_text()
    (d / f"{PRESET}.json").write_text(text.replace(KEEP[4], SPLIT[4]))


def _truncated(d: Path) -> None:
    data = (d / f"{PRESET}.json").read_bytes()
    (d / f"{PRESET}.json").write_bytes(data[:20])


def _another_name(d: Path) -> None:
    pack(d, "someone-elses-presets", "1.9.0", NOW - timedelta(minutes=30))


BAD = [
    ("corrupt index", _corrupt, "index: not valid JSON at line 1 column 2"),
    ("wrong hash", _wrong_hash, f"{PRESET}.json does not match its sha256 in the index"),
    ("truncated download", _truncated, f"{PRESET}.json has 20 bytes, the index says"),
    ("index for another name", _another_name, "refused by rule name: the new index is 'someone-elses-presets'"),
]


def test_bad_inputs_are_refused_in_one_line_and_the_presets_in_force_stay(
    st: E2E, leaks: Leaks, versions: Path, cert: tuple[Path, Path]
) -> None:
    allow_both(leaks)
    st.reset()
    st.apply("presets", "apply", PRESET)
    assert paths_of(st) == FOLLOWS_SPLIT  # 1.3.0 in force
    data_dir = st.home / "presets"
    before = snapshot(data_dir), sorted(p.name for p in st.home.iterdir())
    for case, spoil, message in BAD:
        bad = version(versions / "bad", "1.9.0", KEEP, timedelta(minutes=30))
        spoil(bad)
        st.ok("config", "set", "splittun/updateSource", str(bad))
        refused = st.refused("update", "apply")
        assert message in refused, f"{case}: {refused}"
        assert (snapshot(data_dir), sorted(p.name for p in st.home.iterdir())) == before, case
        assert paths_of(st) == FOLLOWS_SPLIT, case
    st.ok("config", "set", "splittun/updateSource", str(versions / "nowhere"))
    assert st.refused("update", "apply") == f"splittun: source {versions / 'nowhere'}: no index.json there"
    st.ok("config", "set", "splittun/updateSource", "https://127.0.0.1:9")
    assert st.refused("update", "apply").startswith("splittun: source https://127.0.0.1:9: unreachable (")
    good = version(versions, "1.9.0", KEEP, timedelta(minutes=30))
    with https_server(good, *cert, cut=f"{PRESET}.json", prefix=["ip", "netns", "exec", st.lab.ns_host]) as url:
        st.ok("config", "set", "splittun/updateSource", url)
        assert (
            st.refused("update", "apply")
            == f"splittun: source {url}: {PRESET}.json: download cut short (IncompleteRead)"
        )
    assert (snapshot(data_dir), sorted(p.name for p in st.home.iterdir())) == before
    assert paths_of(st) == FOLLOWS_SPLIT
