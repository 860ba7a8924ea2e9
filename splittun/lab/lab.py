"""Build, inspect and tear down a lab: network namespaces shaped like a laptop on a real VPN.

How the lab maps to a real machine:

- ``host`` is the laptop. ``eth0`` is its physical uplink (a veth instead of Wi-Fi), with an address
  and gateway from the home router. ``wgivpn`` is the VPN client's TUN device: point-to-point, NOARP,
  the tunnel address, a WireGuard-sized MTU; a user-space forwarder (``splittun.lab.tunnel``) moves
  its packets as UDP datagrams to the VPN server, like wireguard-go or OpenVPN do.
- ``isp`` is the home router plus the ISP: it routes between the laptop, the VPN server and the
  internet. It does not NAT (documentation addresses are "public" here) and does not answer ARP/NDP
  for addresses it does not own, so a host that tries the kernel's on-link fallback gets nothing.
- ``vpnsrv`` is the VPN server: its own TUN device, forwarding, and masquerade out of its public
  address, so tunnelled traffic reaches the internet as 198.51.100.2.
- ``inet`` is the internet's "what is my IP" servers (``splittun.lab.servers``).
- On isp's side of the host's uplink(s), a leak monitor (``splittun.lab.leakmon``) logs every packet the
  host sends out of its physical link, so tests can prove that nothing left outside the VPN. The lab's own
  ISP-path probes carry TTL ``PROBE_TTL`` so it can tell them apart.

The host's routing comes in the two shapes real VPN clients leave behind ("styles"):

- ``replaced`` (OpenVPN-like): the main table's default route points at the tunnel, plus a host route
  to the VPN server via the ISP gateway so the transport itself does not loop into the tunnel.
- ``wgquick`` (wg-quick-like): main keeps the physical default; ``not fwmark 51820 lookup 51820`` and
  ``lookup main suppress_prefixlength 0`` send everything unmarked into table 51820 (default dev
  wgivpn); the forwarder marks its transport socket 51820. wg-quick's nft ``premangle``/``postmangle``
  connmark rules and ``src_valid_mark=1`` come with it; its ``preraw`` anti-spoofing rule is optional.

Nothing ever lives in the root namespace: veth pairs are created directly between lab namespaces,
daemons run inside them, and all firewall changes are made inside them.

Modules: plan.py says what the lab is made of (pure: `ip -batch` lines, sysctls, nft scripts), this module
applies it and runs the lab's daemons (tunnel.py, servers.py, leakmon.py) and probes (client.py), and
processes.py finds and stops what runs in the lab's namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from splittun.lab import plan
from splittun.lab import topology as T
from splittun.lab.processes import (
    CHILDREN,
    NETNS_DIR,
    alive,
    cmdline,
    kill,
    lab_daemons,
    pids_in,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_NS_RE = re.compile(rf"^{re.escape(T.NS_PREFIX)}(.+)-({'|'.join(T.ROLES)})$")

#: Daemon key -> (role of its namespace, module). Keys appear in status()["processes"].
DAEMONS: dict[str, tuple[str, str]] = {
    "servers": ("inet", "splittun.lab.servers"),
    "tunnel-vpnsrv": ("vpnsrv", "splittun.lab.tunnel"),
    "tunnel-host": ("host", "splittun.lab.tunnel"),
    "leakmon": ("isp", "splittun.lab.leakmon"),
}


class LabError(RuntimeError):
    """A lab operation failed; the message says which step and includes the tool's error output."""


# ------------------------------------------------------------------------------------------ helpers


def ns_name(lab: str, role: str) -> str:
    return f"{T.NS_PREFIX}{lab}-{role}"


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, text=True, capture_output=True, check=False)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        shown = " ".join(argv) + (f"  <<<\n{input}" if input else "")
        raise LabError(f"command failed ({proc.returncode}): {shown}\n{detail}")
    return proc


def lab_names() -> list[str]:
    """Names of labs that have at least one namespace."""
    names = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(NETNS_DIR):
            m = _NS_RE.match(entry)
            if m:
                names.add(m.group(1))
    return sorted(names)


def down_all() -> list[str]:
    """Tear down every lab (namespaces, daemons, state dirs), e.g. after a crashed test run."""
    names = set(lab_names())
    with contextlib.suppress(FileNotFoundError):
        names.update(p.name for p in Path(T.STATE_ROOT).iterdir() if p.is_dir())
    for argv in lab_daemons().values():
        names.add(argv[argv.index("--lab") + 1] if argv.index("--lab") + 1 < len(argv) else "")
    names.discard("")
    for name in sorted(names):
        if _NAME_RE.match(name):
            Lab(name).down()
    with contextlib.suppress(OSError):
        Path(T.STATE_ROOT).rmdir()
    return sorted(names)


