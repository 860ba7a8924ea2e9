import sys

from runtime.actor import main

from .actor import ResolverActor

if __name__ == "__main__":
    sys.exit(main(ResolverActor))
