"""IVPN interop, free of I/O: the daemon's protocol and what IVPN's state means for the rest of splittun.

- portfile.py: where the daemon's port file is (Linux, snap, pre-2023; Windows and macOS behind the platform
  seam) and what it says;
- protocol.py: line framing, the Hello request, every state message folded into one immutable `IvpnSnapshot`;
- status.py: the snapshot as `ivpn.status`, the location gate, the "IVPN connected" notice, DNS delegation
  (IVPN's custom DNS as the resolver's VPN-path upstreams);
- interop.py: the interceptor's external verdict handler (IVPN's processes, carrier and daemon port are
  accept-final, never split), loaded in the interceptor process;
- bypass.py: the pre-connect hooks and the bypass-route plan (`splittun/bypassHosts`, table 717).

The ivpn actor (actors/ivpn) does the I/O around it (client.py holds the blocking connection loop) and publishes
`ivpn.status`; the interceptor and the resolver follow that status. The lab's protocol-exact fake daemon is
splittun/lab/ivpn.py. Facts: ../shared/reference/ivpn-daemon-protocol.md.
"""
