import sys

from runtime.actor import main

from .actor import ApiActor

if __name__ == "__main__":
    sys.exit(main(ApiActor))
