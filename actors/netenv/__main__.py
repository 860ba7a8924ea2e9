import sys

from runtime.actor import main

from .actor import NetenvActor

if __name__ == "__main__":
    sys.exit(main(NetenvActor))
