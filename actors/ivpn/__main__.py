import sys

from runtime.actor import main

from .actor import IvpnActor

if __name__ == "__main__":
    sys.exit(main(IvpnActor))
