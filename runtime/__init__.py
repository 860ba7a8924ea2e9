"""How a splittun process lives: the poll loop, ZeroMQ transport, the bus, logging, paths and the actor base.

Every process (actor, bus, CLI) uses it; it knows nothing of packets, policy or the kernel. Below it there is
only `messages` (the wire schemas).

- `actor`: the Actor base class, its Runtime (bus, heartbeats, requests, signals) and `main()`
- `loop`: timers and the poll loop; `transport`: publish, subscribe, request/reply; `bus`: the forwarder
  program (`python -m runtime.bus`); `log`: one log-line format; `paths`: every directory, file and endpoint
"""
