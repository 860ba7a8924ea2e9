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

if "--cleanup" in sys.argv[1:]:
    from messages import endpoints

    from .cleanup import cleanup, remove_routing

    run_dir = endpoints.run_dir()
    print(json.dumps({**cleanup(run_dir), "routing": remove_routing(run_dir)}))
    sys.exit(0)

from actors.runtime import main

from .actor import InterceptorActor

sys.exit(main(InterceptorActor))
