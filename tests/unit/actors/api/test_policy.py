"""The API's HTTP policy (actors/api/policy.py): host, origin, tokens, levels, failure limits, login codes."""

from __future__ import annotations

import pytest

from actors.api import policy
from actors.api.policy import Expiring, FailureLimiter, Refusal, RequestFacts, decide
from core.access import ADMIN, READ, Tokens

TOKENS = Tokens(read="read-token", admin="admin-token")
NOW = 1_800_000_000.0


def facts(method: str = "GET", host: str | None = "127.0.0.1:817", origin: str | None = None,
          auth: str | None = "Bearer admin-token", session: str | None = None,
          source: str = "127.0.0.1") -> RequestFacts:  # fmt: skip
    return RequestFacts(method=method, host=host, origin=origin, authorization=auth, session=session, source=source)


def run(req: RequestFacts, needed: str = READ, limiter: FailureLimiter | None = None,
        sessions: Expiring | None = None) -> str | Refusal:  # fmt: skip
    return decide(req, needed, TOKENS, sessions or Expiring(60, once=False), limiter or FailureLimiter(), NOW)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1:817", True), ("localhost:817", True), ("[::1]:817", True), ("127.0.0.5", True), ("::1", True),
     ("LOCALHOST", True), ("evil.example:817", False), ("127.0.0.1.evil.example", False), ("192.0.2.1:817", False),
     ("", False), (None, False), ("localhost:abc", False), ("[::ffff:192.0.2.1]:817", False)],
)  # fmt: skip
def test_host_must_be_loopback(host: str | None, allowed: bool) -> None:
    assert policy.host_allowed(host) is allowed


@pytest.mark.parametrize(
    ("method", "origin", "allowed"),
    [("GET", "http://evil.example", True),  # reading: the browser keeps the answer from that page (no CORS)
     ("POST", None, True),  # curl, scripts
     ("POST", "http://127.0.0.1:817", True),  # the API's own page
     ("POST", "http://localhost:817", False),  # another origin, even if loopback
     ("POST", "http://127.0.0.1:8080", False),
     ("DELETE", "http://evil.example", False),
     ("PUT", "null", False),
     ("POST", "file://", False)],
)  # fmt: skip
def test_state_changes_need_no_origin_or_our_own(method: str, origin: str | None, allowed: bool) -> None:
    assert policy.origin_allowed(method, origin, "127.0.0.1:817") is allowed


def test_levels() -> None:
    assert run(facts()) == ADMIN
    assert run(facts(auth="Bearer read-token")) == READ
    assert run(facts(auth="bearer read-token"), READ) == READ
    refused = run(facts(auth="Bearer read-token"), ADMIN)
    assert isinstance(refused, Refusal) and (refused.status, refused.code) == (403, "forbidden")


def test_refusals_in_order() -> None:
    assert run(facts(host="evil.example:817")).status == 403  # DNS rebinding: before anything else
    assert run(facts(method="POST", origin="http://evil.example"), ADMIN).code == "cross_origin"
    missing = run(facts(auth=None))
    assert (missing.status, missing.log) == (401, False) and "missing" in missing.message
    assert run(facts(auth="Bearer nope")).status == 401
    assert run(facts(auth="Basic YWRtaW46YWRtaW4=")).status == 401


def test_failed_logins_are_limited_and_logged_once_per_source() -> None:
    limiter = FailureLimiter(allowed=3, window=60)
    logged = [run(facts(auth="Bearer guess"), limiter=limiter).log for _ in range(3)]
    assert logged == [True, False, False]
    blocked = run(facts(), limiter=limiter)  # even the right token, until the window passes
    assert isinstance(blocked, Refusal) and blocked.status == 429
    assert run(facts(source="127.0.0.2"), limiter=limiter) == ADMIN  # per source
    assert decide(facts(), READ, TOKENS, Expiring(60, once=False), limiter, NOW + 61) == ADMIN


def test_only_a_wrong_token_counts_as_a_failed_login() -> None:
    """A browser opening / without a session (or with one from before a restart) guessed nothing."""
    limiter = FailureLimiter(allowed=3, window=60)
    for _ in range(5):
        assert run(facts(auth=None), limiter=limiter).status == 401
        assert run(facts(auth=None, session="from-before-a-restart"), limiter=limiter).status == 401
    assert run(facts(), limiter=limiter) == ADMIN
    for _ in range(3):
        run(facts(auth="Bearer guess"), limiter=limiter)
    assert run(facts(), limiter=limiter).status == 429


def test_login_codes_work_once_and_sessions_until_they_expire() -> None:
    codes = Expiring(120, once=True)
    code = codes.issue(ADMIN, NOW)
    assert codes.level(code, NOW + 1) == ADMIN and codes.level(code, NOW + 2) is None
    assert codes.level(codes.issue(ADMIN, NOW), NOW + 121) is None
    sessions = Expiring(3600, once=False)
    session = sessions.issue(ADMIN, NOW)
    assert run(facts(auth=None, session=session), ADMIN, sessions=sessions) == ADMIN
    assert run(facts(auth=None, session=session), ADMIN, sessions=sessions) == ADMIN  # not used up
    assert run(facts(auth=None, session="forged"), sessions=sessions).status == 401
