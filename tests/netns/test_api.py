"""The local HTTP API, the connection history and notifications, against splittun running in a lab.

Every request comes from tests/fixtures/api_client.py run inside the lab host (the API listens on its
loopback): a third-party client with nothing but urllib. One splittun serves the module; a split curl makes the
connections the history and the counts show (the leak check allows exactly that flow).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from core.access import load as load_tokens
from runtime.paths import Home
from splittun.lab import topology as T
from tests.support import FIXTURES_DIR
from tests.support.e2e import E2E, private_e2e
from tests.support.interceptor import wait_until
from tests.support.lab import Leaks

CLIENT = FIXTURES_DIR / "api_client.py"
BASE = "http://127.0.0.1:817"
SPLIT_SERVER = T.SERVER_V4[1]


@pytest.fixture(scope="module")
def st() -> Iterator[E2E]:
    yield from private_e2e("api", [("--name", "curl", "--dest", SPLIT_SERVER)])


def tokens(st: E2E) -> Any:
    return load_tokens(Home.from_env({"SPLITTUN_HOME": str(st.home)}).run_dir)


def call(st: E2E, method: str, path: str, token: str | None = "admin", body: Any = None,
         headers: dict[str, str] | None = None, url: str = BASE) -> dict[str, Any]:  # fmt: skip
    """One request from inside the lab host; {"status", "headers", "body"}."""
    argv = [sys.executable, str(CLIENT), method, url + path]
    all_headers = dict(headers or {})
    if token is not None:
        secret = token if token not in ("admin", "read") else getattr(tokens(st), token)
        all_headers.setdefault("Authorization", f"Bearer {secret}")
    if body is not None:
        argv += ["--body", body if isinstance(body, str) else json.dumps(body)]
        all_headers.setdefault("Content-Type", "application/json")
    for name, value in all_headers.items():
        argv += ["--header", f"{name}: {value}"]
    result = st.lab.exec("host", argv)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def good(st: E2E, method: str, path: str, **kw: Any) -> Any:
    answer = call(st, method, path, **kw)
    assert answer["status"] in (200, 201), answer
    return answer["body"]


def split_curl(st: E2E, leaks: Leaks) -> str:
    """One split connection that closes at once (its proxy session ends); its conn_id once the registry has it."""
    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    before = {c["conn_id"] for c in st.connections("--verdict", "split")}
    st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{SPLIT_SERVER}/"], check=True)

    def closed() -> str:
        new = [c for c in st.connections("--verdict", "split") if c["conn_id"] not in before]
        return next((c["conn_id"] for c in new if c["state"] == "closed"), "")

    conn_id = wait_until(closed, timeout=10)
    assert conn_id, "the split curl never showed up closed"
    return conn_id


def kill9(st: E2E, instance: str) -> None:
    """SIGKILL an actor; returns once supervisord restarted it and it answers again."""
    assert st.inst is not None
    old = st.inst.pid(instance)
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        try:
            return st.inst.pid(instance) != old
        except Exception:
            return False

    assert wait_until(back, timeout=20), f"{instance} did not come back after kill -9"


# --- security -------------------------------------------------------------------------------------------------


def test_loopback_only_and_refusals(st: E2E) -> None:
    listening = st.lab.exec("host", ["ss", "-Hltn", "sport = :817"], check=True).stdout.split()
    assert {a for a in listening if a.endswith(":817")} == {"127.0.0.1:817", "[::1]:817"}
    assert call(st, "GET", "/api/v1/status", url="http://[::1]:817")["status"] == 200

    missing = call(st, "GET", "/api/v1/connections", token=None)
    assert missing["status"] == 401 and missing["body"]["error"]["code"] == "unauthorized"
    assert call(st, "GET", "/api/v1/connections", token="not-the-token")["status"] == 401
    read_on_admin = call(st, "POST", "/api/v1/rules", token="read", body={"name": "x"})
    assert read_on_admin["status"] == 403 and read_on_admin["body"]["error"]["code"] == "forbidden"
    rebinding = call(st, "GET", "/api/v1/status", headers={"Host": "evil.example:817"})
    assert rebinding["status"] == 403 and rebinding["body"]["error"]["code"] == "forbidden_host"
    csrf = call(st, "POST", "/api/v1/notifications/reset-state", headers={"Origin": "http://evil.example"})
    assert csrf["status"] == 403 and csrf["body"]["error"]["code"] == "cross_origin"
    malformed = call(st, "POST", "/api/v1/rules", body="{not json")
    assert malformed["status"] == 400 and "not valid JSON" in malformed["body"]["error"]["message"]
    wrong_field = call(st, "POST", "/api/v1/rules", body={"uid": "root"})
    assert wrong_field["status"] == 400 and "field 'uid'" in wrong_field["body"]["error"]["message"]
    assert call(st, "POST", "/api/v1/rules", body={"name": "x" * 70_000})["status"] == 413
    for answer in (missing, read_on_admin, rebinding, csrf, malformed):
        assert not any(h.lower().startswith("access-control-") for h in answer["headers"]), answer["headers"]
    assert st.rules() == [r for r in st.rules() if r["app_name"] == "curl"]  # nothing refused changed anything


def test_failed_logins_are_rate_limited_and_logged_once(st: E2E) -> None:
    # from [::1]: the other tests, from 127.0.0.1, are not held up by the block that follows
    answers = [call(st, "GET", "/api/v1/status", token="guess", url="http://[::1]:817")["status"] for _ in range(11)]
    assert answers == [401] * 10 + [429]
    assert call(st, "GET", "/api/v1/status", token="read")["status"] == 200  # another source is not blocked
    log = (Home.from_env({"SPLITTUN_HOME": str(st.home)}).log_dir / "api.log").read_text()
    assert sum("api.auth_failed" in line and "::1" in line for line in log.splitlines()) == 1


def test_ui_login_code_becomes_a_session_cookie_once(st: E2E) -> None:
    url = st.ok("ui").strip()
    assert url.startswith("http://127.0.0.1:817/ui/login?code=")
    login = call(st, "GET", url.removeprefix(BASE), token=None)
    assert login["status"] == 303
    cookie = login["headers"]["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "splittun_session=" in cookie
    session = cookie.split(";", 1)[0]
    assert call(st, "GET", "/api/v1/status", token=None, headers={"Cookie": session})["status"] == 200
    assert call(st, "GET", url.removeprefix(BASE), token=None)["status"] == 401  # the code worked once
    assert (
        st.ok("api", "token").strip() == tokens(st).admin and st.ok("api", "token", "--read").strip() == tokens(st).read
    )


# --- every endpoint -------------------------------------------------------------------------------------------


def test_every_endpoint(st: E2E, leaks: Leaks) -> None:
    conn_id = split_curl(st, leaks)
    status = good(st, "GET", "/api/v1/status", token="read")
    assert status["enabled"] is True and {a["name"] for a in status["actors"]} >= {"controller", "api", "interceptor"}
    assert {a["instance"] for a in good(st, "GET", "/api/v1/actors", token="read")} >= {"api", "controller"}

    rows = good(st, "GET", "/api/v1/connections?verdict=split&since=1h", token="read")
    assert conn_id in [r["conn_id"] for r in rows] and all(r["verb"] == "split tunneled" for r in rows)
    one = good(st, "GET", f"/api/v1/connections/{conn_id}", token="read")
    assert one["split"]["interface"] == T.HOST_IF and one["dst_ip"] == SPLIT_SERVER
    assert call(st, "GET", "/api/v1/connections/nope")["status"] == 404
    assert call(st, "GET", "/api/v1/connections?since=soon")["status"] == 400
    counts = good(st, "GET", "/api/v1/counts?since=1h", token="read")
    assert counts["split tunneled"] >= 1 and counts["total"] >= counts["split tunneled"]

    assert [r["id"] for r in good(st, "GET", "/api/v1/rules", token="read")] == ["r1"]
    added = good(st, "POST", "/api/v1/rules", body={"dest": "198.51.100.0/24", "keep": True})
    assert added["rule"]["id"] == "r2" and added["applied"]
    moved = good(st, "POST", "/api/v1/rules/r2/move", body={"position": 1})
    assert moved["version"] > added["version"]
    assert [r["id"] for r in good(st, "GET", "/api/v1/rules")] == ["r2", "r1"]
    refused = call(st, "POST", "/api/v1/rules", body={"name": "x", "interface": "nosuch0"})
    assert (
        refused["status"] == 400 and refused["body"]["error"]["message"] == "--interface: unknown interface 'nosuch0'"
    )
    cli = st.cli("rules", "add", "--name", "x", "--interface", "nosuch0")
    assert "--interface: unknown interface 'nosuch0'" in cli.stderr  # the same words as the CLI
    good(st, "DELETE", "/api/v1/rules/r2")
    assert call(st, "DELETE", "/api/v1/rules/r2")["status"] == 404
    st.wait_policy(st.policy_version())

    user = good(st, "GET", "/api/v1/options?level=user", token="read")
    assert [o["key"] for o in user] == ["splittun/enable", "splittun/interface", "splittun/rules", "splittun/splitDNS",
                                       "splittun/vpnDomains"]  # fmt: skip
    expert = {o["key"]: o for o in good(st, "GET", "/api/v1/options?level=expert", token="read")}
    assert expert["splittun/history/maxRows"]["value"] == 100_000
    good(st, "PUT", "/api/v1/options/splittun/history/maxAge", body={"value": "30d"})
    expert = {o["key"]: o for o in good(st, "GET", "/api/v1/options?level=expert")}
    assert expert["splittun/history/maxAge"]["value"] == "30d"
    bad = call(st, "PUT", "/api/v1/options/splittun/history/maxAge", body={"value": "soon"})
    assert bad["status"] == 400 and bad["body"]["error"]["message"].startswith("splittun/history/maxAge: 'soon'")

    netenv = good(st, "GET", "/api/v1/interfaces", token="read")
    assert netenv["uplink_ipv4"] == T.HOST_IF and T.HOST_IF in [i["name"] for i in netenv["interfaces"]]
    assert isinstance(good(st, "GET", "/api/v1/notifications", token="read"), list)
    spec = good(st, "GET", "/api/v1/openapi.json", token="read")
    assert spec["openapi"].startswith("3.") and "/api/v1/notifications/{id}/respond" in spec["paths"]
    assert spec["paths"]["/api/v1/rules"]["post"]["security"] == [{"admin": []}]


def test_server_sent_events_with_topic_filter(st: E2E) -> None:
    argv = [sys.executable, str(CLIENT), "GET", f"{BASE}/api/v1/events?topic=notify.&topic=policy.", "--sse", "4",
            "--header", f"Authorization: Bearer {tokens(st).read}"]  # fmt: skip
    stream = st.lab.popen("host", argv, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        notify(st, "sse-test", "Hello from the test")
        st.apply("rules", "add", "--name", "ssetest")  # a new policy snapshot, published at once
        added = next(r["id"] for r in st.rules() if r.get("app_name") == "ssetest")
        st.apply("rules", "remove", added)  # and another (the periodic republish is 10 s away)
        out, _ = stream.communicate(timeout=20)
    finally:
        stream.kill()
    got = json.loads(out)
    assert got["status"] == 200 and got["headers"]["Content-Type"].startswith("text/event-stream")
    topics = {e["event"] for e in got["events"]}
    assert "notify.test.sse" in topics and "policy.snapshot" in topics
    assert not any(t.startswith(("actor.", "conn.")) for t in topics)  # filtered
    note = next(e["data"] for e in got["events"] if e["event"] == "notify.test.sse")
    assert note["id"] == "sse-test" and note["message"] == "Hello from the test"


# --- notifications --------------------------------------------------------------------------------------------


def notify(st: E2E, note_id: str, message: str) -> Any:
    """What another actor does to show one: the controller's `notify` op."""
    assert st.inst is not None
    actions = [{"id": "ok", "text": "OK"}, {"id": "suppress", "text": "Don't show again"}]
    return st.inst.ask("controller", "notify", topic="notify.test.sse", id=note_id, ts=time.time(), title="Test",
                       message=message, level="info", actions=actions)  # fmt: skip


