"""A real browser inside a lab namespace: Debian's chromium, driven by Selenium through chromium-driver.

The panel listens on the lab host's loopback, so the browser must run there too. chromedriver is started
from a thread that entered the host namespace (tests/support/proxy.InNetns): the processes it forks, and the
sockets Selenium opens to it from that thread, live in the namespace. Every driver call therefore goes through
`Browser.run`, which runs it on that thread.

The browser is told not to talk to anybody but the page (no updates, sync, metrics, DNS prefetch): the leak
monitor would count any such packet, and rightly so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.support.proxy import InNetns

T = TypeVar("T")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SPLITTUN_ARTIFACTS", "test-artifacts"))
QUIET_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--window-size=1280,800",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--dns-prefetch-disable",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # resolve nothing, ask no nameserver
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,NetworkTimeServiceQuerying",
)


def unavailable_reason() -> str | None:
    """Why no browser test can run here (None when chromium and chromium-driver and selenium are all there)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        return f"{' and '.join(missing)} missing: `make deps` installs chromium and chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing: `make venv` installs the dev extra"
    return None


class Browser:
    """One headless chromium in a namespace; `run(fn)` calls fn(driver) on the namespace's thread."""

    def __init__(self, netns: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.thread = InNetns(netns)
        self.profile = tempfile.mkdtemp(prefix="splittun-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in QUIET_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=CHROMEDRIVER)
        try:
            self.driver = self.thread.call(webdriver.Chrome, service=service, options=options)
        except BaseException:
            self.thread.close()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def run(self, fn: Callable[[Any], T]) -> T:
        return self.thread.call(fn, self.driver)

    def console_errors(self) -> list[str]:
        """Console messages at SEVERE since the last call (CSP violations, failed loads, exceptions)."""
        entries = self.run(lambda d: d.get_log("browser"))
        return [e["message"] for e in entries if e.get("level") == "SEVERE"]

    def screenshot(self, name: str) -> Path:
        """A PNG of the window at test-artifacts/<name>.png (absolute, so the namespace thread's cwd is moot)."""
        path = (ARTIFACTS / f"{name}.png").absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.run(lambda d: d.save_screenshot(str(path))), f"could not save {path}"
        return path

    def close(self) -> None:
        try:
            self.run(lambda d: d.quit())
        finally:
            self.thread.close()
            shutil.rmtree(self.profile, ignore_errors=True)


@contextmanager
def browser_in(netns: str) -> Iterator[Browser]:
    b = Browser(netns)
    try:
        yield b
    finally:
        b.close()
