"""One splittun instance running in a lab's host namespace: the driver the namespace tests, the end-to-end tests
and the benchmarks share.

It is driven the way a user drives splittun — its command line inside the namespace (`cli`) — and watched
through the control plane every actor answers (`ask`), never by importing an actor. `Instance.start` returns once
the interceptor intercepts and both proxies have an egress; `stop` runs `splittun down` and removes the
instance's home, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from messages import PolicyRule, PolicySnapshot
from messages.control import RequestFailed
from runtime import paths
from runtime.paths import Home
from runtime.transport import Publisher, request
from splittun.lab import topology as T
from splittun.lab.lab import Lab

#: The command as a user runs it, with this interpreter (the one splittun is installed in).
SPLITTUN = [sys.executable, "-m", "splittun.cli"]
#: Where the command runs from: the checkout (it needs no files from there; this only makes runs repeatable).
REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0


class InstanceError(RuntimeError):
    """splittun did not start, or did not get ready; the message says what it printed or lacked."""


def run_cli(
    *args: str, home: Path | None = None, ns: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the splittun command (inside namespace `ns` when given, for the instance in `home`); output captured."""
    full_env = dict(os.environ)
    full_env.pop("SPLITTUN_RUN_DIR", None)
    if home is not None:
        full_env["SPLITTUN_HOME"] = str(home)
    full_env.update(env or {})
    argv = [*(["ip", "netns", "exec", ns] if ns else []), *SPLITTUN, *args]
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def poll(check: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """`check()`'s first truthy answer within `timeout` seconds, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer or time.monotonic() >= deadline:
            return answer
        time.sleep(step)


@dataclass
class Instance:
    """One `splittun up` in the lab host namespace, with its own SPLITTUN_HOME."""

    lab: Lab
    home: Path
    version: int = 0  # of the last policy snapshot `publish_policy` sent

    # --- life ---------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        lab: Lab,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
        egress: str = T.HOST_IF,
    ) -> Instance:
        """`splittun up ARGS` with a fresh home; returns once the interceptor intercepts and both proxies leave
        through `egress` (IPv4 and IPv6). Whatever fails, nothing is left running and the home is removed."""
        inst = cls(lab, Path(tempfile.mkdtemp(prefix="st-", dir="/tmp")))
        try:
            up = inst.cli("up", *args, env=env)
            if up.returncode != 0:
                raise InstanceError(f"splittun up failed: {up.stdout}{up.stderr}")
            if not poll(lambda: inst.egress() == {4: egress, 6: egress} and inst.active(), timeout):
                raise InstanceError(f"not ready: interceptor active {inst.active()}, proxies' egress {inst.egress()}")
        except BaseException:
            inst.stop()
            raise
        return inst

    def stop(self) -> subprocess.CompletedProcess[str]:
        """`splittun down`; the home goes too, whatever happens."""
        try:
            return self.cli("down")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def running(self) -> bool:
        try:
            return os.path.exists(f"/proc/{self.supervisord_pid()}")
        except (OSError, ValueError):
            return False

    # --- as a user ------------------------------------------------------------------------------------

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`splittun ARGS…` in the lab host, for this instance."""
        return run_cli(*args, home=self.home, ns=self.lab.ns_host, env=env, timeout=timeout)

    # --- watching -------------------------------------------------------------------------------------

    @property
    def paths(self) -> Home:
        """Where this instance keeps its config, sockets and logs: the product's own layout under its home."""
        return Home.from_env({"SPLITTUN_HOME": str(self.home)})

    @property
    def run_dir(self) -> Path:
        return self.paths.run_dir

    @property
    def log_dir(self) -> Path:
        return self.paths.log_dir

    def ask(self, instance: str, op: str, **args: Any) -> Any:
        """One control request to an actor instance (`status`, `ping`, …); RequestFailed when it cannot answer."""
        return request(paths.actor_endpoint(self.run_dir, instance), op, args, timeout=5.0, who=instance)

    def pid(self, instance: str = "interceptor") -> int:
        return int(self.ask(instance, "ping")["pid"])

    def supervisord_pid(self) -> int:
        return int(self.paths.supervisord_pidfile.read_text())

    def active(self, instance: str = "interceptor") -> bool:
        """The interceptor holds its queues, has its policy, and (worker 0) its rules implement the data path the
        policy names (a fresh worker 0 installs the proxy path's and switches once it has the policy)."""
        try:
            status = self.ask(instance, "status")
        except RequestFailed:
            return False
        wanted = status.get("policy_data_path", "")
        return bool(status["active"]) and bool(wanted) and status.get("data_path") == wanted

    def workers(self) -> list[str]:
        """The interceptor processes, as `splittun status` lists them."""
        status = self.cli("status", "--json")
        return sorted(r["actor"] for r in json.loads(status.stdout)["actors"] if r["actor"].startswith("interceptor"))

    def egress(self, proxies: Sequence[str] = ("proxy_tcp_00", "proxy_udp_00")) -> dict[int, str]:
        """The interface each IP version's split traffic leaves through ("" = none), when the proxies agree;
        {} while one cannot answer or they disagree."""
        seen: set[tuple[str, str]] = set()
        try:
            for proxy in proxies:
                status = self.ask(proxy, "status")["egress"]
                seen.add((status["ipv4"].split()[0], status["ipv6"].split()[0]))
        except RequestFailed:
            return {}
        if len(seen) != 1:
            return {}
        v4, v6 = seen.pop()
        return {4: v4 if v4 != "none" else "", 6: v6 if v6 != "none" else ""}

    def policy_version(self, instance: str = "interceptor") -> int:
        return int(self.ask(instance, "status")["policy_version"])

    def wait_policy(self, version: int, timeout: float = 15.0) -> bool:
        """Until the interceptor decides with policy `version` (or newer)."""

        def adopted() -> bool:
            try:
                return self.policy_version() >= version
            except RequestFailed:
                return False

        return bool(poll(adopted, timeout))

    def publish_policy(
        self, rules: list[PolicyRule], enabled: bool = True, timeout: float = 15.0, data_path: str = "proxy"
    ) -> bool:
        """Publish a snapshot newer than the controller's on the bus, until every interceptor worker adopted it:
        tests that want a policy without going through the config file (split TCP through the proxy unless
        `data_path` says "kernel")."""
        self.version = max(self.version + 1, int(time.time() * 1000))
        snapshot = PolicySnapshot(
            version=self.version, ts=time.time(), enabled=enabled, rules=rules, data_path=data_path
        )
        workers = self.workers()
        ctx = zmq.Context()
        pub = Publisher(ctx, paths.bus_in(self.run_dir))
        try:

            def adopted() -> bool:
                pub.publish(snapshot)
                try:
                    return all(self.policy_version(w) == self.version for w in workers)
                except RequestFailed:
                    return False

            return bool(poll(adopted, timeout))
        finally:
            pub.close()
            ctx.term()

    def log(self, actor: str) -> str:
        """The actor's log so far ("" before it wrote one)."""
        path = self.paths.program_log(actor)
        return path.read_text(errors="replace") if path.exists() else ""
