"""The web panel's static files: found inside the package, served as they are, behind a strict CSP.

The panel (actors/api/panel/) is plain HTML, CSS and ES modules, no build step and nothing fetched from
elsewhere, so it works offline and what ships is what runs. Serving is decided here without I/O (which file a
request path names, its content type, the headers) so it is unit-testable; http.py only reads the bytes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath

PANEL_PACKAGE = "actors.api"
PANEL_DIR = "panel"
INDEX = "index.html"
LOGIN = "login.html"  # what / shows a browser without a session: how to get one
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# No inline script or style, nothing from another origin, no framing; fetch/SSE only to this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def asset_name(path: str) -> str | None:
    """The panel file a URL path under /panel/ names, or None (hidden, traversal, unknown type)."""
    parts = PurePosixPath(path).parts
    if not parts or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
        return None
    if PurePosixPath(path).suffix not in CONTENT_TYPES:
        return None
    return "/".join(parts)


def content_type(name: str) -> str:
    return CONTENT_TYPES[PurePosixPath(name).suffix]


def read_asset(name: str) -> bytes | None:
    """The file's bytes from the installed package, or None when there is no such file."""
    node = resources.files(PANEL_PACKAGE).joinpath(PANEL_DIR)
    for part in name.split("/"):
        node = node.joinpath(part)
    try:
        return node.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
