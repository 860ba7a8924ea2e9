import sys

from actors.runtime import main

from .actor import NetenvActor

sys.exit(main(NetenvActor))
