"""The splittun lab: network namespaces shaped like a laptop on a real VPN (see ``lab.py``).

``Lab(name).up()`` builds host, isp, vpnsrv and inet namespaces with a real TUN tunnel between host
and vpnsrv; ``whoami()`` answers the "what is my IP" question for either path. Addresses and names
are in ``splittun.lab.topology``.
"""

from splittun.lab.lab import Lab, LabError, down_all, lab_names, ns_name
from splittun.lab.processes import lab_daemons, netns_pids

__all__ = ["Lab", "LabError", "down_all", "lab_daemons", "lab_names", "netns_pids", "ns_name"]
