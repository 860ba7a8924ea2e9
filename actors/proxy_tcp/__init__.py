"""proxy_tcp: transparent TCP proxy workers for split connections (the data path).

Connections marked 1719 are DNAT'd to 127.0.0.17:719 / [::1]:719; a worker accepts, recovers the
original destination (SO_ORIGINAL_DST) and dials it through the chosen interface with the split-egress
mark. N workers share the port with SO_REUSEPORT (supervisord `numprocs`).
"""
