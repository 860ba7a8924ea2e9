"""The API's HTTP policy: who may do what, decided from a request's facts alone (no sockets, no clock of its own).

What local web APIs get wrong, and what this refuses:
- DNS rebinding: a web page's name resolving to 127.0.0.1 reaches the port, but its Host header carries the
  page's name. Only loopback names and addresses are accepted as Host (403).
- CSRF: a page may make the browser send a POST with the user's cookie. A state-changing request must carry
  no Origin (a script, curl) or the API's own (same scheme, host and port); anything else is 403. No CORS
  headers are ever sent, so no other origin can read an answer either.
- Guessing tokens: every request needs the read or the admin token (`Authorization: Bearer …`) or a session
  cookie from a one-time login code; after `FAILURES_ALLOWED` wrong tokens or login codes in `FAILURE_WINDOW`
  seconds a source is refused (429) until the window passes, and only its first failure per window is logged.
  A request that presents no token (a browser opening the panel before logging in) is refused but not counted.
- Levels: read (status, connections, counts, notifications, options) vs admin (anything that changes state);
  the read token on an admin endpoint is 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.access import ADMIN, LEVELS, Tokens

SAFE_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
FAILURES_ALLOWED = 10
FAILURE_WINDOW = 60.0
LOGIN_CODE_SECONDS = 120.0
SESSION_SECONDS = 12 * 3600.0
SESSION_COOKIE = "splittun_session"


@dataclass(frozen=True)
class RequestFacts:
    """What the policy looks at: headers as sent (None when absent) and the peer's address."""

    method: str
    host: str | None
    origin: str | None
    authorization: str | None
    session: str | None  # the session cookie's value
    source: str  # the peer's IP address


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    log: bool = False  # a failed authentication worth one log line (the source's first in its window)


def split_host(host: str) -> tuple[str, str]:
    """`name:port`, `[v6]:port`, `name` → (name, port or "")."""
    host = host.strip()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.removeprefix(":")
    if host.count(":") > 1:  # a bare IPv6 address
        return host, ""
    name, _, port = host.partition(":")
    return name, port


def is_loopback_name(name: str) -> bool:
    name = name.lower().rstrip(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: str | None) -> bool:
    """Only loopback names and addresses (DNS-rebinding protection); a port, if any, must be a number."""
    if not host:
        return False
    name, port = split_host(host)
    return is_loopback_name(name) and (port == "" or port.isdigit())


def origin_allowed(method: str, origin: str | None, host: str | None) -> bool:
    """Safe methods always; others with no Origin, or with the API's own origin (same host and port)."""
    if method.upper() in SAFE_METHODS or origin is None:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        return False
    return host_allowed(parts.netloc) and parts.netloc.lower() == host.strip().lower()


class FailureLimiter:
    """Failed authentications per source in a sliding window. Thread-safe; the clock is the caller's."""

    def __init__(self, allowed: int = FAILURES_ALLOWED, window: float = FAILURE_WINDOW) -> None:
        self.allowed = allowed
        self.window = window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, source: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(source, []) if t > now - self.window]
        if times:
            self._failures[source] = times
        else:
            self._failures.pop(source, None)
        return times

    def blocked(self, source: str, now: float) -> bool:
        with self._lock:
            return len(self._recent(source, now)) >= self.allowed

    def fail(self, source: str, now: float) -> bool:
        """Count a failure; True when it is the source's first in the window (the one to log)."""
        with self._lock:
            times = self._recent(source, now)
            times.append(now)
            self._failures[source] = times
            return len(times) == 1


class Expiring:
    """Random secrets that are valid for a while: one-time login codes and browser sessions. Thread-safe."""

    def __init__(self, lifetime: float, once: bool) -> None:
        self.lifetime = lifetime
        self.once = once
        self._items: dict[str, tuple[float, str]] = {}  # secret → (expiry, level)
        self._lock = threading.Lock()

    def issue(self, level: str, now: float) -> str:
        secret = secrets.token_urlsafe(24)
        with self._lock:
            self._items = {k: v for k, v in self._items.items() if v[0] > now}
            self._items[secret] = (now + self.lifetime, level)
        return secret

    def level(self, secret: str, now: float) -> str | None:
        """The level the secret grants, or None (unknown, expired, or — for one-time codes — used)."""
        with self._lock:
            item = self._items.pop(secret, None) if self.once else self._items.get(secret)
        if item is None or item[0] <= now:
            return None
        return item[1]


def token_level(authorization: str | None, tokens: Tokens) -> str | None:
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    value = value.strip()
    for level in reversed(LEVELS):  # admin first
        if hmac.compare_digest(value.encode(), getattr(tokens, level).encode()):
            return level
    return None


def decide(
    req: RequestFacts, needed: str, tokens: Tokens, sessions: Expiring, limiter: FailureLimiter, now: float
) -> str | Refusal:
    """The level the request is granted, or why it is refused. `needed` is the endpoint's level."""
    if not host_allowed(req.host):
        return Refusal(403, "forbidden_host", f"Host {req.host!r} is not a loopback name or address")
    if not origin_allowed(req.method, req.origin, req.host):
        return Refusal(403, "cross_origin", f"Origin {req.origin!r} may not change anything here")
    if limiter.blocked(req.source, now):
        return Refusal(429, "too_many_failures", f"too many failed logins from {req.source}; wait a minute")
    level = token_level(req.authorization, tokens)
    if level is None and req.session:
        level = sessions.level(req.session, now)
    if level is None and not req.authorization:
        # No token presented: nothing was guessed (a browser opening / before logging in, or sending a cookie
        # from before a restart), so it neither counts towards the limit nor fills the log.
        why = "session expired" if req.session else "token missing"
        return Refusal(401, "unauthorized", f"{why}: send Authorization: Bearer <token> or log in with splittun ui")
    if level is None:
        first = limiter.fail(req.source, now)
        return Refusal(401, "unauthorized", "token wrong: send Authorization: Bearer <token>", log=first)
    if needed == ADMIN and level != ADMIN:
        return Refusal(403, "forbidden", "this needs the admin token")
    return level
