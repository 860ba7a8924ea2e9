"""What splittun knows and does, shared by the actors and the command line.

- `policy`: split rules, their compiled form and matching
- `config`: options, validation, the config file
- `egress`: where split traffic leaves (interface, source, gateway) and the split routing it needs
- `netenv`: interfaces, addresses, gateways and the physical uplink (a library; the actor publishes it)
- `proxy`: the transparent TCP/UDP proxy engine (a library with its own README) and its actor glue
- `redirect`: the divert backend's redirect table, shared by the interceptor and the proxies; the backend choice

It builds on `kernel` (talking to the OS), `runtime` (processes) and `messages` (the wire schemas), never on
an actor or the command line.
"""