def test_notification_lifecycle_suppress_and_reset(st: E2E) -> None:
    assert notify(st, "ivpn-connected", "Connected")["state"] == "active"
    listed = good(st, "GET", "/api/v1/notifications", token="read")
    assert "ivpn-connected" in [n["id"] for n in listed]
    assert call(st, "POST", "/api/v1/notifications/ivpn-connected/respond", body={"action": "nope"})["status"] == 400
    done = good(st, "POST", "/api/v1/notifications/ivpn-connected/respond", body={"action": "suppress"})
    assert (done["state"], done["responded"]) == ("executed", "suppress")
    assert notify(st, "ivpn-connected", "Connected again") is None  # suppressed: not shown
    assert "ivpn-connected" not in st.ok("notifications", "list")
    reset = good(st, "POST", "/api/v1/notifications/reset-state")
    assert reset["markers"] >= 1
    assert notify(st, "ivpn-connected", "Connected again")["state"] == "active"  # shown again after reset
    assert "ivpn-connected: ok → executed" in st.ok("notifications", "respond", "ivpn-connected", "ok")
    all_notes = json.loads(st.ok("notifications", "list", "--all", "--json"))
    assert [n["state"] for n in all_notes if n["id"] == "ivpn-connected"] == ["executed"]


def test_a_rule_that_can_never_match_is_a_notification(st: E2E) -> None:
    """The rule was fine when added; its interface went away later."""
    st.lab.exec("host", ["ip", "link", "add", "stv0", "type", "veth", "peer", "name", "stv1"], check=True)
    try:
        st.lab.exec("host", ["ip", "addr", "add", "fd00:5717::1/64", "dev", "stv0", "nodad"], check=True)
        for end in ("stv1", "stv0"):
            st.lab.exec("host", ["ip", "link", "set", end, "up"], check=True)
        add = lambda: st.cli("rules", "add", "--name", "nothing", "--interface", "stv0")  # noqa: E731
        assert wait_until(lambda: add().returncode == 0), add().stderr
    finally:
        st.lab.exec("host", ["ip", "link", "del", "stv0"])

    def shown() -> list[str]:
        return [n["id"] for n in json.loads(st.ok("notifications", "list", "--json"))]

    assert wait_until(lambda: any(i.startswith("rule-never-matches-") for i in shown()), timeout=10), shown()
    rule = next(r["id"] for r in st.rules() if r.get("interface") == "stv0")
    st.apply("rules", "remove", rule)
    assert wait_until(lambda: f"rule-never-matches-{rule}" not in shown(), timeout=10)  # retired with the rule


