"""How splittun talks to the operating system: one small module per kernel interface.

- `netlink`: message framing and one socket class, shared by the others
- `conntrack`: ctnetlink (lookups, deletes, flushes by mark, destroy events filtered in the kernel)
- `sockdiag`: sock_diag (which socket owns a connection; UDP sockets that went away)
- `procfs`: /proc (which process holds a socket; what describes a process), tolerant of processes exiting
- `nfqueue`: the NFQUEUE packet source (queues bound fail-open, read on a poll loop)
- `routing`: the split policy routing table and rule (pyroute2), kept in the background
- `divert`: the packet diverter (pydivert: WinDivert on Windows, eBPFDivert on Linux) and its filter
- `inotify`: told when a file changes (the controller's config), instead of polling its stat
- `mapped`: a fixed-size table in a memory-mapped file several processes share (names, redirects)
- `windows`: Windows calls behind small interfaces (owner-pid tables, process images, the IVPN port file)

Connections are `messages.flows.FiveTuple`s throughout. Pure encode/decode functions are tested with kernel
bytes; only the classes do I/O. Nothing here knows the policy or the actors: callers above (`core`, `actors`)
decide, these modules carry it out.
"""
