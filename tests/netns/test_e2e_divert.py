"""The end-to-end path tests of test_e2e.py again, with `splittun up --backend divert`: the interceptor sees
packets through pydivert's eBPF backend (the WinDivert API on Linux) and rewrites split flows to the proxies
itself, instead of NFQUEUE and the kernel's NAT. Same lab, same clients, same assertions on what the whoami
servers saw; the leak monitor is on for every test. What eBPFDivert cannot do is named in
actors/interceptor/README.md ("The divert backend") and tested with packet bytes in
tests/unit/actors/interceptor/test_divert.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns.test_e2e import (  # noqa: F401  (fixtures and tests collected here again)
    dns,
    st,
    st_style,
    style,
    test_app_rule_splits_curl_and_socat_while_another_app_stays_in_the_vpn,
)
from tests.support.e2e import E2E
from tests.support.lab import own_lab


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    """A private lab ("e2ed") and a splittun instance with the divert backend in its host."""
    labs = own_lab("e2ed")
    harness = E2E(next(labs), backend="divert")
    try:
        yield harness
    finally:
        try:
            harness.stop()
        finally:
            labs.close()
