"""The web panel in a real browser (headless Debian chromium via Selenium), against splittun in a lab.

One splittun and one browser serve the module; the browser runs in the lab host's namespace (where the api
actor listens on loopback), logs in through `splittun ui`'s one-time URL, and watches a split curl appear.
Screenshots of each view go to test-artifacts/panel/ (SPLITTUN_ARTIFACTS overrides the directory).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zmq

from core import config as cfg
from core.policy.rules import describe as describe_rule
from core.state import StateDB
from messages import ConnEnd, ConnNew, ConnVerdict, PolicyRule, ProcessInfo, Verdict, verdict_verb
from messages.control import ConnectionInfo
from runtime import paths
from runtime.transport import Publisher, Subscriber
from splittun.lab import topology as T
from tests.support import browser as B
from tests.support.e2e import E2E, private_e2e
from tests.support.interceptor import wait_until
from tests.support.lab import Leaks

SPLIT_SERVER = T.SERVER_V4[1]
BASE = "http://127.0.0.1:817"

if (why := B.unavailable_reason()) is not None:
    pytest.skip(why, allow_module_level=True)

from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402


@pytest.fixture(scope="module")
def st() -> Iterator[E2E]:
    yield from private_e2e("panel", [("--name", "curl", "--dest", SPLIT_SERVER)])


@pytest.fixture(scope="module")
def browser(st: E2E) -> Iterator[B.Browser]:
    """Logged in: the one-time URL from `splittun ui` leaves a session cookie and lands on the panel."""
    url = st.ok("ui").strip()
    assert url.startswith(f"{BASE}/ui/login?code="), url
    with B.browser_in(st.lab.ns("host")) as b:
        b.run(lambda d: d.get(url))
        assert b.run(lambda d: d.current_url) == f"{BASE}/"
        yield b


ROWS = """return [...document.querySelectorAll('#conn-rows tr[data-conn-id]')].map(
    (tr) => ({id: tr.dataset.connId, text: tr.innerText, split: !!tr.querySelector('.verdict-split')}));"""


SELECTED = "return [...document.querySelectorAll('#conn-rows tr.selected')].map((tr) => tr.dataset.connId);"


def rows(b: B.Browser) -> list[dict[str, Any]]:
    """The table as the user sees it, read in one go (the list re-renders under live updates)."""
    return b.run(lambda d: d.execute_script(ROWS))


def text(b: B.Browser, selector: str) -> str:
    """What the elements `selector` finds show, read in one go (no element handle to go stale)."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText).join('\\n');"
    return b.run(lambda d: d.execute_script(script, selector))


def act(b: B.Browser, selector: str, what: str, action: Callable[[Any], None]) -> None:
    """`action(element)` on what `selector` finds now, again if a live update replaced or re-laid it out."""

    def attempt(d: Any) -> bool:
        try:
            action(d.find_element(By.CSS_SELECTOR, selector))
            return True
        except (StaleElementReferenceException, ElementNotInteractableException):
            return False

    assert wait_until(lambda: b.run(attempt), timeout=5), f"could not {what} {selector}"


def click(b: B.Browser, selector: str) -> None:
    """A real click on what `selector` finds now."""
    act(b, selector, "click", lambda e: e.click())


def press(b: B.Browser, key: str) -> None:
    """A key press on whatever has the focus (again if a live update was re-laying it out just then)."""

    def attempt(d: Any) -> bool:
        try:
            d.switch_to.active_element.send_keys(key)
            return True
        except (StaleElementReferenceException, ElementNotInteractableException):
            return False

    assert wait_until(lambda: b.run(attempt), timeout=5), f"could not press {key!r}"


def focus(b: B.Browser, selector: str) -> None:
    """The keyboard focus on what `selector` finds now, the way a key press would put it there."""
    act(b, selector, "focus", lambda e: e.send_keys(Keys.NULL))


def test_the_page_loads_with_no_console_errors_and_goes_live(browser: B.Browser) -> None:
    assert wait_until(lambda: text(browser, "#stream") == "live", timeout=10), text(browser, "#stream")
    assert text(browser, "h1") == "splittun"
    assert browser.console_errors() == []


