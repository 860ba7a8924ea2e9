import sys

from actors.runtime import main

from .actor import ProxyUdpActor

sys.exit(main(ProxyUdpActor))