# -------------------------------------------------------------------------------------------- Lab


class Lab:
    """One lab instance, addressed by name; every method works from a fresh object (state is on disk)."""

    def __init__(
        self,
        name: str = T.DEFAULT_LAB_NAME,
        style: str = "replaced",
        antispoof: bool = False,
        rp_filter: int = T.HOST_RP_FILTER,
        second_uplink: bool = False,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad lab name {name!r}: letters, digits, '_', '.', '-', at most 32")
        _check_style(style)
        if rp_filter not in (0, 1, 2):
            raise ValueError(f"rp_filter must be 0, 1 or 2, not {rp_filter!r}")
        self.name = name
        self.style = style
        self.antispoof = antispoof
        self.rp_filter = rp_filter
        self.second_uplink = second_uplink
        self.ns_host = ns_name(name, "host")
        self.ns_isp = ns_name(name, "isp")
        self.ns_vpnsrv = ns_name(name, "vpnsrv")
        self.ns_inet = ns_name(name, "inet")
        self.state_dir = Path(T.STATE_ROOT) / name
        self._isp_path_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Lab(name={self.name!r}, style={self.style!r}, antispoof={self.antispoof!r})"

    # -- names ----------------------------------------------------------------------------------

    @property
    def namespaces(self) -> dict[str, str]:
        return {role: ns_name(self.name, role) for role in T.ROLES}

    def ns(self, ns: str) -> str:
        """Full namespace name for a role ("host") or a full name of this lab."""
        if ns in T.ROLES:
            return ns_name(self.name, ns)
        if ns in self.namespaces.values():
            return ns
        raise ValueError(f"{ns!r} is not a role {T.ROLES} nor a namespace of lab {self.name!r}")

    # -- lifecycle --------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True if any of the lab's namespaces exists (a half-built lab exists and needs down())."""
        return any((NETNS_DIR / ns).exists() for ns in self.namespaces.values())

    def _make_state_dir(self) -> None:
        """Create the state directory; another lab going down may remove the shared root between the two
        mkdirs (it removes the root once empty), so try again."""
        for _ in range(20):
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                return
            except FileNotFoundError:
                time.sleep(0.01)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def up(self, timeout: float = 10.0) -> None:
        """Build the lab from scratch (tearing down a previous one) and wait until both paths work."""
        self.down()
        try:
            self._make_state_dir()
            self._save_state()
            for ns in self.namespaces.values():
                _run(["ip", "netns", "add", ns])
            self._sysctls()
            self._links()
            self._wait_links_up(time.monotonic() + timeout)
            self._start_leakmon()
            self._vpn_server_nat()
            self._spawn("servers", ["--tcp-port", str(T.WHOAMI_TCP_PORT), "--udp-port", str(T.WHOAMI_UDP_PORT)])
            self._spawn("tunnel-vpnsrv", ["server", "--dev", T.TUN_SRV_IF, "--listen", f"0.0.0.0:{T.VPN_SERVER_PORT}"])
            self._wait_leakmon(time.monotonic() + timeout)  # capturing before the host sends anything routed
            self._apply_style(self.style, self.antispoof)
            self._start_host_tunnel()
            self._save_state()
            deadline = time.monotonic() + timeout
            self._wait_attached("vpnsrv", T.TUN_SRV_IF, deadline)
            self._wait_attached("host", T.TUN_HOST_IF, deadline)
            self.wait_ready(max(0.5, deadline - time.monotonic()))
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove everything of this lab; idempotent and safe on half-built or crashed labs."""
        # Hold each namespace open while working: a process that entered it just before our scan is
        # still found by inode after `ip netns del`, and the inode cannot be reused meanwhile.
        fds = []
        for ns in self.namespaces.values():
            with contextlib.suppress(OSError):
                fds.append(os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC))
        try:
            inodes = {(st.st_dev, st.st_ino) for st in map(os.fstat, fds)}
            kill(pids_in(inodes) | set(lab_daemons(self.name)))
            for ns in self.namespaces.values():
                self._delete_netns(ns)
            kill(pids_in(inodes))  # late entrants
        finally:
            for fd in fds:
                os.close(fd)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(T.STATE_ROOT).rmdir()  # only succeeds when no other lab is left

    @staticmethod
    def _delete_netns(ns: str) -> None:
        for attempt in range(20):
            if not (NETNS_DIR / ns).exists():
                return
            proc = _run(["ip", "netns", "del", ns], check=False)
            if proc.returncode == 0:
                return
            time.sleep(0.05 * (attempt + 1))
        raise LabError(f"cannot delete namespace {ns}: {proc.stderr.strip()}")

    def set_style(self, style: str, antispoof: bool | None = None, timeout: float = 10.0) -> None:
        """Switch the host's routing style in place (routes, rules, nft, forwarder mark)."""
        _check_style(style)
        if not self.exists():
            raise LabError(f"lab {self.name!r} is not up")
        st = self._load_state()
        self.rp_filter = st.get("rp_filter", self.rp_filter)  # a property of the built lab, not of this object
        antispoof = st.get("antispoof", self.antispoof) if antispoof is None else antispoof
        pid = st.get("pids", {}).get("tunnel-host")
        if st.get("style") == style and st.get("antispoof") == antispoof and pid and alive(pid):
            self.style, self.antispoof = style, bool(antispoof)
            return  # already so: keep it cheap for fixtures that assert a style per test
        old_mark = plan.tunnel_mark(st.get("style", self.style))
        self._apply_style(style, bool(antispoof))
        self.style, self.antispoof = style, bool(antispoof)
        deadline = time.monotonic() + timeout
        if old_mark != plan.tunnel_mark(style) or not (pid and alive(pid)):
            self._start_host_tunnel()
            self._wait_attached("host", T.TUN_HOST_IF, deadline)
        self._save_state()
        self.wait_ready(max(0.5, deadline - time.monotonic()))

    @property
    def leakmon_log(self) -> Path:
        """The leak monitor's flow log (see splittun.lab.leakmon)."""
        return self.state_dir / T.LEAKMON_LOG

    # -- status -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What exists and runs; style from the state file, else guessed from the host's rules."""
        st = self._load_state()
        namespaces = {role: (NETNS_DIR / ns).exists() for role, ns in self.namespaces.items()}
        style, antispoof = st.get("style"), st.get("antispoof")
        if namespaces["host"] and (style is None or antispoof is None):
            style, antispoof = self._detect_style()
        running = lab_daemons(self.name)
        processes: dict[str, dict[str, Any]] = {}
        for key in DAEMONS:
            pid = st.get("pids", {}).get(key)
            if pid is None or not alive(pid):
                found = [p for p, argv in running.items() if _daemon_key(argv) == key and alive(p)]
                pid = found[0] if found else pid
            processes[key] = {"pid": pid, "alive": bool(pid and alive(pid))}
        return {
            "name": self.name,
            "exists": any(namespaces.values()),
            "style": style,
            "antispoof": antispoof,
            "rp_filter": st.get("rp_filter"),
            "state_dir": str(self.state_dir),
            "namespaces": namespaces,
            "processes": processes,
        }

    # -- running things inside -------------------------------------------------------------------

    def firewall_rules(self, ns: str = "host") -> str:
        """iptables-legacy-save + ip6tables-legacy-save of a lab namespace, comparable across time.

        Timestamps and counters are dropped, and so are tables that hold nothing (built-in chains with
        ACCEPT policies, no rules): legacy xtables cannot unregister a table once a program used it, so an
        empty table that appeared is not a rule anybody left behind.
        """
        lines: list[str] = []
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            out = self.exec(ns, [tool], check=True).stdout
            lines += _drop_empty_tables(
                [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in out.splitlines() if not line.startswith("#")]
            )
        return "\n".join(lines)

    def exec(self, ns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a lab namespace; text output captured, no exception on failure by default."""
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("check", False)
        return subprocess.run(["ip", "netns", "exec", self.ns(ns), *argv], **kw)

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in a lab namespace (down() kills it with everything else in the lab)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(ns), *argv], **kw)

    def whoami(
        self,
        *,
        proto: Literal["tcp", "udp"] = "tcp",
        family: int = 4,
        target: str | None = None,
        path: Literal["vpn", "isp"] = "vpn",
        timeout: float = 5,
    ) -> str:
        """The source address inet saw for a request from the host, via the VPN or forced via the ISP.

        ``target`` defaults to the whoami server address of ``family``; a given target's own family
        wins over ``family``. Raises LabError (with the client's reason) when there is no answer.
        """
        if target:
            family = 6 if ":" in target else 4
        if path not in ("vpn", "isp"):
            raise ValueError(f"path must be 'vpn' or 'isp', not {path!r}")
        if not (NETNS_DIR / self.ns_host).exists():
            raise LabError(f"lab {self.name!r} is not up")
        argv = self._client_argv(proto, family, target, timeout, isp=path == "isp")
        if path == "vpn":
            proc = self.exec("host", argv)
        else:
            with self._isp_path():
                proc = self.exec("host", argv)
        if proc.returncode != 0:
            raise LabError(f"whoami {proto}{family} via {path} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll until the VPN path and the ISP path answer with the expected addresses (v4 and v6)."""
        deadline = time.monotonic() + timeout
        vpn = {4: T.VPNSRV_V4, 6: T.VPNSRV_V6}
        isp = {4: T.HOST_V4, 6: T.HOST_V6}
        self._probe_all(vpn, False, deadline)
        with self._isp_path():
            self._probe_all(isp, True, deadline)

    # -- internals: building ------------------------------------------------------------------------

    def _sysctls(self) -> None:
        for role in T.ROLES:
            settings = plan.sysctls(role, self.rp_filter)
            _run(
                ["ip", "netns", "exec", self.ns(role), "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())]
            )

    def _batch(self, batch: plan.Batch) -> None:
        """Many ``ip`` commands in one process, in the batch's namespace (and address family)."""
        argv = ["ip", "-n", self.ns(batch.role), *([batch.family] if batch.family else []), "-batch", "-"]
        _run(argv, input="\n".join(batch.lines) + "\n")

    def _links(self) -> None:
        for veth in plan.veths(self.second_uplink):
            _run(veth.argv(self.ns(veth.a_role), self.ns(veth.b_role)))
        for batch in plan.addresses(self.second_uplink):
            self._batch(batch)

    def _vpn_server_nat(self) -> None:
        for argv in plan.vpn_server_nat():
            _run(["ip", "netns", "exec", self.ns_vpnsrv, *argv])

    def _apply_style(self, style: str, antispoof: bool) -> None:
        """Remove both styles' host routing, then install ``style``'s (idempotent).

        Ordered so that a switch leaks nothing (`plan.style_removals`, `plan.style`): at no moment does
        unmarked traffic meet a default route through a physical uplink without wg-quick's rules in front of
        it (the leak monitor saw retransmissions of a VPN connection leave through eth0 while an older order
        switched)."""
        host = self.ns_host
        for argv in plan.style_removals():
            while _run(["ip", "-n", host, *argv], check=False).returncode == 0:
                pass
        for argv in plan.STYLE_FLUSHES:
            _run(["ip", "-n", host, *argv], check=False)
        for fam in ("ip", "ip6"):
            _run(["ip", "netns", "exec", host, "nft", "delete", "table", fam, T.WG_NFT_TABLE], check=False)
        routing = plan.style(style, antispoof, self.second_uplink)
        for batch in routing.batches:
            self._batch(batch)
        if routing.nft:
            _run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=routing.nft)
        _run(["ip", "netns", "exec", host, "sysctl", "-q", "-w",
              f"net.ipv4.conf.all.src_valid_mark={routing.src_valid_mark}"])  # fmt: skip

    def _start_host_tunnel(self) -> None:
        st = self._load_state()
        old = st.get("pids", {}).get("tunnel-host")
        if old and alive(old) and _daemon_key(cmdline(old)) == "tunnel-host":
            kill({old})
        mark = plan.tunnel_mark(self.style)
        self._spawn("tunnel-host", [
            "client", "--dev", T.TUN_HOST_IF,
            "--peer", f"{T.VPNSRV_V4}:{T.VPN_SERVER_PORT}",
            "--listen", f"0.0.0.0:{T.VPN_CLIENT_PORT}",
            "--mark", str(mark), "--keepalive", "5",
        ])  # fmt: skip

    def _start_leakmon(self) -> None:
        """The leak monitor on isp's side of the host's uplink(s) (splittun.lab.leakmon)."""
        ifaces = [T.ISP_LAN_IF, *([T.ISP_LAN2_IF] if self.second_uplink else [])]
        self._spawn("leakmon", ["--log", str(self.leakmon_log), *(a for i in ifaces for a in ("--iface", i))])

    def _wait_leakmon(self, deadline: float) -> None:
        """Wait until the leak monitor says it captures (its "ready" line)."""
        pid = self._load_state().get("pids", {}).get("leakmon")
        while True:
            with contextlib.suppress(OSError), open(self.leakmon_log, "rb") as f:
                if any(b'"event":"ready"' in line for line in f):
                    return
            if not (pid and alive(pid)) or time.monotonic() >= deadline:
                raise LabError(f"lab {self.name!r}: the leak monitor is not capturing" + self._log_tails())
            time.sleep(0.01)

    def _wait_links_up(self, deadline: float) -> None:
        """Wait until every veth reports operstate UP (carrier seen by linkwatch: qdisc and IPv6 ready)."""
        wanted = plan.veth_interfaces(self.second_uplink)
        pending = set(wanted)
        while pending:
            for role in sorted(pending):
                out = _run(["ip", "-n", self.ns(role), "-j", "link", "show", "type", "veth"], check=False).stdout
                with contextlib.suppress(ValueError):
                    links = json.loads(out)
                    if wanted[role] <= {link["ifname"] for link in links if link.get("operstate") == "UP"}:
                        pending.discard(role)
            if pending and time.monotonic() >= deadline:
                raise LabError(f"lab {self.name!r}: links not up in {sorted(pending)}")
            if pending:
                time.sleep(0.01)

    def _wait_attached(self, role: str, dev: str, deadline: float) -> None:
        """Wait until a forwarder holds the TUN device (carrier comes up on attach)."""
        while True:
            out = _run(["ip", "-n", self.ns(role), "-j", "link", "show", dev], check=False).stdout
            with contextlib.suppress(ValueError, IndexError, KeyError):
                if "LOWER_UP" in json.loads(out)[0]["flags"]:
                    return
            if time.monotonic() >= deadline:
                raise LabError(f"lab {self.name!r}: no forwarder attached to {dev} in {role}" + self._log_tails())
            time.sleep(0.01)

    def _spawn(self, key: str, args: list[str]) -> int:
        """Start a detached lab daemon in its namespace with the venv's python; log to the state dir."""
        role, module = DAEMONS[key]
        self._make_state_dir()
        with open(self.state_dir / f"{key}.log", "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), sys.executable, "-m", module, *args, "--lab", self.name],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
                close_fds=True,
            )
        CHILDREN[proc.pid] = proc
        st = self._load_state()
        st.setdefault("pids", {})[key] = proc.pid
        self._save_state(st)
        return proc.pid

    # -- internals: probing -------------------------------------------------------------------------

    def _client_argv(self, proto: str, family: int, target: str | None, timeout: float, *, isp: bool) -> list[str]:
        if proto not in ("tcp", "udp") or family not in (4, 6):
            raise ValueError(f"proto must be tcp/udp and family 4/6, got {proto!r}/{family!r}")
        argv = [sys.executable, "-m", "splittun.lab.client", "--proto", proto, "--family", str(family),
                "--timeout", str(timeout)]  # fmt: skip
        if target:
            argv += ["--target", target]
        if isp:  # the probe TTL makes these deliberate ISP-path probes recognisable to the leak monitor
            argv += ["--mark", hex(T.ISP_PATH_MARK), "--bind-dev", T.HOST_IF, "--ttl", str(T.PROBE_TTL)]
        return argv

    def _probe_all(self, expect: dict[int, str], isp: bool, deadline: float) -> None:
        """Run the v4 and v6 probes in parallel, each retrying until it sees ``expect`` or time runs out."""
        procs = {}
        remaining = max(0.5, deadline - time.monotonic())
        for family, addr in expect.items():
            argv = self._client_argv("tcp", family, None, 0.5, isp=isp)  # a lost SYN: retry, don't wait 1 s
            argv += ["--expect", addr, "--retry-for", f"{remaining:.2f}"]
            procs[family] = self.popen("host", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        errors = []
        for family, p in procs.items():
            out, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"IPv{family}: {err.strip() or out.strip()}")
        if errors:
            path = "ISP path" if isp else "VPN path"
            raise LabError(f"lab {self.name!r}: {path} not working: " + "; ".join(errors) + self._log_tails())

    @contextlib.contextmanager
    def _isp_path(self) -> Any:
        """Temporarily route SO_MARK ISP_PATH_MARK out of eth0 via the ISP gateway (host ns only).

        With strict rp_filter (Lab(rp_filter=1)) the replies would be dropped, because the kernel
        checks their reverse path without a mark and finds the VPN default; so in that mode the mark
        is also saved to and restored from conntrack and src_valid_mark is turned on, as wg-quick
        does for its own transport (and as a split tunnel must do on such systems).
        """
        with self._isp_path_lock, self._state_lock("isp-path"):
            host = self.ns_host
            strict = self._load_state().get("rp_filter", self.rp_filter) == 1
            valid_mark = None
            try:
                for batch in plan.isp_path():
                    self._batch(batch)
                if strict:
                    valid_mark = self._sysctl_get("host", "net.ipv4.conf.all.src_valid_mark")
                    self._sysctl_set("host", "net.ipv4.conf.all.src_valid_mark", "1")
                    _run(["ip", "netns", "exec", host, "nft", "-f", "-"], input=plan.ISP_PATH_NFT)
                yield
            finally:
                for fam in ("-4", "-6"):
                    while _run(["ip", "-n", host, fam, "rule", "del", "pref", str(T.ISP_PATH_RULE_PREF)],
                               check=False).returncode == 0:  # fmt: skip
                        pass
                    _run(["ip", "-n", host, fam, "route", "flush", "table", str(T.ISP_PATH_TABLE)], check=False)
                if strict:
                    _run(["ip", "netns", "exec", host, "nft", "delete", "table", "inet", plan.ISP_PATH_NFT_TABLE],
                         check=False)  # fmt: skip
                    if valid_mark is not None:
                        self._sysctl_set("host", "net.ipv4.conf.all.src_valid_mark", valid_mark)

    def _sysctl_get(self, role: str, key: str) -> str:
        return _run(["ip", "netns", "exec", self.ns(role), "sysctl", "-n", key]).stdout.strip()

    def _sysctl_set(self, role: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", self.ns(role), "sysctl", "-q", "-w", f"{key}={value}"])

    @contextlib.contextmanager
    def _state_lock(self, what: str) -> Any:
        """Cross-process lock (flock) in the state dir, so parallel test workers don't interleave."""
        if not self.state_dir.is_dir():  # no lab (state) to protect; don't create a stray state dir
            yield
            return
        with open(self.state_dir / f"{what}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- internals: state ---------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, st: dict[str, Any] | None = None) -> None:
        st = dict(self._load_state() if st is None else st)
        st.update(name=self.name, style=self.style, antispoof=self.antispoof, rp_filter=self.rp_filter,
                  second_uplink=self.second_uplink)  # fmt: skip
        self._make_state_dir()
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.state_dir / "state.json")

    def _detect_style(self) -> tuple[str | None, bool | None]:
        rules = _run(["ip", "-n", self.ns_host, "-4", "rule", "show"], check=False).stdout
        routes = _run(["ip", "-n", self.ns_host, "-4", "route", "show", "default"], check=False).stdout
        if f"lookup {T.WG_TABLE}" in rules:
            style: str | None = "wgquick"
        elif T.TUN_HOST_IF in routes:
            style = "replaced"
        else:
            style = None
        nft = _run(["ip", "netns", "exec", self.ns_host, "nft", "list", "table", "ip", T.WG_NFT_TABLE], check=False)
        return style, "fib saddr" in nft.stdout

    def _log_tails(self, lines: int = 8) -> str:
        out = []
        for key in DAEMONS:
            with contextlib.suppress(OSError):
                tail = (self.state_dir / f"{key}.log").read_text(errors="replace").splitlines()[-lines:]
                out.append(f"\n--- {key}.log ---\n" + "\n".join(tail))
        return "".join(out)


def _drop_empty_tables(lines: list[str]) -> list[str]:
    """Leave out `*table … COMMIT` blocks with only built-in ACCEPT chains and no rules."""
    out: list[str] = []
    block: list[str] = []
    for line in lines:
        if line.startswith("*"):
            block = [line]
            continue
        if block:
            block.append(line)
            if line == "COMMIT":
                body = block[1:-1]
                empty = all(entry.startswith(":") and entry.split()[1] == "ACCEPT" for entry in body)
                if not empty:
                    out += block
                block = []
            continue
        out.append(line)
    return out


def _check_style(style: str) -> None:
    if style not in T.STYLES:
        raise ValueError(f"style must be one of {T.STYLES}, not {style!r}")


def _daemon_key(argv: list[str]) -> str | None:
    if "splittun.lab.servers" in argv:
        return "servers"
    if "splittun.lab.leakmon" in argv:
        return "leakmon"
    if "splittun.lab.tunnel" in argv:
        return "tunnel-host" if "client" in argv else "tunnel-vpnsrv" if "server" in argv else None
    return None
