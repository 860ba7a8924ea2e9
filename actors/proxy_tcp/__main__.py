import sys

from runtime.actor import main

from .actor import ProxyTcpActor

if __name__ == "__main__":
    sys.exit(main(ProxyTcpActor))
