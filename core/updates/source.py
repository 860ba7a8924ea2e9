"""Where updates come from: a directory or an https URL, holding `index.json` and the files it names.

`open_source(text)` picks one from the `splittun/updateSource` option: an absolute path (or file:// URL) is a
directory, https://… a web server verified against the system's CAs or the configured CA file. Plain http is
refused, also as a redirect target: the index carries the hashes, so it must come over a verified channel. Every
failure is an `UpdateError` with one line naming the source and the problem; a read never returns more than the
caller's limit (a file larger than its index says is an error, not a memory problem).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

INDEX_FILE = "index.json"
TIMEOUT = 10.0


class UpdateError(Exception):
    """An update that cannot go ahead; `str()` is the one line the user sees. Nothing in force changed."""


class Source(Protocol):
    url: str

    def read(self, name: str, limit: int) -> bytes:
        """The file `name` next to the index, at most `limit` bytes (more is an UpdateError)."""
        ...


class DirSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = str(path)

    def read(self, name: str, limit: int) -> bytes:
        try:
            with open(self.path / name, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise UpdateError(f"source {self.url}: no {name} there") from None
        except OSError as exc:
            raise UpdateError(f"source {self.url}: cannot read {name}: {exc.strerror or exc}") from None
        return _within(self.url, name, data, limit)


class HttpsSource:
    """ssl, urllib and http.client are imported here, not with the module: the controller imports this module
    for UpdateError but never downloads (the CLI does), and they were ~2 MiB of its resident memory."""

    def __init__(self, url: str, cafile: str = "", timeout: float = TIMEOUT) -> None:
        import ssl
        import urllib.request

        self.url = url.rstrip("/")
        self.timeout = timeout
        try:
            context = ssl.create_default_context(cafile=cafile or None)
        except (OSError, ssl.SSLError) as exc:
            raise UpdateError(f"CA file {cafile}: cannot be used ({getattr(exc, 'strerror', None) or exc})") from None
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _https_only_redirects())

    def read(self, name: str, limit: int) -> bytes:
        import ssl
        import urllib.error
        from http.client import HTTPException, IncompleteRead

        url = f"{self.url}/{name}"
        try:
            with self.opener.open(url, timeout=self.timeout) as reply:
                data = reply.read(limit + 1)
                if len(data) <= limit and reply.length:  # bytes the server announced but never sent
                    raise IncompleteRead(data, reply.length)
        except urllib.error.HTTPError as exc:
            raise UpdateError(f"source {self.url}: {name}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                text = f"certificate verify failed: {reason.verify_message}"
            else:
                text = getattr(reason, "strerror", None) or str(reason)
            raise UpdateError(f"source {self.url}: unreachable ({text})") from None
        except HTTPException as exc:  # IncompleteRead: the server closed before Content-Length bytes
            raise UpdateError(f"source {self.url}: {name}: download cut short ({type(exc).__name__})") from None
        except (TimeoutError, OSError) as exc:
            text = getattr(exc, "strerror", None) or str(exc) or "timed out"
            raise UpdateError(f"source {self.url}: {name}: {text}") from None
        return _within(self.url, name, data, limit)


def _https_only_redirects() -> Any:
    """A redirect handler that may move the source, never off https (an index fetched in the clear could name
    any hashes)."""
    import urllib.error
    import urllib.request

    class HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            if urlsplit(newurl).scheme != "https":
                raise urllib.error.URLError(f"redirected to {newurl}, which is not https")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return HttpsOnlyRedirects


def _within(url: str, name: str, data: bytes, limit: int) -> bytes:
    if len(data) > limit:
        raise UpdateError(f"source {url}: {name} is larger than {limit} bytes")
    return data


def open_source(text: str, cafile: str = "", timeout: float = TIMEOUT) -> Source:
    """The source the option names; UpdateError when it names none or something splittun does not fetch from."""
    text = text.strip()
    if not text:
        raise UpdateError("no update source configured: set splittun/updateSource to a directory or an https URL")
    parts = urlsplit(text)
    if parts.scheme == "https":
        if not parts.hostname:
            raise UpdateError(f"source {text}: no host in the URL")
        return HttpsSource(text, cafile, timeout)
    if parts.scheme == "file":
        return DirSource(Path(parts.path))
    if parts.scheme == "" and text.startswith("/"):
        return DirSource(Path(text))
    raise UpdateError(f"source {text}: expected an absolute directory path or an https:// URL")
