"""The web panel's files (actors/api/panel/): shipped in the package, nothing inline, nothing from elsewhere."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources

import pytest

from actors.api import panel


class _Refs(HTMLParser):
    """Every URL the page loads and everything the CSP would have to allow inline."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name, value in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"{tag} {name}={value!r}")
        if tag == "script":
            self._in_script = True
            self.urls.append(a.get("src") or "")
        if tag == "link" and a.get("rel") != "icon":
            self.urls.append(a.get("href") or "")
        if tag == "style":
            self.inline.append("<style>")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline script")


@pytest.mark.parametrize("page", [panel.INDEX, panel.LOGIN])
def test_the_page_loads_only_its_own_files_and_has_nothing_inline(page: str) -> None:
    index = panel.read_asset(page)
    assert index is not None
    refs = _Refs()
    refs.feed(index.decode())
    assert refs.inline == []
    assert refs.urls and all(u.startswith("/panel/") for u in refs.urls), refs.urls
    for url in refs.urls:
        assert panel.read_asset(url.removeprefix("/panel/")) is not None, url


def test_every_module_import_is_a_shipped_file() -> None:
    shipped = resources.files(panel.PANEL_PACKAGE).joinpath(panel.PANEL_DIR).iterdir()
    modules = sorted(f.name for f in shipped if f.name.endswith(".js"))
    assert {"app.js", "api.js", "format.js", "rules.js"} <= set(modules)
    for name in modules:
        text = (panel.read_asset(name) or b"").decode()
        assert text, name
        for target in re.findall(r'from\s+"([^"]+)"', text):
            assert target.startswith("./"), f"{name} imports {target} (only the panel's own modules)"
            assert panel.read_asset(target.removeprefix("./")) is not None, target


def test_the_csp_forbids_inline_script_and_other_origins() -> None:
    assert "'unsafe-inline'" not in panel.CSP and "'unsafe-eval'" not in panel.CSP
    assert "http:" not in panel.CSP and "https:" not in panel.CSP and "*" not in panel.CSP
    directives = dict(d.strip().split(" ", 1) for d in panel.CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", ["../http.py", "a/../../x.js", ".hidden.js", "policy.py", "", "x\\..\\y.js"])
def test_paths_outside_the_panel_or_of_other_types_are_not_served(path: str) -> None:
    assert panel.asset_name(path) is None


def test_a_known_file_has_its_content_type_and_an_unknown_one_is_absent() -> None:
    assert panel.asset_name("app.js") == "app.js"
    assert panel.content_type("app.js").startswith("text/javascript")
    assert panel.read_asset("nosuch.js") is None