def test_the_split_interface_gone_and_back_are_notifications(st: E2E) -> None:
    def veth(action: str) -> None:
        if action == "add":
            st.lab.exec("host", ["ip", "link", "add", "stv2", "type", "veth", "peer", "name", "stv3"], check=True)
            st.lab.exec("host", ["ip", "addr", "add", "fd00:5717:2::1/64", "dev", "stv2", "nodad"], check=True)
            for end in ("stv3", "stv2"):
                st.lab.exec("host", ["ip", "link", "set", end, "up"], check=True)
        else:
            st.lab.exec("host", ["ip", "link", "del", "stv2"])

    def shown() -> dict[str, str]:
        return {n["id"]: n["message"] for n in json.loads(st.ok("notifications", "list", "--json"))}

    veth("add")
    try:
        assert wait_until(lambda: st.cli("interface", "stv2").returncode == 0), st.cli("interface", "stv2").stderr
        veth("del")
        assert wait_until(lambda: "split-interface-gone" in shown(), timeout=10), shown()
        assert "'stv2' is not there" in shown()["split-interface-gone"]
        veth("add")
        assert wait_until(lambda: "split-interface-back" in shown(), timeout=10), shown()
        assert "split-interface-gone" not in shown() and "'stv2' again" in shown()["split-interface-back"]
    finally:
        veth("del")
        st.interface("auto", expect=T.HOST_IF)


