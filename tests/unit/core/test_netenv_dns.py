"""The DNS servers an interface was given (core/netenv/dns.py), read from a fake root directory."""

from __future__ import annotations

from pathlib import Path

from core.netenv.dns import link_dns_servers, parse_dhclient_leases, parse_key_file

DHCLIENT = """
lease {
  interface "eth0";
  fixed-address 192.0.2.10;
  option domain-name-servers 192.0.2.1,198.51.100.53;
}
lease {
  interface "wlan0";
  option domain-name-servers 203.0.113.9;
}
lease {
  interface "eth0";
  option domain-name-servers 192.0.2.2;
}
"""


def test_systemd_and_networkmanager_state_lines_give_addresses_only() -> None:
    text = "# private\nLLMNR=yes\nSERVERS=192.0.2.1 [2001:db8::53]:53 9.9.9.9#dns.quad9.net 127.0.0.53 fe80::1%2 junk\n"
    assert parse_key_file(text, "SERVERS") == ("192.0.2.1", "2001:db8::53", "9.9.9.9")
    assert parse_key_file("DNS=192.0.2.1,192.0.2.2\n", "DNS") == ("192.0.2.1", "192.0.2.2")


def test_the_last_dhclient_lease_of_the_interface_counts() -> None:
    assert parse_dhclient_leases(DHCLIENT, "eth0") == ("192.0.2.2",)
    assert parse_dhclient_leases(DHCLIENT, "wlan0") == ("203.0.113.9",)
    assert parse_dhclient_leases(DHCLIENT, "eth1") == ()


def test_sources_are_asked_in_order_per_interface(tmp_path: Path) -> None:
    assert link_dns_servers(2, "eth0", tmp_path) == ((), "")
    (tmp_path / "var/lib/dhcp").mkdir(parents=True)
    (tmp_path / "var/lib/dhcp/dhclient.eth0.leases").write_text(DHCLIENT)
    assert link_dns_servers(2, "eth0", tmp_path) == (("192.0.2.2",), "dhclient")
    (tmp_path / "run/systemd/netif/links").mkdir(parents=True)
    (tmp_path / "run/systemd/netif/links/2").write_text("ADMIN_STATE=configured\nDNS=192.0.2.53\n")
    assert link_dns_servers(2, "eth0", tmp_path) == (("192.0.2.53",), "systemd-networkd")
    (tmp_path / "run/systemd/resolve/netif").mkdir(parents=True)
    (tmp_path / "run/systemd/resolve/netif/2").write_text("SERVERS=2001:db8:10::1\n")
    assert link_dns_servers(2, "eth0", tmp_path) == (("2001:db8:10::1",), "systemd-resolved")
    assert link_dns_servers(3, "wlan0", tmp_path) == (("203.0.113.9",), "dhclient")
