"""CLI command modules. Each has `register(subparsers)` adding its subcommands with `func=` handlers.

A handler gets the parsed args and returns an exit code; a user mistake raises `UserError`, which
`splittun.cli` prints as one line (no traceback).
"""

from __future__ import annotations

import os
from typing import Any

from messages.control import UNAVAILABLE, Op, RequestFailed, to_plain
from runtime import paths
from runtime.paths import Home, HomeError
from runtime.transport import ask

# Exit codes
OK = 0
FAILED = 1
USER_ERROR = 2
NOT_RUNNING = 3


class UserError(Exception):
    """Something the user can fix; printed as `splittun: <message>`."""

    def __init__(self, message: str, code: int = USER_ERROR) -> None:
        super().__init__(message)
        self.code = code


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise UserError(f"{action} needs root (it manages firewall rules, routes and namespaces): use sudo")


def current_home() -> Home:
    try:
        home = Home.from_env()
        home.check()
    except HomeError as exc:
        raise UserError(str(exc)) from None
    return home


def ask_actor(action: str, instance: str, op: Op[Any, Any], args: Any = None) -> Any:
    """`op` asked of a running actor instance for `action` (a `splittun ...` command), answered as plain maps and
    lists (what --json prints); a refusal is the command's one-line error (exit NOT_RUNNING when the actor is
    not there, FAILED otherwise)."""
    require_root(action)
    home = current_home()
    try:
        return to_plain(ask(paths.actor_endpoint(home.run_dir, instance), op, args, timeout=3, who=instance))
    except RequestFailed as exc:
        raise UserError(str(exc), NOT_RUNNING if exc.code == UNAVAILABLE else FAILED) from None


def prepared_home() -> Home:
    """`current_home()` with its directories made, for the commands that write there (up, config edits)."""
    home = current_home()
    try:
        home.prepare()
    except HomeError as exc:
        raise UserError(str(exc)) from None
    return home
