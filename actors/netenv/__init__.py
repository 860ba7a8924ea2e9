"""netenv: interfaces, addresses, routes and gateways, and which physical link is the uplink.

Publishes `netenv.changed` with the whole snapshot so the interceptor and the proxies always know which
interface a split connection leaves through and via which gateway — also while a VPN owns the default.
"""
