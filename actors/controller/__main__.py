import sys

from runtime.actor import main

from .actor import ControllerActor

if __name__ == "__main__":
    sys.exit(main(ControllerActor))
