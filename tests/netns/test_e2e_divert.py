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
    back_to_auto,
    dns,
    st,
    st_style,
    style,
    test_a_manual_choice_is_what_split_connections_use,
    test_app_rule_splits_curl_and_socat_while_another_app_stays_in_the_vpn,
    test_children_rule_splits_what_an_app_starts,
    test_cidr_rule_splits_the_network_and_nothing_else,
    test_connections_show_the_split_tunnel_details,
    test_disable_keeps_running_split_connections_and_new_ones_use_the_vpn,
    test_domain_rule_splits_names_learned_from_dns,
    test_down_after_a_point_to_point_choice_leaves_no_split_routing_behind,
    test_down_leaves_firewall_rules_routes_and_conntrack_as_before_up,
    test_enable_leaves_running_vpn_connections_and_new_ones_are_split,
    test_executable_path_and_glob_rules,
    test_interface_manual_then_auto_and_an_unknown_one_refused,
    test_invalid_config_is_refused_and_the_running_one_stays,
    test_keep_rule_overrides_a_broader_split_rule_when_it_comes_first,
    test_one_udp_socket_two_peers_one_split,
    test_port_and_protocol_rules,
    test_split_works_beside_wg_quick_anti_spoofing_rule,
    test_switching_back_from_a_point_to_point_interface_restores_the_split_path,
    test_uid_rule_splits_one_users_apps,
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