# --- history --------------------------------------------------------------------------------------------------


def test_history_survives_kill9_of_controller_and_api(st: E2E, leaks: Leaks) -> None:
    conn_id = split_curl(st, leaks)
    time.sleep(0.5)  # batched: written within 0.1 s
    kill9(st, "controller")
    rows = st.connections("--since", "1h")
    assert conn_id in [r["conn_id"] for r in rows], "the history did not survive the controller's restart"
    shown = st.ok("conn", "show", conn_id)
    assert "split tunneled" in shown and T.HOST_IF in shown
    kill9(st, "api")
    assert wait_until(lambda: call(st, "GET", "/api/v1/status", token="read")["status"] == 200, timeout=10)
    rows = good(st, "GET", "/api/v1/connections?since=1h", token="read")
    assert conn_id in [r["conn_id"] for r in rows]


def test_retention_deletes_what_it_should(st: E2E, leaks: Leaks) -> None:
    for _ in range(2):
        split_curl(st, leaks)
    time.sleep(0.5)
    db = Home.from_env({"SPLITTUN_HOME": str(st.home)}).state_db

    def stored() -> list[str]:
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute("SELECT conn_id FROM connections ORDER BY last_seen DESC")]

    before = stored()
    assert len(before) >= 2
    st.ok("config", "set", "splittun/history/maxRows", "1")
    assert wait_until(lambda: stored() == before[:1], timeout=5), stored()  # the newest stays
    st.ok("config", "set", "splittun/history/maxAge", "1s")
    assert wait_until(lambda: stored() == [], timeout=5), stored()
    st.ok("config", "set", "splittun/history/maxAge", "7d")
    st.ok("config", "set", "splittun/history/maxRows", "100000")


def test_a_corrupt_state_database_is_one_line_and_nothing_else_breaks(st: E2E, leaks: Leaks) -> None:
    """Last in the module: it breaks the history on purpose, then puts a fresh one back."""
    home = Home.from_env({"SPLITTUN_HOME": str(st.home)})
    db = home.state_db
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    db.write_bytes(b"not a database " * 1000)
    kill9(st, "controller")
    log = (home.log_dir / "controller.log").read_text().splitlines()
    failures = [line for line in log[-50:] if "state.unavailable" in line]
    assert len(failures) == 1 and "file is not a database" in failures[0], failures
    conn_id = split_curl(st, leaks)  # live connections, notifications, edits: all as before
    assert conn_id in [c["conn_id"] for c in st.connections("--since", "1h")]
    assert notify(st, "still-works", "in memory")["state"] == "active"
    assert good(st, "GET", "/api/v1/counts", token="read")["split tunneled"] >= 1
    st.apply("rules", "add", "--name", "wget")
    db.unlink()
    kill9(st, "controller")
    assert wait_until(lambda: db.exists(), timeout=5)  # a new, empty history
