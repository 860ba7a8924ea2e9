import sys

from actors.runtime import main

from .actor import ProxyTcpActor

sys.exit(main(ProxyTcpActor))
