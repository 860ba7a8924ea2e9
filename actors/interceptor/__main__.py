"""interceptor: the firewall half of the split tunnel (on the packet hot path).

Linux: iptables-legacy rules queue the first packet of each new connection to NFQUEUE; this actor
attributes it to a process, evaluates its own copy of the policy snapshot and sets a verdict and mark
(1719 = split, DNAT'd to the proxies). It never waits on another process to decide a packet.

`python -m actors.interceptor --cleanup` removes every rule, chain and conntrack mark the interceptor
may have left in the current network namespace, and the split policy routing (idempotent; `splittun down`
runs the same code).
"""

import json
import sys

from runtime.actor import main

from .actor import InterceptorActor


def cleanup_here(argv: list[str]) -> int:
    """Remove what the interceptor may have left in this network namespace; print what went (one JSON line).
    `--skip-rules` / `--skip-routing` leave one part alone; `--routing-unless-intercepting` leaves the routing
    when another instance intercepts here now (it is then that one's). `splittun down` runs this."""
    from runtime import paths

    from .cleanup import cleanup, remove_routing

    run_dir = paths.run_dir()
    result = {"tables": [], "conntrack": 0, "names_file": False} if "--skip-rules" in argv else cleanup(run_dir)
    result["routing"] = (
        []
        if "--skip-routing" in argv
        else remove_routing(run_dir, unless_intercepting="--routing-unless-intercepting" in argv)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # never on import: running it binds the queues and installs rules here
    sys.exit(cleanup_here(sys.argv[1:]) if "--cleanup" in sys.argv[1:] else main(InterceptorActor))
