import sys

from actors.runtime import main

from .actor import InterceptorActor

sys.exit(main(InterceptorActor))
