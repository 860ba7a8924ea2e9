"""`make demo`: splittun running inside the lab, shown the way a user would check it, then torn down.

Everything is built in namespaces of our own (`splittun-demo-*`) and removed at the end, also when a
step fails or the demo is interrupted. Each shell command is printed before its output. The lab's leak
monitor watches the laptop's physical link the whole time: the demo fails if anything but the VPN's own
transport, the lab's probes, link housekeeping and the split connections it shows left through it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from splittun.lab import Lab, LabError
from splittun.lab import topology as T
from splittun.lab.geodns import GEO_NAME, GeoDns
from splittun.lab.ivpn import (
    IvpnDaemonError,
    IvpnDaemonProcess,
    kill_switch_off,
    kill_switch_on,
    physical_link_blocked,
)
from splittun.lab.leakmon import LeakMonitor, LeakMonitorError, LeakReport

LAB_NAME = "demo"
PANEL_PORT = 8817  # `--keep`: the web panel forwarded to this port on the machine's own loopback


class Demo:
    def __init__(self, keep: float = 0.0) -> None:
        self.keep = keep  # seconds splittun stays up for a person to look at the web panel (0 = don't wait)
        self.lab = Lab(name=LAB_NAME, style="replaced")
        self.home = Path(tempfile.mkdtemp(prefix="splittun-demo-", dir="/tmp"))
        self.env = {**os.environ, "SPLITTUN_HOME": str(self.home)}
        self.env.pop("SPLITTUN_RUN_DIR", None)
        # IVPN's daemon in the lab (splittun.lab.ivpn) writes its port file here; the ivpn actor looks there.
        self.ivpn_port_file = self.home / "ivpn" / "port.txt"
        self.env["SPLITTUN_IVPN_PORT_FILE"] = str(self.ivpn_port_file)
        self.ivpn_daemon: IvpnDaemonProcess | None = None
        self.leaks = LeakMonitor(self.lab)
        # What the demo splits on purpose: curl (TCP) and socat (UDP) to the whoami servers, curl to .81.
        for address in (T.WHOAMI_V4, T.WHOAMI_V6):
            self.leaks.allow(address, "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
            self.leaks.allow(address, "udp", T.WHOAMI_UDP_PORT, via=T.HOST_IF)
        self.leaks.allow(T.SERVER_V4[1], "tcp", T.WHOAMI_TCP_PORT, via=T.HOST_IF)
        for address in (T.ISP_LAN_V4, T.ISP_LAN_V6):  # the split app's DNS, to the ISP's resolver
            for proto in ("udp", "tcp"):
                self.leaks.allow(address, proto, 53, via=T.HOST_IF)
        self.geo = GeoDns(self.lab)

    # --- output -----------------------------------------------------------------------------------

    @staticmethod
    def step(title: str) -> None:
        print(f"\n=== {title}", flush=True)

    def sh(
        self,
        argv: list[str],
        *,
        ns: str | None = "host",
        check: bool = True,
        shown: str | None = None,
        input: str | None = None,
        quiet: bool = False,
    ) -> str:
        """Run a command (in a lab namespace), print it as a user would type it, then its output (unless quiet:
        the caller shows what matters of it)."""
        full = [*(["ip", "netns", "exec", self.lab.ns(ns)] if ns else []), *argv]
        where = f"[{ns}] " if ns else ""
        if not quiet or shown:
            print(f"{where}$ {shown or shlex.join(argv)}", flush=True)
        result = subprocess.run(full, env=self.env, capture_output=True, text=True, timeout=120, input=input)
        output = (result.stdout + result.stderr).rstrip()
        if output and not quiet:
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
        self.lab.up()  # the leak monitor on the physical link captures from here on
        self.sh(["ip", "-brief", "address"])
        self.sh(["ip", "route"])
        before = self.firewall()

        self.step("What the internet sees today: everything leaves through the VPN")
        self.sh(["curl", "-s", "--max-time", "5", f"http://{T.WHOAMI_V4}/"])
        self.sh(["curl", "-s", "--max-time", "5", f"http://[{T.WHOAMI_V6}]/"])
        print(f"    (the VPN server's exit address is {T.VPNSRV_V4}; the ISP gave this laptop {T.HOST_V4})")

        self.step("Start splittun inside the laptop's namespace (supervisord runs the bus and the eight actors)")
        self.splittun("up")
        self.splittun("status")
        self.splittun("interface")

        self.step("Split curl (TCP) and socat (UDP) out of the VPN; everything else stays in")
        self.splittun("rules", "add", "--name", "curl")
        self.splittun("rules", "add", "--name", "socat", "--proto", "udp")
        self.splittun("enable")
        self.splittun("rules", "list")

        self.step("Side by side: the split apps are seen with the ISP address, another app with the VPN's")
        for family, target in ((4, T.WHOAMI_V4), (6, T.WHOAMI_V6)):
            url_host = target if family == 4 else f"[{target}]"
            self.sh(["curl", "-s", "--max-time", "5", f"http://{url_host}/"])
            self.other_app("tcp", family, target)
            self.sh(
                ["socat", "-t", "2", "-", f"UDP{'6' if family == 6 else ''}:{url_host}:{T.WHOAMI_UDP_PORT}"],
                input="hello\n",
            )
            self.other_app("udp", family, target)

        self.dns()
        self.ivpn()

        self.step("The connections, with what the split tunnel did with them")
        self.splittun("connections", "--limit", "12")

        self.step("History survives a restart: kill -9 the controller, supervisord restarts it, ask again")
        self.restart_controller()
        self.splittun("connections", "--since", "10m", "--verdict", "split", "--limit", "4")

        self.step("A notification: a hand edit of the config goes wrong, splittun refuses it and says so")
        self.notification()

        self.step("The local API (loopback :817, bearer token): counts per verdict, as a script would ask")
        token = shlex.join([sys.executable, "-m", "splittun.cli", "api", "token", "--read"])
        url = "http://127.0.0.1:817/api/v1/counts?since=1h"
        self.sh(
            ["sh", "-c", f'curl -s -H "Authorization: Bearer $({token})" {url}'],
            shown=f'curl -s -H "Authorization: Bearer $(splittun api token --read)" {url}',
        )

        self.step("The same story on the bus, live, while curl fetches a page")
        self.events_during(
            ["conn.verdict", "proxy.session"],
            ["curl", "-s", "-o", "/dev/null", "--max-time", "5", f"http://{T.SERVER_V4[1]}/"],
        )

        self.panel()

        self.step("Stop splittun: the firewall is back to exactly what it was")
        self.splittun("down")
        after = self.firewall()
        print(
            "    iptables-legacy-save + ip6tables-legacy-save, before up vs after down: "
            + ("identical" if before == after else "DIFFERENT")
            + "\n    (empty tables are left out: legacy xtables cannot unload a table once it was used)",
            flush=True,
        )
        if before != after:
            raise RuntimeError("the firewall differs after splittun down")

        self.step("What left the laptop's physical link, seen from the ISP's side of it")
        report = self.leaks.report()
        print(f"    {leak_line(report)}", flush=True)
        if report.leaks or report.drops:
            print(report.describe(), flush=True)
            raise RuntimeError("packets left the physical link outside the VPN")

    def restart_controller(self) -> None:
        status = json.loads(
            self.sh(
                [sys.executable, "-m", "splittun.cli", "status", "--json"],
                shown="splittun status --json | jq '.actors[] | select(.actor == \"controller\") | .pid'",
                quiet=True,
            )
        )
        pid = next(a["pid"] for a in status["actors"] if a["actor"] == "controller")
        print(f"    {pid}", flush=True)
        self.sh(["kill", "-9", str(pid)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)
            answer = self.sh([sys.executable, "-m", "splittun.cli", "status", "--json"], check=False, quiet=True)
            try:
                rows = json.loads(answer)["actors"]
            except (ValueError, KeyError):
                continue
            row = next((a for a in rows if a["actor"] == "controller"), None)
            if row and row["pid"] not in (0, pid) and row["heartbeat_age"] is not None:
                print(f"    (supervisord restarted the controller: pid {row['pid']})", flush=True)
                return
        raise RuntimeError("the controller did not come back after kill -9")

    def notification(self) -> None:
        config = self.home / "config.json"
        good = config.read_text()
        self.sh(["sh", "-c", f"echo '{{\"splittun/enable\": \"yes\"}}' > {config}"],
                shown=f"echo '{{\"splittun/enable\": \"yes\"}}' > {config}")  # fmt: skip
        time.sleep(1.0)  # the controller looks at the file four times a second
        self.splittun("notifications")
        self.splittun("notifications", "respond", "config-refused", "ok")
        config.write_text(good)
        print(f"    (the good config is back in {config}; the controller applies it again)", flush=True)
        time.sleep(1.0)
        self.splittun("notifications", "list", "--all")

    def dns(self) -> None:
        """Geo-DNS: the VPN's DNS server (tunnel-internal, as the VPN set resolv.conf) and the ISP's answer the
        same name with different servers. The split app gets the ISP's answer, a VPN app the VPN's."""
        self.step("DNS follows the split: two apps ask the VPN's DNS server for the same name")
        self.geo.__enter__()
        print(f"    ({GEO_NAME}: the ISP's DNS ({T.ISP_LAN_V4}) says {GeoDns.address('isp', 4)}, the VPN's "
              f"({T.TUN_SRV_V4}, reachable only through the tunnel) says {GeoDns.address('vpn', 4)})")  # fmt: skip
        self.splittun("config", "set", "splittun/splitDNS", f"{T.ISP_LAN_V4},{T.ISP_LAN_V6}")
        self.splittun("rules", "add", "--name", "splitapp")
        for comm in ("splitapp", "vpnapp"):
            argv = [sys.executable, "-m", "splittun.lab.dnsapp", "--comm", comm, "--server", T.TUN_SRV_V4,
                    "--name", GEO_NAME, "--fetch"]  # fmt: skip
            note = "split by its rule" if comm == "splitapp" else "no rule matches it"
            self.sh(argv, shown=f"{comm} --resolve {GEO_NAME} --then-fetch       # {note}")
        self.splittun("dns")

    def ivpn(self) -> None:
        """IVPN's client beside splittun: its daemon (the lab's, protocol-exact) connects, splittun notices and
        tells the user once; IVPN's kill switch goes on and blocks what it should while split apps keep going."""
        self.step("IVPN beside splittun: its daemon starts and connects; splittun notices")
        self.ivpn_daemon = daemon = IvpnDaemonProcess(
            self.lab, self.ivpn_port_file, "--server", f"{T.VPNSRV_V4}:{T.VPN_SERVER_PORT}",
            "--client-ip", T.TUN_HOST_V4, "--dns", f"{T.TUN_SRV_V4}/1",
        )  # fmt: skip
        self.splittun("ivpn", "ping")
        print("    (IVPN's UI: Connect)", flush=True)
        daemon.command("connect")
        time.sleep(1.0)
        self.splittun("ivpn")
        self.splittun("notifications")

        self.step("IVPN's kill switch goes on: its chains go on top of OUTPUT/INPUT; splittun's go back above")
        kill_switch_on(self.lab, T.VPNSRV_V4, T.VPN_SERVER_PORT, T.TUN_HOST_IF)
        daemon.command("killswitch on")
        time.sleep(1.5)  # the interceptor checks its jumps at once on the change
        self.sh(["iptables-legacy", "-S", "OUTPUT"])
        self.sh(["curl", "-s", "--max-time", "5", f"http://{T.WHOAMI_V4}/"])
        self.other_app("tcp", 4, T.WHOAMI_V4)
        print(f"[host] $ python3 whoami-client --proto tcp {T.ISP_LAN_V4}:80      # an app trying the physical link")
        blocked, said = physical_link_blocked(self.lab)
        print(f"    {said}\n    ({'blocked by IVPN' if blocked else 'NOT BLOCKED by'}'s kill switch)", flush=True)
        if not blocked:
            raise RuntimeError("IVPN's kill switch did not block an app on the physical link")

        self.step("IVPN reconnects: the notice is not shown twice; 'Do not notify me anymore' keeps it away")
        daemon.command("state RECONNECTING")
        daemon.command("connect")
        self.splittun("notifications", "respond", "ivpn.connected", "suppress")
        daemon.command("disconnect")
        daemon.command("connect")
        time.sleep(1.0)
        self.splittun("notifications")
        self.splittun("ivpn")
        print("    (IVPN's UI: Disconnect, kill switch off)", flush=True)
        daemon.command("disconnect")
        daemon.command("killswitch off")
        kill_switch_off(self.lab)
        daemon.stop()
        self.ivpn_daemon = None

    def events_during(self, prefixes: list[str], action: list[str]) -> None:
        """`splittun events PREFIX…` running while `action` runs, as two terminals would show it."""
        argv = [sys.executable, "-m", "splittun.cli", "events", *prefixes, "--duration", "2.5"]
        print(f"[host] $ {shlex.join(['splittun', 'events', *prefixes])}   # in another terminal", flush=True)
        watcher = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns("host"), *argv],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(0.8)  # let the subscription reach the bus before the connection starts
        self.sh(action)
        out, _ = watcher.communicate(timeout=30)
        print("\n".join("    " + line for line in out.rstrip().splitlines()), flush=True)

    def panel(self) -> None:
        """The web panel's one-time login URL; with --keep, the panel forwarded to this machine's loopback (the
        api actor listens on the lab host's loopback only) and splittun left running that long."""
        self.step("The web panel: the same connections, rules and settings in a browser")
        url = self.splittun("ui").strip()
        if not self.keep:
            print("    (the panel listens in the lab's namespace; `make demo KEEP=600` keeps it running for ten "
                  f"minutes and forwards it to 127.0.0.1:{PANEL_PORT} on this machine)", flush=True)  # fmt: skip
            return
        relay = f"ip netns exec {self.lab.ns('host')} socat STDIO TCP\\:127.0.0.1\\:817"  # socat: \: inside SYSTEM
        forward = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{PANEL_PORT},bind=127.0.0.1,reuseaddr,fork", f"SYSTEM:{relay}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        fresh = f"sudo ip netns exec {self.lab.ns('host')} env SPLITTUN_HOME={self.home} splittun ui"
        print(
            f"\n    Open in a browser on this machine (one use, valid for two minutes):\n\n"
            f"        {url.replace(':817/', f':{PANEL_PORT}/')}\n\n"
            f"    (127.0.0.1:{PANEL_PORT} is forwarded to the panel in the lab; a fresh login URL: {fresh},\n"
            f"    then change its port to {PANEL_PORT}.) splittun keeps running for {self.keep:.0f} s; Ctrl-C ends "
            "the wait.",
            flush=True,
        )
        try:
            deadline = time.monotonic() + self.keep
            while time.monotonic() < deadline and forward.poll() is None:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if forward.poll() is not None:
                why = (forward.stderr.read() if forward.stderr else b"").decode().strip()
                raise RuntimeError(f"the forward to 127.0.0.1:{PANEL_PORT} stopped: {why or 'no reason given'}")
        except KeyboardInterrupt:
            print("\n    (the wait was cut short)", flush=True)
        finally:
            forward.terminate()
            forward.wait(timeout=5)

    def other_app(self, proto: str, family: int, target: str) -> None:
        """The lab's plain Python client: an app no rule matches."""
        self.sh(
            [sys.executable, "-m", "splittun.lab.client", "--proto", proto, "--target", target],
            shown=f"python3 whoami-client --proto {proto} {target}      # no rule matches python3",
        )

    def firewall(self) -> str:
        """Both rule sets, without counters, timestamps and empty tables (see Lab.firewall_rules)."""
        return self.lab.firewall_rules("host")

    def cleanup(self) -> None:
        self.step("Cleanup")
        self.geo.__exit__()
        if self.ivpn_daemon is not None:
            self.ivpn_daemon.stop()
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


def leak_line(report: LeakReport) -> str:
    leaked = len(report.leaks)
    return (f"leak monitor: {leaked} flow{'s' if leaked != 1 else ''} outside the VPN ({report.carrier} carrier "
            f"packets, {report.probes} probe packets, {len(report.allowed)} split flows allowed)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splittun.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"before stopping, keep splittun running this long with the web panel at 127.0.0.1:{PANEL_PORT}",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces): run it with sudo", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    demo = Demo(keep=args.keep)
    try:
        demo.run()
    except (RuntimeError, LabError, LeakMonitorError, IvpnDaemonError, subprocess.TimeoutExpired) as exc:
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
