"""The `splittun` command. Subcommands live in splittun/commands/; this only wires them together."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from splittun import __version__
from splittun.commands import (
    FAILED,
    USER_ERROR,
    UserError,
    api,
    configure,
    connections,
    interfaces,
    lifecycle,
    notifications,
    presets,
)
from splittun.commands import dns as dns_cmd
from splittun.commands import events as events_cmd
from splittun.commands import ivpn as ivpn_cmd
from splittun.commands import lab as lab_cmd

COMMAND_MODULES = (
    lifecycle, configure, connections, events_cmd, lab_cmd, interfaces, presets, notifications, api, dns_cmd,
    ivpn_cmd,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splittun",
        description="Per-application split tunnelling beside a VPN. SPLITTUN_HOME selects the instance.",
    )
    parser.add_argument("--version", action="version", version=f"splittun {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"splittun: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `splittun … | head`: the reader is gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PermissionError as exc:
        print(f"splittun: permission denied: {exc.filename or exc} (run as root)", file=sys.stderr)
        return USER_ERROR
    except OSError as exc:
        print(f"splittun: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
