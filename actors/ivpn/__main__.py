import sys

from actors.runtime import main

from .actor import IvpnActor

sys.exit(main(IvpnActor))