def test_a_split_curl_appears_with_the_split_class_and_its_info_panel_names_the_interface(
    st: E2E, browser: B.Browser, leaks: Leaks
) -> None:
    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    before = {r["id"] for r in rows(browser)}
    st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{SPLIT_SERVER}/"], check=True)

    def new_split_row() -> dict[str, Any] | None:
        new = [r for r in rows(browser) if r["id"] not in before and r["split"] and SPLIT_SERVER in r["text"]]
        return new[0] if new else None

    assert wait_until(lambda: new_split_row() is not None, timeout=5), rows(browser)
    row = new_split_row()
    assert row is not None and "split tunneled" in row["text"] and "curl" in row["text"]

    chips_js = (
        "return [...document.querySelectorAll('#chips .chip')].map((c) => [c.dataset.verb, c.lastChild.textContent])"
    )

    def chips() -> dict[str, str]:
        return dict(browser.run(lambda d: d.execute_script(chips_js)))

    def counted() -> bool:  # the chips catch up with the rows (their counts are refreshed, throttled)
        now = chips()
        return now.get("") == str(len(rows(browser))) and now.get("split tunneled", "0") != "0"

    assert wait_until(counted, timeout=5), chips()
    browser.screenshot("panel/connections")

    click(browser, f'tr[data-conn-id="{row["id"]}"]')
    expected = f"This connection is routed through interface {T.HOST_IF} ({T.HOST_V4})"
    assert wait_until(lambda: expected in text(browser, "#split-block"), timeout=5), text(browser, "#info")
    info = text(browser, "#info")
    assert "curl" in info and SPLIT_SERVER in info and "split tunneled" in info
    assert f"app rule r1: split name=curl dest={SPLIT_SERVER}" in info, info  # the rule, and that it is an app's
    parent = Path("/proc/self/comm").read_text().strip()  # curl's parent: this test's process (ip execs curl)
    assert f"Parent chain\n{parent} ← " in info, info
    browser.screenshot("panel/info")
    assert browser.console_errors() == []


def test_the_split_chip_counts_and_filters(browser: B.Browser) -> None:
    def split_count() -> int:
        count = text(browser, 'button.chip[data-verb="split tunneled"] .count')
        return int(count) if count else 0

    assert wait_until(lambda: split_count() >= 1, timeout=3), text(browser, "#chips")
    click(browser, 'button.chip[data-verb="split tunneled"]')
    assert wait_until(lambda: {r["split"] for r in rows(browser)} == {True}, timeout=5), rows(browser)


def test_a_shorter_history_range_reloads_and_keeps_the_recent_split(browser: B.Browser) -> None:
    browser.run(lambda d: Select(d.find_element(By.ID, "range")).select_by_value("1h"))
    assert wait_until(lambda: any(r["split"] for r in rows(browser)), timeout=5), rows(browser)
    assert browser.console_errors() == []


def test_the_browser_itself_made_no_connections(browser: B.Browser) -> None:
    """Only loopback to the panel: chromium's own lookups would show up in the list (and could leak)."""
    click(browser, 'button.chip[data-verb=""]')
    assert not [r for r in rows(browser) if "chromium" in r["text"]], rows(browser)


def test_without_a_session_the_page_says_how_to_log_in_and_a_login_url_works_once(st: E2E, browser: B.Browser) -> None:
    browser.run(lambda d: d.delete_all_cookies())
    for _ in range(12):  # more than the failed-login limit: opening the page before logging in guesses nothing
        browser.run(lambda d: d.get(f"{BASE}/"))
    assert "Run splittun ui" in text(browser, "main"), text(browser, "body")
    url = st.ok("ui").strip()
    browser.run(lambda d: d.get(url))
    assert browser.run(lambda d: d.current_url) == f"{BASE}/"
    assert wait_until(lambda: text(browser, "#stream") == "live", timeout=10)
    browser.run(lambda d: d.delete_all_cookies())
    browser.run(lambda d: d.get(url))  # the same code again
    assert "used or expired" in text(browser, "body")
    fresh = st.ok("ui").strip()
    browser.run(lambda d: d.get(fresh))  # logged in again for the tests after this one
    assert wait_until(lambda: text(browser, "#stream") == "live", timeout=10)
    browser.console_errors()  # the 401s above are expected console errors; the next test starts clean


