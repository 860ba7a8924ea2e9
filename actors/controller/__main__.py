import sys

from actors.runtime import main

from .actor import ControllerActor

sys.exit(main(ControllerActor))
