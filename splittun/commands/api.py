"""`splittun api token [--read]` and `splittun ui [--open]`: reaching the local HTTP API (actors/api).

The tokens are files `up` wrote in the run directory (core/access.py); `ui` asks the api actor (its `login`
op) for a one-time login URL, so a browser gets a session cookie and never the token.
"""

from __future__ import annotations

import argparse
import webbrowser

from core import access
from messages.control import Api, NoArgs

from . import FAILED, NOT_RUNNING, OK, UserError, ask_actor, current_home, require_root


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("api", help="the local HTTP API (http://127.0.0.1:817/api/v1/)")
    asub = p.add_subparsers(dest="api_command", required=True, metavar="{token}")
    t = asub.add_parser("token", help="print the admin token (--read: the read-only one) for Authorization: Bearer")
    t.add_argument("--read", action="store_true", help="the read token: status, connections, counts, notifications")
    t.set_defaults(func=cmd_token)

    p = sub.add_parser("ui", help="print a one-time login URL for a browser (the code works once, for 2 minutes)")
    p.add_argument("--open", action="store_true", help="also open it in the default browser")
    p.set_defaults(func=cmd_ui)


def cmd_token(args: argparse.Namespace) -> int:
    require_root("splittun api token")
    home = current_home()
    try:
        tokens = access.load(home.run_dir)
    except OSError:
        raise UserError("no API token: splittun is not running ('splittun up' makes them)", NOT_RUNNING) from None
    print(tokens.read if args.read else tokens.admin)
    return OK


def cmd_ui(args: argparse.Namespace) -> int:
    url = ask_actor("splittun ui", "api", Api.LOGIN, NoArgs())["url"]
    print(url)
    if args.open and not webbrowser.open(url):
        raise UserError("no browser to open here: copy the URL above", FAILED)
    return OK