def test_a_focused_row_keeps_the_focus_through_live_updates_and_enter_opens_it(
    st: E2E, browser: B.Browser, leaks: Leaks
) -> None:
    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{SPLIT_SERVER}/"], check=True)
    assert wait_until(lambda: any(r["split"] for r in rows(browser)), timeout=5), rows(browser)
    first = next(r for r in rows(browser) if r["split"])
    focused = "return document.activeElement && document.activeElement.dataset.connId;"
    focus(browser, f'tr[data-conn-id="{first["id"]}"]')
    assert browser.run(lambda d: d.execute_script(focused)) == first["id"]
    count = len(rows(browser))
    st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{SPLIT_SERVER}/"], check=True)
    assert wait_until(lambda: len(rows(browser)) > count, timeout=5), rows(browser)
    assert browser.run(lambda d: d.execute_script(focused)) == first["id"]  # the live row did not steal it
    press(browser, Keys.ENTER)
    assert wait_until(lambda: first["id"] in browser.run(lambda d: d.execute_script(SELECTED)), timeout=5)


def test_split_this_app_from_the_info_panel_makes_the_next_curl_split(
    st: E2E, browser: B.Browser, leaks: Leaks
) -> None:
    other = T.SERVER_V4[0]  # the module's rule splits curl only to SPLIT_SERVER
    leaks.allow(other, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    before = {r["id"] for r in rows(browser)}

    def curl_row(split: bool) -> dict[str, Any] | None:
        new = [r for r in rows(browser) if r["id"] not in before and f"{other}:80" in r["text"] and r["split"] == split]
        return new[0] if new else None

    st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{other}/"], check=True)
    assert wait_until(lambda: curl_row(False) is not None and "…" not in curl_row(False)["text"], timeout=5)
    row = curl_row(False)
    assert row is not None
    click(browser, f'tr[data-conn-id="{row["id"]}"]')
    click(browser, "#app-action")
    assert wait_until(lambda: "(applied)" in text(browser, "#action-result"), timeout=10), text(browser, "#info")
    rule_id = text(browser, "#action-result").split()[2]
    try:
        first = st.rules()[0]
        assert first["id"] == rule_id and "/usr/bin/curl" in json.dumps(first), first
        st.wait_policy(st.policy_version())
        before |= {r["id"] for r in rows(browser)}
        st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{other}/"], check=True)
        assert wait_until(lambda: curl_row(True) is not None, timeout=5), rows(browser)
    finally:
        st.apply("rules", "remove", rule_id)
    assert browser.console_errors() == []


def test_the_dark_theme_follows_the_system(browser: B.Browser) -> None:
    colours = "return [getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color];"

    def scheme(value: str) -> list[str]:
        media = {"features": [{"name": "prefers-color-scheme", "value": value}]}
        browser.run(lambda d: d.execute_cdp_cmd("Emulation.setEmulatedMedia", media))
        return browser.run(lambda d: d.execute_script(colours))

    try:
        light, dark = scheme("light"), scheme("dark")
        browser.screenshot("panel/connections-dark")
    finally:
        scheme("")
    assert light != dark and dark[0] == "rgb(21, 24, 27)", (light, dark)


# --- rules ----------------------------------------------------------------------------------------------------

RULE_ROWS = """return [...document.querySelectorAll('#rule-rows tr[data-rule-id]')].map(
    (tr) => ({id: tr.dataset.ruleId, text: tr.innerText}));"""


def rule_rows(b: B.Browser) -> list[dict[str, str]]:
    return b.run(lambda d: d.execute_script(RULE_ROWS))


def show(b: B.Browser, view: str) -> None:
    """Open a view from the header's navigation."""
    click(b, f'nav a[href="#{view}"]')
    displayed = "return [...document.querySelectorAll('main[id^=view-]')].filter((m) => m.getClientRects().length)"
    displayed += ".map((m) => m.id);"
    assert wait_until(lambda: b.run(lambda d: d.execute_script(displayed)) == [f"view-{view}"], timeout=5), view


def type_into(b: B.Browser, field: str, value: str) -> None:
    def fill(box: Any) -> None:
        box.clear()
        box.send_keys(value)

    act(b, f"#{field}", "type into", fill)


def test_adding_a_rule_in_the_panel_makes_the_next_curl_split_and_it_can_be_moved_and_removed(
    st: E2E, browser: B.Browser, leaks: Leaks
) -> None:
    other = T.SERVER_V4[0]  # no rule splits curl to it (the app-action test removed the one it added)
    leaks.allow(other, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    show(browser, "rules")
    assert wait_until(lambda: [r["id"] for r in rule_rows(browser)] == [r["id"] for r in st.rules()]), rule_rows(
        browser
    )
    assert "name=curl" in rule_rows(browser)[0]["text"]

    # a mistake is shown next to its field, in the words of the CLI
    cli_says = st.refused("rules", "add", "--name", "curl", "--dest", "192.0.2")
    type_into(browser, "rule-name", "curl")
    type_into(browser, "rule-dest", "192.0.2")
    click(browser, "#rule-add")
    assert wait_until(lambda: text(browser, "#err-dest") != "", timeout=5), text(browser, "#rule-form")
    assert text(browser, "#err-dest") in cli_says, (text(browser, "#err-dest"), cli_says)
    assert text(browser, "#err-form") == "" and len(st.rules()) == 1
    assert [e for e in browser.console_errors() if "/api/v1/rules " not in e or "400" not in e] == []  # that one

    type_into(browser, "rule-dest", other)
    browser.run(lambda d: Select(d.find_element(By.ID, "rule-position")).select_by_value("1"))
    click(browser, "#rule-add")
    assert wait_until(lambda: "(applied)" in text(browser, "#rules-status"), timeout=10), text(browser, "#view-rules")
    assert text(browser, "#err-dest") == ""
    added = st.rules()[0]
    assert (added["app_name"], added["dest"], added["action"]) == ("curl", other, "split"), added
    assert wait_until(lambda: [r["id"] for r in rule_rows(browser)] == [r["id"] for r in st.rules()])
    st.wait_policy(st.policy_version())
    try:
        show(browser, "connections")
        before = {r["id"] for r in rows(browser)}
        st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{other}/"], check=True)
        split = lambda: [r for r in rows(browser) if r["id"] not in before and f"{other}:80" in r["text"]]  # noqa: E731
        assert wait_until(lambda: any(r["split"] for r in split()), timeout=5), split()

        show(browser, "rules")
        click(browser, f'tr[data-rule-id="{added["id"]}"] .move-down')
        assert wait_until(lambda: [r["id"] for r in st.rules()][1] == added["id"], timeout=5), st.rules()
        assert wait_until(lambda: rule_rows(browser)[1]["id"] == added["id"], timeout=5), rule_rows(browser)
        browser.screenshot("panel/rules")
        click(browser, f'tr[data-rule-id="{added["id"]}"] .remove')
        assert wait_until(lambda: added["id"] not in [r["id"] for r in st.rules()], timeout=5), st.rules()
        assert wait_until(lambda: added["id"] not in [r["id"] for r in rule_rows(browser)], timeout=5)
    finally:
        if added["id"] in [r["id"] for r in st.rules()]:
            st.apply("rules", "remove", added["id"])
        show(browser, "connections")
    assert browser.console_errors() == []


def test_the_panel_describes_a_rule_as_the_cli_does_and_maps_every_rule_error_to_a_field(browser: B.Browser) -> None:
    """format.js beside core: `ruleConditions` against rules.describe, `errorField` against the add form."""
    samples = [
        PolicyRule(id="r1", action="split", app_name="curl", dest="203.0.113.81"),
        PolicyRule(
            id="r2",
            action="keep",
            app_path="/usr/bin/*",
            uid=1000,
            children=True,
            proto="udp",
            port_lo=53,
            port_hi=53,
            interface="eth0",
        ),
        PolicyRule(id="r3", action="split", dest=".example.com", proto="tcp", port_lo=8000, port_hi=8080),
        PolicyRule(id="r4", action="split", preset="video"),
    ]
    fields = ["dest", "port", "proto", "app_path", "app_name", "children", "uid", "--interface", "position"]
    script = """const [rules, fields, done] = arguments;
    import('/panel/format.js').then((f) => done({
      described: rules.map((r) => r.action + ' ' + f.ruleConditions(r)),
      mapped: fields.map((x) => f.errorField(x + ': the problem')),
      forms: [...document.querySelectorAll('#rule-form [id^=rule-]')].map((e) => e.id.slice(5)),
    }));"""
    got = browser.run(lambda d: d.execute_async_script(script, [cfg.rule_to_json(r) for r in samples], fields))
    assert got["described"] == [describe_rule(r).removesuffix(f" via {r.interface}") for r in samples]
    assert all(m in got["forms"] for m in got["mapped"]), got  # every refusal lands next to a field


# --- settings -------------------------------------------------------------------------------------------------


def curl_verdict(st: E2E, browser: B.Browser, server: str) -> str:
    """Curl `server` and return the verdict its new row shows once the verdict is in."""
    show(browser, "connections")
    before = {r["id"] for r in rows(browser)}
    st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{server}/"], check=True)

    def verdict() -> str:
        new = [r for r in rows(browser) if r["id"] not in before and f"{server}:80" in r["text"]]
        return "" if not new or "…" in new[0]["text"] else ("split" if new[0]["split"] else "vpn")

    assert wait_until(lambda: verdict() != "", timeout=5), rows(browser)
    return verdict()


def test_the_enable_toggle_keeps_the_next_curl_in_the_vpn_and_splits_it_again(
    st: E2E, browser: B.Browser, leaks: Leaks
) -> None:
    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    show(browser, "settings")
    assert wait_until(lambda: browser.run(lambda d: d.find_element(By.ID, "enable").is_selected()), timeout=5)
    resolved = f"auto resolves to IPv4: {T.HOST_IF} ({T.HOST_V4})"
    assert wait_until(lambda: resolved in text(browser, "#interface-resolved"), timeout=5), text(
        browser, "#view-settings"
    )
    browser.screenshot("panel/settings")
    try:
        click(browser, "#enable")
        assert wait_until(lambda: "off (applied)" in text(browser, "#enable-status"), timeout=10)
        assert st.config_file()["splittun/enable"] is False
        st.wait_policy(st.policy_version())
        assert curl_verdict(st, browser, SPLIT_SERVER) == "vpn"
        show(browser, "settings")
        assert not browser.run(lambda d: d.find_element(By.ID, "enable").is_selected())
        click(browser, "#enable")
        assert wait_until(lambda: "on (applied)" in text(browser, "#enable-status"), timeout=10)
        st.wait_policy(st.policy_version())
        assert curl_verdict(st, browser, SPLIT_SERVER) == "split"
    finally:
        if st.config_file().get("splittun/enable") is not True:
            st.apply("enable")
    assert browser.console_errors() == []


def test_settings_are_shown_by_expertise_level_and_a_refusal_is_shown_by_the_option(
    st: E2E, browser: B.Browser
) -> None:
    show(browser, "settings")
    keys = "return [...document.querySelectorAll('#options .option')].map((o) => o.dataset.key);"
    browser.run(lambda d: Select(d.find_element(By.ID, "level")).select_by_value("user"))
    assert wait_until(lambda: "splittun/dataPath" not in browser.run(lambda d: d.execute_script(keys)), timeout=5)
    browser.run(lambda d: Select(d.find_element(By.ID, "level")).select_by_value("expert"))
    assert wait_until(lambda: "splittun/dataPath" in browser.run(lambda d: d.execute_script(keys)), timeout=5)
    assert "re-routed and source-NATed" in text(browser, '.option[data-key="splittun/dataPath"] .hint')
    field = "opt-splittun-dataPath"
    type_into(browser, field, "teleport")
    click(browser, f"#{field}-save")
    cli_says = st.refused("config", "set", "splittun/dataPath", "teleport")
    assert wait_until(lambda: text(browser, f"#{field}-error") != "", timeout=5)
    assert text(browser, f"#{field}-error") in cli_says, (text(browser, f"#{field}-error"), cli_says)
    browser.run(lambda d: Select(d.find_element(By.ID, "level")).select_by_value("user"))
    browser.console_errors()  # the refused PUT is an expected console error


def test_the_interface_choice_is_set_in_the_panel_and_a_wrong_one_is_refused_in_the_clis_words(
    st: E2E, browser: B.Browser
) -> None:
    show(browser, "settings")
    type_into(browser, "interface-choice", "nosuch0")
    click(browser, "#interface-save")
    assert wait_until(lambda: text(browser, "#interface-error") != "", timeout=5)
    cli_says = st.refused("interface", "nosuch0")
    said = text(browser, "#interface-error")
    assert "unknown interface 'nosuch0'" in said and said in cli_says, (said, cli_says)
    browser.console_errors()  # the refused PUT
    try:
        type_into(browser, "interface-choice", T.HOST_IF)
        click(browser, "#interface-save")
        chosen = f"Split connections leave through {T.HOST_IF}."
        assert wait_until(lambda: chosen in text(browser, "#interface-resolved"), timeout=5)
        assert text(browser, "#interface-error") == "" and st.config_file()["splittun/interface"] == T.HOST_IF
        type_into(browser, "interface-choice", "auto")
        click(browser, "#interface-save")
        assert wait_until(lambda: "auto resolves to IPv4" in text(browser, "#interface-resolved"), timeout=5)
        assert st.config_file().get("splittun/interface", "") == ""
    finally:
        if st.config_file().get("splittun/interface"):
            st.interface("auto", expect=T.HOST_IF)
    assert browser.console_errors() == []


# --- notifications --------------------------------------------------------------------------------------------

NOTES = "return [...document.querySelectorAll('#tray-list li[data-note-id]')].map((li) => li.dataset.noteId);"


def notify(st: E2E, note_id: str, message: str) -> Any:
    """What an actor does to show one (the controller's `notify` op), with "Don't show again" among its actions."""
    assert st.inst is not None
    actions = [{"id": "ok", "text": "OK"}, {"id": "suppress", "text": "Don't show again"}]
    return st.inst.ask("controller", "notify", topic="notify.test.panel", id=note_id, ts=time.time(),
                       title="Panel test", message=message, level="info", actions=actions)  # fmt: skip


def test_dont_show_again_hides_a_notification_and_the_menus_reset_brings_it_back(st: E2E, browser: B.Browser) -> None:
    tray = lambda: browser.run(lambda d: d.execute_script(NOTES))  # noqa: E731
    assert notify(st, "panel-note", "Something to answer")["state"] == "active"
    click(browser, "#tray-toggle")
    assert wait_until(lambda: "panel-note" in tray(), timeout=5), text(browser, "#tray")
    assert text(browser, "#tray-count") == str(len(tray()))
    assert "Something to answer" in text(browser, "#tray")
    browser.screenshot("panel/notifications")
    click(browser, 'li[data-note-id="panel-note"] button[data-action="suppress"]')
    assert wait_until(lambda: "panel-note" not in tray(), timeout=5), text(browser, "#tray")
    assert notify(st, "panel-note", "Shown again?") is None  # the marker holds it back
    time.sleep(2.5)  # a poll of the tray later: still not there
    assert "panel-note" not in tray()

    click(browser, "#menu summary")
    click(browser, "#reset-notifications")
    said = "Reset Notifications State: deleted "
    assert wait_until(lambda: said in text(browser, "#menu-status"), timeout=5), text(browser, "#menu-status")
    assert "and 1 'don't show again' marker(s)" in text(browser, "#menu-status")
    assert notify(st, "panel-note", "Back after the reset")["state"] == "active"
    assert wait_until(lambda: "panel-note" in tray(), timeout=5), text(browser, "#tray")
    click(browser, 'li[data-note-id="panel-note"] button[data-action="ok"]')
    assert wait_until(lambda: "panel-note" not in tray(), timeout=5), text(browser, "#tray")
    click(browser, "#tray-toggle")
    assert browser.console_errors() == []


# --- interfaces and actors ------------------------------------------------------------------------------------

ACTOR_ROWS = """return Object.fromEntries([...document.querySelectorAll('#actor-rows tr')].map(
    (tr) => [tr.dataset.actor, tr.innerText]));"""


def test_the_status_view_shows_uplinks_and_actors_and_a_banner_while_an_actor_is_gone(
    st: E2E, browser: B.Browser
) -> None:
    show(browser, "status")
    actors = lambda: browser.run(lambda d: d.execute_script(ACTOR_ROWS))  # noqa: E731
    assert wait_until(lambda: "controller" in actors() and "netenv" in actors(), timeout=5), actors()
    assert all("ready" in row and "ago" in row for row in actors().values()), actors()
    ipv4 = lambda: text(browser, '#uplink-rows tr[data-family="4"]')  # noqa: E731 (its own request, after the actors)
    assert wait_until(lambda: f"{T.HOST_IF} ({T.HOST_V4})" in ipv4(), timeout=5), ipv4()
    assert browser.run(lambda d: d.find_element(By.ID, "banner").is_displayed()) is False
    browser.screenshot("panel/status")

    netenv = next(a for a in json.loads(st.ok("status", "--json"))["actors"] if a["actor"] == "netenv")
    os.kill(netenv["pid"], signal.SIGSTOP)  # alive for supervisord, silent on the bus: its heartbeats stop
    try:
        banner = lambda: browser.run(lambda d: d.find_element(By.ID, "banner").is_displayed())  # noqa: E731
        assert wait_until(banner, timeout=30), actors()
        assert "netenv: gone (no heartbeat for" in text(browser, "#banner"), text(browser, "#banner")
        assert "netenv" in text(browser, "#banner-problems") and "gone" in actors()["netenv"]
        browser.screenshot("panel/status-banner")
    finally:
        os.kill(netenv["pid"], signal.SIGCONT)
    assert wait_until(lambda: not banner(), timeout=15), text(browser, "#banner")
    show(browser, "connections")
    assert browser.console_errors() == []


# --- a narrow window -------------------------------------------------------------------------------------------

OVERFLOW = """const w = document.documentElement.clientWidth;
return [...document.querySelectorAll('body *')].filter((e) => e.getClientRects().length
    && !e.closest('.conn-scroll') && e.getBoundingClientRect().right > w + 1)
    .map((e) => e.tagName + '#' + e.id + '.' + e.className);"""


def test_every_view_fits_a_narrow_window(browser: B.Browser) -> None:
    """Nothing sticks out sideways at phone width (the connections list scrolls inside its own box)."""
    size = browser.run(lambda d: d.get_window_size())
    browser.run(lambda d: d.set_window_size(400, 800))
    try:
        for view in ("connections", "rules", "settings", "status"):
            show(browser, view)
            time.sleep(0.3)  # the view's first answers are in
            sticking_out = browser.run(lambda d: d.execute_script(OVERFLOW))
            assert sticking_out == [], (view, sticking_out)
            browser.screenshot(f"panel/narrow-{view}")
    finally:
        browser.run(lambda d: d.set_window_size(size["width"], size["height"]))
        show(browser, "connections")


# --- a long history and a busy machine ------------------------------------------------------------------------

HISTORY = 10_000
LIVE_RATE = 50  # new connections per second while the page is watched


def synthetic(i: int, now: float, app: str) -> ConnectionInfo:
    """A closed connection of the history: documentation addresses only, never a packet."""
    return ConnectionInfo(
        conn_id=f"{app}-{i}", started=now - 120 - i * 0.3, protocol="tcp", src_ip=T.HOST_V4, src_port=20000 + i % 40000,
        dst_ip=f"198.51.100.{i % 250 + 1}", dst_port=443, pid=5000 + i % 100, exe=f"/usr/bin/{app}{i % 50:02d}",
        process_name=f"{app}{i % 50:02d}", verdict=int(Verdict.ACCEPT), verb=verdict_verb(Verdict.ACCEPT),
        ended=now - 119 - i * 0.3, state="closed",
    )  # fmt: skip


def publish_live(st: E2E, seconds: float, stop: threading.Event) -> int:
    """LIVE_RATE connections a second on the lab's bus (conn.new, conn.verdict, conn.end), as an interceptor
    under load would publish them; how many."""
    assert st.inst is not None
    ctx = zmq.Context()
    pub = Publisher(ctx, paths.bus_in(st.inst.run_dir))
    probe = Subscriber(ctx, paths.bus_out(st.inst.run_dir), ["conn.end"])
    while probe.recv_frames(timeout=0.05) is None:  # until what we publish flows through the bus
        pub.publish(ConnEnd(conn_id="synthlive-warmup", ts=time.time()))
    probe.close()
    proc = ProcessInfo(pid=4343, ppid=1, uid=0, name="synthlive", exe="/usr/bin/synthlive", cmdline=["synthlive"])
    sent, t0 = 0, time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            conn_id, now = f"synthlive-{sent}", time.time()
            pub.publish(ConnNew(conn_id=conn_id, ts=now, ip_version=4, protocol=6, src_ip=T.HOST_V4,
                                src_port=30000 + sent, dst_ip="198.51.100.99", dst_port=443, process=proc))  # fmt: skip
            pub.publish(ConnVerdict(conn_id=conn_id, ts=now, verdict=Verdict.ACCEPT, reason="synthetic"))
            pub.publish(ConnEnd(conn_id=conn_id, ts=now + 0.01, reason="closed"))
            sent += 1
            time.sleep(max(0.0, sent / LIVE_RATE - (time.monotonic() - t0)))
    finally:
        pub.close()
        ctx.term()
    return sent


def total_shown(b: B.Browser) -> tuple[int, int]:
    """(rows the filters let through, rows in the page) from the line under the list."""
    numbers = [int(n) for n in re.findall(r"\d+", text(b, "#shown-count"))]
    return (numbers[0], numbers[-1]) if numbers else (0, 0)


def test_ten_thousand_connections_of_history_and_fifty_new_a_second_stay_usable_by_keyboard(
    st: E2E, browser: B.Browser, leaks: Leaks
) -> None:
    assert st.inst is not None
    now = time.time()
    db = StateDB.open(st.inst.paths.state_db)  # the controller's history, as if it had seen them
    try:
        db.save_connections(synthetic(i, now, "synth") for i in range(HISTORY))
    finally:
        db.close()
    browser.run(lambda d: d.get(f"{BASE}/"))
    assert wait_until(lambda: total_shown(browser)[1] >= HISTORY, timeout=30), text(browser, "#shown-count")
    assert len(rows(browser)) < 100  # virtualised: only what is in view is in the DOM

    focused = "return document.activeElement && document.activeElement.dataset.connId;"
    top = rows(browser)[0]["id"]
    focus(browser, f'tr[data-conn-id="{top}"]')
    press(browser, Keys.END)  # the oldest the page keeps (it keeps the newest 10,000)
    oldest = lambda: re.fullmatch(r"synth-(\d+)", browser.run(lambda d: d.execute_script(focused)) or "")  # noqa: E731
    assert wait_until(lambda: oldest() is not None, timeout=5), browser.run(lambda d: d.execute_script(focused))
    last = int(oldest().group(1))  # type: ignore[union-attr]
    assert last >= HISTORY - 100 and rows(browser)[-1]["id"] == f"synth-{last}"
    press(browser, Keys.ARROW_UP)
    assert browser.run(lambda d: d.execute_script(focused)) == f"synth-{last - 1}"
    press(browser, Keys.ENTER)
    app = f"synth{(last - 1) % 50:02d}"
    assert wait_until(lambda: app in text(browser, "#info-title"), timeout=5), text(browser, "#info")
    press(browser, Keys.HOME)
    assert browser.run(lambda d: d.execute_script(focused)) == top
    press(browser, Keys.ESCAPE)
    assert wait_until(lambda: not browser.run(lambda d: d.find_element(By.ID, "info").is_displayed()), timeout=5)

    type_into(browser, "text-filter", "synth07")
    assert wait_until(lambda: total_shown(browser)[0] == HISTORY // 50, timeout=5), text(browser, "#shown-count")
    assert all("synth07" in r["text"] for r in rows(browser)), rows(browser)
    type_into(browser, "text-filter", "curl")

    leaks.allow(SPLIT_SERVER, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        live = pool.submit(publish_live, st, 6.0, stop)
        try:
            time.sleep(1.0)  # the page is busy with the synthetic stream when the curl comes
            before = {r["id"] for r in rows(browser)}
            st.lab.exec("host", ["curl", "-s", "--max-time", "5", f"http://{SPLIT_SERVER}/"], check=True)
            new_split = lambda: [r for r in rows(browser) if r["id"] not in before and r["split"]]  # noqa: E731
            assert wait_until(lambda: new_split() != [], timeout=5), rows(browser)
        except BaseException:
            stop.set()
            raise
        sent = live.result()
    type_into(browser, "text-filter", "synthlive")
    assert wait_until(lambda: total_shown(browser)[0] >= sent, timeout=10), (text(browser, "#shown-count"), sent)
    browser.screenshot("panel/connections-10k")
    type_into(browser, "text-filter", "")
    assert browser.console_errors() == []
