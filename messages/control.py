"""Request/reply bodies of the control plane (never on the per-packet path).

A client sends `Request{op, args}`; the server answers `Reply{ok, result}` or
`Reply{ok: false, error: {code, message}}`. Codes are short words a script can branch on.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from .schema import Struct, record

BAD_REQUEST = "bad_request"  # undecodable or schema-invalid request
UNKNOWN_OP = "unknown_op"
INVALID_ARGUMENT = "invalid_argument"
NOT_FOUND = "not_found"
INTERNAL = "internal"  # the handler failed; the server keeps running
UNAVAILABLE = "unavailable"  # client side: nobody answered in time


@record
class Request(Struct):
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@record
class ErrorInfo(Struct):
    code: str
    message: str


@record
class Reply(Struct):
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


class RequestFailed(Exception):
    """Raised by a handler to answer with an error, or by `request()` when the answer is an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
