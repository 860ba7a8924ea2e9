"""`make demo`: splittun running inside the lab, shown the way a user would check it, then torn down.

Everything is built in namespaces of our own (`splittun-demo-*`) and removed at the end, also when a
step fails or the demo is interrupted. Each shell command is printed before its output.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from splittun.lab import Lab, LabError
from splittun.lab import topology as T

LAB_NAME = "demo"


class Demo:
    def __init__(self) -> None:
        self.lab = Lab(name=LAB_NAME, style="replaced")
        self.home = Path(tempfile.mkdtemp(prefix="splittun-demo-", dir="/tmp"))
        self.env = {**os.environ, "SPLITTUN_HOME": str(self.home)}
        self.env.pop("SPLITTUN_RUN_DIR", None)

    # --- output -----------------------------------------------------------------------------------

    @staticmethod
    def step(title: str) -> None:
        print(f"\n=== {title}", flush=True)

    def sh(self, argv: list[str], *, ns: str | None = "host", check: bool = True, shown: str | None = None) -> str:
        """Run a command (in a lab namespace), print it as a user would type it, then its output."""
        full = [*(["ip", "netns", "exec", self.lab.ns(ns)] if ns else []), *argv]
        where = f"[{ns}] " if ns else ""
        print(f"{where}$ {shown or shlex.join(argv)}", flush=True)
        result = subprocess.run(full, env=self.env, capture_output=True, text=True, timeout=120)
        output = (result.stdout + result.stderr).rstrip()
        if output:
            print("\n".join("    " + line for line in output.splitlines()), flush=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{shown or shlex.join(argv)} failed with exit {result.returncode}")
        return result.stdout

    def splittun(self, *args: str, check: bool = True) -> str:
        return self.sh(
            [sys.executable, "-m", "splittun.cli", *args], check=check, shown=shlex.join(["splittun", *args])
        )

    # --- the story --------------------------------------------------------------------------------

    def run(self) -> None:
        self.step(f"Build the lab: a laptop ({self.lab.ns('host')}) on a VPN, its ISP, the VPN server, the internet")
        self.lab.up()
        self.sh(["ip", "-brief", "address"])
        self.sh(["ip", "route"])

        self.step("What the internet sees today: everything leaves through the VPN")
        self.sh(["curl", "-s", "--max-time", "5", f"http://{T.WHOAMI_V4}/"])
        self.sh(["curl", "-s", "--max-time", "5", f"http://[{T.WHOAMI_V6}]/"])
        print(f"    (the VPN server's exit address is {T.VPNSRV_V4}; the ISP gave this laptop {T.HOST_V4})")

        self.step("Start splittun inside the laptop's namespace (supervisord runs the bus and the six actors)")
        self.splittun("up")
        self.splittun("status")

        self.step("Watch the bus for a few seconds (any program with pyzmq + msgpack can do the same)")
        self.splittun("events", "--duration", "3")

        self.step("Tear everything down")
        self.splittun("down")

    def cleanup(self) -> None:
        self.step("Cleanup")
        if self.lab.exists():
            subprocess.run(
                ["ip", "netns", "exec", self.lab.ns("host"), sys.executable, "-m", "splittun.cli", "down"],
                env=self.env,
                capture_output=True,
                timeout=60,
            )
        self.lab.down()
        shutil.rmtree(self.home, ignore_errors=True)
        left = [
            ns
            for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ns.startswith(f"{T.NS_PREFIX}{LAB_NAME}-")
        ]
        print("    lab namespaces left: " + (", ".join(left) if left else "none"), flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces): run it with sudo", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    demo = Demo()
    try:
        demo.run()
    except (RuntimeError, LabError, subprocess.TimeoutExpired) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        demo.cleanup()
    print("\nDone: every namespace, process and file the demo made is gone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
