"""ivpn: client of the local IVPN daemon and the interop rules between its VPN and our split tunnel.

Publishes `ivpn.status`; registers the interceptor's external verdict handler. Never on the packet path.
"""
