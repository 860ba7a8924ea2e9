"""splittun: per-application split tunnelling beside a VPN.

This package holds what is not an actor: the `splittun` command (cli, commands/), the paths of one
instance (home), supervisord control (supervise) and the network lab (lab/).
"""

__version__ = "0.1.0"
