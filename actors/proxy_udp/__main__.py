import sys

from runtime.actor import main

from .actor import ProxyUdpActor

if __name__ == "__main__":
    sys.exit(main(ProxyUdpActor))
