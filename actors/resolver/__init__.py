"""resolver: the host's DNS path while splittun runs (a stub resolver on 127.0.0.17:53 and [::1]:53).

The interceptor DNATs every local app's DNS query here (RerouteToNameserver, mark 1799 + the app's path);
the resolver asks the server the app asked through the VPN, or the split interface's DNS servers out of
that interface, and writes every answer's names into the table domain rules match by, before the app
sees the answer. Policy, cache and name table are pure code in core/dns; see README.md.
"""
