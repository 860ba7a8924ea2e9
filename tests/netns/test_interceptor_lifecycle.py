"""The interceptor's rule lifecycle in the lab: stop leaves the firewall exactly as it was, start is
idempotent (over its own rules, after a crash), `splittun down` cleans up after a crash even from
another namespace, and the scheduled checks push a displacing rule down. Each test runs its own
`splittun up` in a private lab's host namespace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from splittun.lab import Lab
from tests.support.cli import splittun
from tests.support.interceptor import (
    SPLIT,
    TOOLS,
    VPN,
    Instance,
    gone,
    ours_on_top,
    push_ours_down,
    remove_foreign,
    saves,
    start,
    stop,
    wait_until,
)
from tests.support.lab import own_lab

#: Another program's rules in every table we use, so "exactly as before" has something to keep.
FOREIGN = (("mangle", "OUTPUT"), ("mangle", "INPUT"), ("filter", "INPUT"), ("nat", "OUTPUT"))


@pytest.fixture(scope="module")
def lc_lab() -> Iterator[Lab]:
    yield from own_lab("iclc")


@pytest.fixture
def foreign_rules(lc_lab: Lab) -> Iterator[None]:
    for tool in TOOLS:
        for table, chain in FOREIGN:
            lc_lab.exec("host", [tool, "-w", "-t", table, "-A", chain, "-p", "udp", "--dport", "9", "-j", "ACCEPT"],
                        check=True)  # fmt: skip
    yield
    for tool in TOOLS:
        for table, chain in FOREIGN:
            lc_lab.exec("host", [tool, "-w", "-t", table, "-D", chain, "-p", "udp", "--dport", "9", "-j", "ACCEPT"])


def ip_rules(lab: Lab) -> str:
    return lab.exec("host", ["ip", "rule"]).stdout + lab.exec("host", ["ip", "-6", "rule"]).stdout


def our_conntrack_marks(lab: Lab) -> list[str]:
    return re.findall(r"mark=17[01]\d\b", lab.exec("host", ["conntrack", "-L"]).stdout)


def cleanup_here(lab: Lab) -> subprocess.CompletedProcess[str]:
    """`python -m actors.interceptor --cleanup` in the lab host, with no state at all."""
    env = {**os.environ, "SPLITTUN_RUN_DIR": "/nonexistent/run"}
    argv = ["ip", "netns", "exec", lab.ns_host, sys.executable, "-m", "actors.interceptor", "--cleanup"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)


def test_stop_restores_the_firewall_exactly_and_start_never_duplicates(lc_lab: Lab, foreign_rules: None) -> None:
    lab = lc_lab
    before, rules_before = saves(lab), ip_rules(lab)
    inst = start(lab)
    try:
        installed = saves(lab)
        assert installed.count("-A OUTPUT -j SPLITTUN-INGEST-OUTPUT") == 2  # once per IP version
        assert lab.whoami(proto="tcp", target=SPLIT[4]) == VPN[4]  # traffic flows (no split rule yet)
        # Stop and start again (SIGTERM: worker 0 removes its rules, supervisord starts a new one) …
        pid = inst.pid()
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: gone(pid) and inst.active())
        assert saves(lab) == installed
        # … and start after a crash (kill -9 leaves the rules; the new worker installs over them).
        pid = inst.pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: gone(pid) and inst.active())
        assert saves(lab) == installed
    finally:
        result = stop(inst)
    assert result.returncode == 0, result.stdout + result.stderr
    assert saves(lab) == before
    assert ip_rules(lab) == rules_before  # the split routing too: `down` removes it once the proxies stopped
    assert our_conntrack_marks(lab) == []
    # Stopping twice: the stateless cleanup finds nothing and changes nothing.
    again = cleanup_here(lab)
    assert again.returncode == 0 and '"tables": []' in again.stdout, again.stdout + again.stderr
    assert saves(lab) == before


def test_down_from_another_namespace_cleans_up_after_a_crash(lc_lab: Lab, foreign_rules: None) -> None:
    lab = lc_lab
    before, rules_before = saves(lab), ip_rules(lab)
    inst = start(lab)
    try:
        pid, sup = inst.pid(), inst.supervisord_pid()
        os.kill(pid, signal.SIGSTOP)  # so it cannot clean up on the SIGTERM that supervisord's death sends
        os.kill(sup, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: gone(pid) and gone(sup))
        assert "SPLITTUN-INGEST-OUTPUT" in saves(lab)  # what a crash leaves behind
        assert "lookup 1720" in ip_rules(lab)
        # This `down` runs in the root namespace; it finds the lab's host namespace the rules live in.
        result = splittun("down", home=inst.home)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "removed interceptor leftovers" in result.stdout and "split routing" in result.stdout
        assert saves(lab) == before
        assert ip_rules(lab) == rules_before
    finally:
        stop(inst)


def test_stateless_cleanup_removes_a_crashed_instances_rules(lc_lab: Lab) -> None:
    lab = lc_lab
    before, rules_before = saves(lab), ip_rules(lab)
    inst = start(lab)
    try:
        assert "SPLITTUN-FILTER" in saves(lab)
        assert wait_until(lambda: "lookup 1720" in ip_rules(lab))
        pid = inst.pid()
        os.kill(pid, signal.SIGSTOP)  # as good as crashed: it cannot put back what the cleanup removes
        try:
            result = cleanup_here(lab)
            assert result.returncode == 0, result.stderr
            assert saves(lab) == before
            assert ip_rules(lab) == rules_before  # the split routing goes with `--cleanup` too
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        stop(inst)
    assert saves(lab) == before


def test_scheduled_checks_push_a_displacing_rule_down(lc_lab: Lab) -> None:
    """A VPN client coming up at boot inserts its rules above ours while `splittun up` is still starting;
    a scheduled check (3, 6, 12 s after install) pushes them down without anyone asking. Whenever
    something else (a network-change check) put ours back first, the client inserts again."""
    lab = lc_lab
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start, lab, env={"SPLITTUN_JUMP_CHECKS": "3,6,12"})
        inst: Instance | None = None
        try:
            assert wait_until(lambda: ours_on_top(lab) or starting.done(), timeout=30)  # our rules are in
            assert not starting.done() or starting.exception() is None, starting.exception()

            def moved_back_by_a_scheduled_check() -> bool:
                nonlocal inst
                if inst is None and starting.done():
                    inst = starting.result()
                if not ours_on_top(lab):
                    return False
                if inst is not None and 'why="scheduled' in (inst.log_dir / "interceptor.log").read_text():
                    return True
                remove_foreign(lab)
                push_ours_down(lab)
                return False

            assert wait_until(moved_back_by_a_scheduled_check, timeout=30)
            assert "rules.jumps_moved_back" in (inst.log_dir / "interceptor.log").read_text()  # type: ignore[union-attr]
        finally:
            remove_foreign(lab)
            if inst is None and starting.exception() is None:
                inst = starting.result()
            if inst is not None:
                stop(inst)
