"""IVPN daemon protocol, free of I/O: where the daemon's port file is (portfile.py) and what its lines mean
(protocol.py: line framing, the Hello request, every state message folded into one immutable `IvpnSnapshot`).

The ivpn actor (actors/ivpn) does the socket I/O around it (client.py holds the blocking connection loop)
and publishes the snapshot as `ivpn.status`; the interceptor's external verdict handler (interop.py, loaded in
the interceptor process) reads that status.
Facts: ../shared/reference/ivpn-daemon-protocol.md.
"""
