"""`splittun notifications [list|respond ID ACTION|reset]`: what the controller has to tell, answered from here.

The same ops the API's notification endpoints send (messages/control.py: notifications, notifications.respond,
notifications.reset).
"""

from __future__ import annotations

import argparse
import json
import time

from messages.control import Controller, NoArgs, NotificationResponse, NotificationsArgs
from splittun.output import duration, table

from . import OK
from .connections import ask


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("notifications", help="notifications: list, respond to one, reset all")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list, all=False)
    nsub = p.add_subparsers(dest="notifications_command", metavar="{list,respond,reset}")
    lp = nsub.add_parser("list", help="the notifications showing now (--all: also answered and expired ones)")
    lp.add_argument("--all", action="store_true")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=cmd_list)
    rp = nsub.add_parser("respond", help="answer a notification with one of its actions (suppress: don't show again)")
    rp.add_argument("id")
    rp.add_argument("action")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_respond)
    xp = nsub.add_parser("reset", help="delete every notification state and every 'don't show again' marker")
    xp.set_defaults(func=cmd_reset)


def cmd_list(args: argparse.Namespace) -> int:
    notes = ask(Controller.NOTIFICATIONS, NotificationsArgs(all=args.all))
    if args.json:
        print(json.dumps(notes))
        return OK
    if not notes:
        print("no notifications")
        return OK
    now = time.time()
    rows = [
        [
            n["id"],
            n["level"],
            n["state"] + (f" ({n['responded']})" if n["responded"] else ""),
            duration(now - n["ts"]) + " ago",
            n["title"],
            ", ".join(a["id"] for a in n["actions"]) or "-",
        ]
        for n in notes
    ]
    print(table(["ID", "LEVEL", "STATE", "WHEN", "TITLE", "ACTIONS"], rows))
    for n in notes:
        print(f"\n{n['id']}: {n['message']}")
    return OK


def cmd_respond(args: argparse.Namespace) -> int:
    note = ask(Controller.RESPOND, NotificationResponse(id=args.id, action=args.action))
    if args.json:
        print(json.dumps(note))
    else:
        print(f"{note['id']}: {note['responded']} → {note['state']}")
    return OK


def cmd_reset(args: argparse.Namespace) -> int:
    done = ask(Controller.RESET_NOTIFICATIONS, NoArgs())
    print(f"deleted {done['notifications']} notification(s) and {done['markers']} 'don't show again' marker(s)")
    return OK
